"""``miras-pretrain models``: the registered models (presets x sizes) with parameter counts.

    miras-pretrain models                      # the whole table
    miras-pretrain models --preset moneta      # one preset at every size
    miras-pretrain models --show moneta_340m   # one model's fields, as a model YAML to edit
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list the registered models (presets x sizes) with parameter counts",
        description="List the registered models: every preset at every size, with parameter counts. "
                    "A training config names one as `model: moneta_340m` or "
                    "`model: {preset: moneta, size: 340m, <field overrides>}`.")
    p.add_argument("--preset", action="append", default=None,
                   help="only this preset (repeatable), e.g. moneta, gated_delta, transformer")
    p.add_argument("--size", action="append", default=None, help="only this size (repeatable), e.g. 340m")
    p.add_argument("--show", metavar="NAME", default=None,
                   help="print one model's full ModelConfig as YAML, a starting point for your own file "
                        "(default: list the models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from miras_pretrain.model.config import ModelConfig
    from miras_pretrain.model.registry import PRESETS, SIZES

    if args.show is not None:
        print(yaml.safe_dump(ModelConfig.from_ref(args.show).to_dict(), sort_keys=False), end="")
        return 0
    for flag, chosen, valid in (("--preset", args.preset, PRESETS), ("--size", args.size, SIZES)):
        bad = [c for c in chosen or [] if c not in valid]
        if bad:
            raise ValueError(f"{flag} {bad[0]!r} is not valid: choose one of {', '.join(valid)}")
    presets = [p for p in PRESETS if not args.preset or p in args.preset]
    sizes = [s for s in SIZES if not args.size or s in args.size]
    print(format_table(presets, sizes))
    return 0


def format_table(presets: list[str], sizes: list[str]) -> str:
    """One line per (preset, size): name, shape and parameter count (analytic, instant)."""
    from miras_pretrain.model.config import ModelConfig
    from miras_pretrain.model.counting import parameter_breakdown

    head = (f"{'name':<20} {'preset':<14} {'size':>5} {'layers':>6} {'d_model':>7} {'heads':>5} "
            f"{'ffn':>5} {'pattern':>7} {'memory':<12} {'params':>9} {'non-emb':>9}")
    lines = [head, "-" * len(head)]
    for preset in presets:
        for size in sizes:
            name = f"{preset}_{size}"
            cfg = ModelConfig.from_ref(name)
            counts = parameter_breakdown(cfg)
            memory = "-" if "M" not in cfg.layer_pattern else cfg.miras["preset"]
            lines.append(
                f"{name:<20} {preset:<14} {size:>5} {cfg.n_layers:>6} {cfg.d_model:>7} {cfg.n_heads:>5} "
                f"{cfg.ffn_width:>5} {cfg.layer_pattern:>7} {memory:<12} "
                f"{counts['total'] / 1e6:>8.1f}M {counts['non_embedding'] / 1e6:>8.1f}M")
    return "\n".join(lines)
