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

from miras_pretrain.train.signals import (EXIT_ABORTED, EXIT_REQUEUE, StopFlag, install_early,
                                          launch_is_single_process, signal_name)

# subcommands that train: SIGTERM/SIGUSR1/SIGINT there mean "checkpoint and exit 75"
TRAINING_COMMANDS = ("train", "demo")

# subcommand module paths, in the order they appear in --help
COMMAND_MODULES: list[str] = [
    "miras_pretrain.data.cli",
    "miras_pretrain.train.cli",
    "miras_pretrain.launch.cli",
    "miras_pretrain.export.cli",
    "miras_pretrain.evaluation.cli",
    "miras_pretrain.model.cli",
    "miras_pretrain.study.cli",
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
    finish_help(parser)
    return parser


def _default_text(value) -> str:
    """A default as --help shows it: lists comma-joined, ``%`` escaped for argparse."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return str(value).replace("%", "%%")


def finish_help(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` and its sub-parsers one default note: ``(required)``,
    ``(default: off)`` for a flag, ``(default: X)`` for a value -- unless its help already says
    ``(default...)`` in words (what an unset option means is the author's sentence to write;
    tests/test_cli_help.py checks every option has one). Replaces ArgumentDefaultsHelpFormatter,
    which appended ``(default: None)`` and doubled hand-written defaults."""
    if parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter:
        parser.formatter_class = argparse.HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                finish_help(sub)
            continue
        if (not action.option_strings or action.help in (None, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction) or "(default" in action.help
                or "(required)" in action.help):
            continue
        if action.required:
            action.help += " (required)"
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            action.help += f" (default: {'on' if action.default else 'off'})"
        elif isinstance(action, argparse._AppendAction) and action.default in (None, []):
            action.help += " (repeatable; default: none)"
        elif action.default is not None:
            action.help += f" (default: {_default_text(action.default)})"


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``, found without the (slow) parser: the first word that
    is not a top-level option or its value."""
    it = iter(argv)
    for word in it:
        if word in ("--local_rank", "--local-rank"):
            next(it, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    # A training job must act on a scheduler's signal from its first moment, but building the
    # parser and the job import torch and deepspeed (seconds): take the signals over first.
    stop = install_early(command) if command in TRAINING_COMMANDS else None
    try:
        return _run(argv, stop)
    except KeyboardInterrupt:
        # Ctrl-C in a subcommand that does not train (it keeps Python's default SIGINT)
        print(f"miras-pretrain{' ' + command if command else ''}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_ABORTED


def _run(argv: list[str], stop: StopFlag | None) -> int:
    """Parse and run the subcommand; one-line errors for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if stop is not None and stop.received is not None and launch_is_single_process():
        # signalled while starting: nothing was written yet, so stop before touching the run
        # directory (several ranks instead agree on it in the trainer, before the first step)
        hint = "; rerun with --resume auto" if args.command == "train" else ""
        print(f"miras-pretrain {args.command}: stopped by {signal_name(stop.received)} before training "
              f"started; nothing written{hint}", file=sys.stderr)
        return EXIT_REQUEUE
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        # Bad input: one clear line naming the field or file, no traceback.
        print(f"miras-pretrain {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
