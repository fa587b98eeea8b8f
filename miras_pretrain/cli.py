"""The ``miras-pretrain`` command line: one subcommand per job.

Each job lives in its own module that exposes ``register(subparsers)``; that function adds its
sub-parser and sets ``func`` (called with the parsed namespace, returning an exit code). Modules
import their heavy dependencies (torch, deepspeed, ...) inside ``func`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand module paths, in the order they appear in --help
COMMAND_MODULES: list[str] = [
    "miras_pretrain.data.cli",
    "miras_pretrain.train.cli",
    "miras_pretrain.launch.cli",
    "miras_pretrain.export.cli",
    "miras_pretrain.evaluation.cli",
    "miras_pretrain.model.cli",
]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miras-pretrain",
        description="Pretrain Miras-family sequence models (Moneta, Yaad, Memora, Titans, ...).",
    )
    # The deepspeed launcher passes --local_rank=N before the subcommand unless given
    # --no_local_rank; accept it here and hand it on the way torchrun does (LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for path in COMMAND_MODULES:
        importlib.import_module(path).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        # Bad input: one clear line naming the field or file, no traceback.
        print(f"miras-pretrain {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
