"""Predicted per-GPU memory of a training config, and the largest micro-batch that fits.

    .venv/bin/python tools/memory_model.py --config configs/moneta_340m.yaml [--gpu-mem-gib 80]
        [--gpus N] [--micro-batch M]
    .venv/bin/python tools/memory_model.py --validate-cpu [--sizes tiny,170m]

The model is ``miras_pretrain/train/memory_model.py`` (docs/memory_model.md): parameters,
gradients and AdamW states under the config's ZeRO stage and TP/PP/DP layout (DP = GPUs / (TP *
PP * CP); the GPU count is the one the config's header states unless ``--gpus``), activations
with the Miras layers' saved per-chunk memory states, attention, the fp32 logits -- with and
without activation checkpointing. ``--validate-cpu`` compares the prediction with the measured
peak RSS growth of two fp32 AdamW steps in a fresh CPU process (the recorded benchmark of
docs/memory_model.md; the 170M run takes a few minutes and ~6 GiB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras_pretrain.train.memory_model import (GIB, largest_micro_batch, measure_cpu_peak, predict,  # noqa: E402
                                               predict_config)

# --validate-cpu cases: (registry size, preset, micro-batch, seq_len)
VALIDATION = {"tiny": [("yaad", 2, 128), ("titans", 2, 256), ("transformer", 4, 256)],
              "170m": [("moneta", 1, 512)]}


def report(path: str, gpu_mem_gib: float, gpus: int | None, micro_batch: int | None) -> int:
    pred, facts = predict_config(path, gpus=gpus, micro_batch=micro_batch)
    print(f"{path}: {facts['params'] / 1e6:.0f}M parameters; {facts['gpus']} GPUs = TP {facts['tp']} x PP "
          f"{facts['pp']} x DP {facts['dp']}; ZeRO-{facts['zero_stage']}, {facts['precision']}; micro-batch "
          f"{facts['micro_batch']} x {facts['seq_len']} tokens, grad accumulation {facts['grad_accum']} "
          f"(global batch {facts['global_batch']} sequences); Miras memory on GPU: "
          f"{pred.backends.get('miras', 'none')}")
    for ckpt in (False, True):
        p, _ = predict_config(path, gpus=gpus, micro_batch=micro_batch, checkpointing=ckpt)
        mark = " (the config's setting)" if ckpt == pred.checkpointing else ""
        print(f"\nactivation checkpointing {'on' if ckpt else 'off'}{mark}:")
        print(p.table())
        best = largest_micro_batch(path, gpu_mem_gib, gpus=gpus, checkpointing=ckpt)
        print(f"largest micro-batch that fits {gpu_mem_gib:g} GiB: {best}")
    fits = pred.total <= gpu_mem_gib * GIB
    print(f"\nas configured: {pred.total / GIB:.1f} GiB of {gpu_mem_gib:g} GiB -> {'fits' if fits else 'DOES NOT FIT'}")
    return 0 if fits else 1


def validate_cpu(sizes: list[str]) -> int:
    from miras_pretrain.model.config import ModelConfig
    from miras_pretrain.model.registry import registry_fields

    print("| model | micro-batch x T | predicted (MiB) | measured peak RSS growth (MiB) | predicted / measured |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for size in sizes:
        for preset, mb, T in VALIDATION[size]:
            cfg = ModelConfig.from_dict({**registry_fields(preset, size), "backend": "chunked"})
            pred = predict(cfg, micro_batch=mb, seq_len=T, zero_stage=0, precision="fp32", device="cpu")
            t0 = time.time()
            meas = measure_cpu_peak(cfg, micro_batch=mb, seq_len=T)["peak_growth"]
            ratio = pred.total / meas
            worst = max(worst, abs(ratio - 1))
            print(f"| {preset}_{size} | {mb} x {T} | {pred.total / 2**20:.0f} | {meas / 2**20:.0f} | {ratio:.2f} "
                  f"({time.time() - t0:.0f} s) |", flush=True)
    print(f"largest deviation: {worst:.0%}")
    return 0 if worst <= 0.2 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="training config YAML")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--gpus", type=int, default=None, help="GPU count (default: the config header's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    ap.add_argument("--validate-cpu", action="store_true", help="compare with measured CPU peaks")
    ap.add_argument("--sizes", default="tiny,170m", help="sizes for --validate-cpu (tiny, 170m)")
    args = ap.parse_args(argv)
    if args.validate_cpu:
        sizes = [s for s in args.sizes.split(",") if s]
        bad = [s for s in sizes if s not in VALIDATION]
        if bad:
            ap.error(f"--sizes {','.join(bad)} is not valid: use {', '.join(VALIDATION)}")
        return validate_cpu(sizes)
    if not args.config:
        ap.error("--config is required (or --validate-cpu)")
    if args.gpu_mem_gib <= 0:
        ap.error("--gpu-mem-gib must be > 0")
    return report(args.config, args.gpu_mem_gib, args.gpus, args.micro_batch)


if __name__ == "__main__":
    sys.exit(main())
