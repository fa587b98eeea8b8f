#!/usr/bin/env python
"""Print parameters and FLOPs per token for model configs, as a table.

    python tools/count_params.py                       # every registered model (presets x sizes)
    python tools/count_params.py moneta_340m my_model.yaml --seq-len 4096 --json out.json

A model is a registered name (``miras-pretrain models`` lists them) or a model YAML path.

FLOPs: training FLOPs per token = 3 x forward (backward = 2 x forward), at context --seq-len;
the memory's inner gradients, state updates and reads are counted as the chunked op computes
them (see miras_pretrain/model/counting.py for the exact accounting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miras_pretrain.model.config import ModelConfig  # noqa: E402
from miras_pretrain.model.counting import flops_breakdown, parameter_breakdown  # noqa: E402
from miras_pretrain.model.registry import model_names, split_name  # noqa: E402


def rows_for(refs: list[str], seq_len: int) -> list[dict]:
    """One row per model: a registered name, or a YAML path (labelled by its file stem)."""
    rows = []
    for ref in refs:
        named = split_name(ref) is not None
        cfg = ModelConfig.from_ref(ref) if named else ModelConfig.from_yaml(ref)
        params = parameter_breakdown(cfg)
        flops = flops_breakdown(cfg, seq_len)
        rows.append({
            "config": ref if named else Path(ref).stem, "layers": cfg.n_layers, "d_model": cfg.d_model,
            "heads": cfg.n_heads, "ffn": cfg.ffn_width, "pattern": cfg.layer_pattern,
            "params": params["total"], "non_embedding": params["non_embedding"],
            "fwd_flops": flops["forward"], "memory_flops": flops["memory"],
            "train_flops": flops["train"],
        })
    return rows


def format_table(rows: list[dict], seq_len: int) -> str:
    head = (f"{'config':<22} {'L':>3} {'d':>5} {'H':>3} {'ffn':>5} {'params':>9} {'non-emb':>9} "
            f"{'fwd GF/tok':>10} {'mem GF/tok':>10} {'train GF/tok':>12}")
    lines = [f"FLOPs per token at seq_len={seq_len}; train = 3 x forward", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<22} {r['layers']:>3} {r['d_model']:>5} {r['heads']:>3} {r['ffn']:>5} "
            f"{r['params'] / 1e6:>8.1f}M {r['non_embedding'] / 1e6:>8.1f}M "
            f"{r['fwd_flops'] / 1e9:>10.3f} {r['memory_flops'] / 1e9:>10.3f} {r['train_flops'] / 1e9:>12.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help="registered names or model YAMLs (default: every registered model)")
    ap.add_argument("--seq-len", type=int, default=4096, help="context length for FLOPs (paper: 4096)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = rows_for(args.configs or model_names(), args.seq_len)
    except (ValueError, FileNotFoundError) as err:
        print(f"count_params: error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, args.seq_len))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
