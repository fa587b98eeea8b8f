"""Where can each memory store key-value pairs? The inner-learning-rate window of every preset.

Writes ``--pairs`` random pairs into one head of each preset's memory at each eta of a grid and
reads them back (``miras_pretrain.evaluation.memory_capacity``); prints accuracy per (preset,
eta) with the preset's initial eta (``eta_max / 2``) marked, and writes the table as JSON.

    .venv/bin/python tools/memory_capacity.py [--head-dims 32 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras_pretrain.evaluation.memory_capacity import write_read_accuracy  # noqa: E402
from miras_pretrain.model.config import ModelConfig  # noqa: E402

ETAS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
PRESETS = ("moneta", "yaad", "memora", "titans", "ttt_mlp", "gated_delta", "deltanet", "linear_attn")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--json", default="memory_capacity.json")
    args = ap.parse_args(argv)
    rows = []
    print(f"accuracy of {args.pairs} written pairs read back (chance {1 / args.pairs:.3f}); "
          f"chunk {args.chunk_size}; * = the preset's initial eta (eta_max / 2)")
    print("| preset | head dim | initial eta | " + " | ".join(f"eta {e:g}" for e in ETAS) + " | at initial eta |")
    print("|---|---|---|" + "---|" * (len(ETAS) + 1))
    for preset in args.presets:
        for d in args.head_dims:
            cfg = ModelConfig.from_dict({"miras": {"preset": preset}, "d_model": 2 * d, "n_heads": 2})
            eta0 = cfg.eta_max / 2
            accs = {e: write_read_accuracy(cfg.spec, e, head_dim=d, pairs=args.pairs,
                                           chunk_size=args.chunk_size) for e in (*ETAS, eta0)}
            cells = [f"{accs[e]:.2f}" for e in ETAS]
            print(f"| {preset} | {d} | {eta0:g} | " + " | ".join(cells) + f" | {accs[eta0]:.2f} |")
            rows.append({"preset": preset, "head_dim": d, "initial_eta": eta0,
                         "accuracy": {str(e): accs[e] for e in ETAS}, "at_initial_eta": accs[eta0]})
    Path(args.json).write_text(json.dumps({"pairs": args.pairs, "chunk_size": args.chunk_size,
                                           "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
