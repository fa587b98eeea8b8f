#!/usr/bin/env python
"""Consolidate a sharded `miras-pretrain train` checkpoint (any ZeRO stage, TP/PP layout) into
one fp32 single-process state dict (``torch.save`` of ``{name: tensor}``, loadable with
``build_model(cfg).load_state_dict(...)``).

    python tools/consolidate.py runs/demo/checkpoints            # newest complete checkpoint
    python tools/consolidate.py runs/x/checkpoints/step_00001000 --out model_fp32.pt

TP/PP checkpoints are re-loaded by a torchrun job with the checkpoint's world size (CPU/gloo),
started automatically. Also writes ``<out>.json`` with the model config and the step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_* directory, a checkpoints root or <root>/latest "
                    "(the newest complete one)")
    ap.add_argument("--out", default=None, help="output .pt (default: <checkpoint>/consolidated_fp32.pt)")
    args = ap.parse_args(argv)
    try:
        import torch

        from miras_pretrain.train.checkpoint import read_meta, resolve_checkpoint
        from miras_pretrain.train.consolidate import consolidate_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint)
        state = consolidate_checkpoint(ckpt)
        out = Path(args.out) if args.out else ckpt / "consolidated_fp32.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        meta = read_meta(ckpt)
        info = {"checkpoint": str(ckpt), "step": meta.get("step"), "model": meta.get("model"),
                "layout": {k: meta.get(k) for k in ("world_size", "tp", "pp", "dp", "zero_stage")},
                "parameters": int(sum(t.numel() for t in state.values()))}
        Path(str(out) + ".json").write_text(json.dumps(info, indent=1))
    except (ValueError, FileNotFoundError) as err:
        print(f"consolidate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(state)} tensors, {info['parameters']:,} parameters (fp32) from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
