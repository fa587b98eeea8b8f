#!/usr/bin/env python
"""Training throughput (tokens/s) and MFU through the real trainer stack on the current device.

Each row: one registered model (``<preset>_<size>``, see ``miras-pretrain models``) at sequence length T, batch
1 x T random tokens, a DeepSpeed ZeRO-1 engine with torch AdamW (exactly what `miras-pretrain
train` builds), one warm-up step then ``--steps`` timed optimizer steps. MFU uses the model
helper's ``flops_per_token`` (training = 3 x forward) over the device peak (``--peak-flops``, or
the built-in table / CPU estimate of ``miras_pretrain.train.metrics``).

    python tools/bench_train.py                       # tiny + 170m, moneta/yaad/memora/transformer, T=2048,8192
    python tools/bench_train.py --sizes tiny --seq-lens 2048 --steps 2
    python tools/bench_train.py --quick               # seconds: tiny, T=64, 1 step (used by the test)

Prints a table and writes JSON (default bench_results/bench_train.json). On CPU the large rows
are slow and memory-hungry (every 170M model at T=8192 exceeds 24 GiB on the PyTorch path):
every row runs in its own child process, so
an out-of-memory kill marks that row failed and the table goes on; ``--max-step-seconds`` skips
the remaining timed steps of a row whose warm-up step already took longer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench_one(preset: str, size: str, seq_len: int, steps: int, batch: int, peak: float | None,
               max_step_s: float, device) -> dict:
    import torch

    from miras_pretrain.model import ModelConfig, build_model, count_parameters, flops_per_token
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.engine import build_engine
    from miras_pretrain.train.metrics import device_peak_flops, memory_gib

    mcfg = ModelConfig.from_ref(f"{preset}_{size}")
    cfg = config_from_dict({"train": {"max_steps": steps + 1, "micro_batch_size": batch, "warmup_steps": 0,
                                      "zero_stage": 1}})
    torch.manual_seed(0)
    model = build_model(mcfg)
    engine, _ = build_engine(model, cfg, device)
    x = torch.randint(0, mcfg.vocab_size, (batch, seq_len), device=device)

    def step(eng=engine) -> float:  # a default, not a closure over the name `del`-ed below
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = eng(x, labels=x)
        eng.backward(loss)
        eng.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warm = step()
    times = []
    for _ in range(steps):
        if warm > max_step_s and times:
            break
        times.append(step())
    dt = sum(times) / len(times)
    tok_s = batch * seq_len / dt
    fpt = float(flops_per_token(mcfg, seq_len))
    peak_flops = device_peak_flops(device, peak)
    row = {
        "model": f"{preset}_{size}", "preset": preset, "size": size, "seq_len": seq_len, "batch": batch,
        "params": int(count_parameters(mcfg)), "steps_timed": len(times), "step_s": dt,
        "tokens_per_s": tok_s, "flops_per_token": fpt, "peak_flops": peak_flops,
        "mfu": fpt * tok_s / peak_flops, **memory_gib(device),
    }
    del engine, model
    return row


def _row_in_child(preset: str, size: str, seq_len: int, args) -> dict:
    """One row in a child process: an out-of-memory kill or a crash of one config (e.g. a
    large Moneta on a small CPU machine) becomes a 'failed' row instead of ending the table."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{preset},{size},{seq_len}",
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-step-seconds",
               str(args.max_step_seconds), "--out", str(out)]
        if args.peak_flops:
            cmd += ["--peak-flops", str(args.peak_flops)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
            code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", []
        if out.is_file():
            return json.loads(out.read_text())
    why = "killed (-9: out of memory?)" if code in (-9, 137) else f"exit {code}"
    return {"model": f"{preset}_{size}", "preset": preset, "size": size, "seq_len": seq_len,
            "failed": why, "log_tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="moneta,yaad,memora,transformer")
    ap.add_argument("--sizes", default="tiny,170m")
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per row (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device for MFU")
    ap.add_argument("--max-step-seconds", type=float, default=60.0)
    ap.add_argument("--row-timeout", type=float, default=3600.0, help="seconds per row before it is marked failed")
    ap.add_argument("--quick", action="store_true", help="tiny models, T=64, 1 timed step (for tests)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: preset,size,T in this process
    ap.add_argument("--out", default=str(REPO / "bench_results" / "bench_train.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.seq_lens, args.steps = "tiny", "64", 1

    import torch

    from miras_pretrain.model.registry import split_name
    from miras_pretrain.train import dist as mdist

    if args.one:
        preset, size, seq_len = args.one.split(",")
        device = mdist.pick_device("auto")
        mdist.init_distributed(device)
        try:
            row = _bench_one(preset, size, int(seq_len), args.steps, args.batch, args.peak_flops,
                             args.max_step_seconds, device)
        finally:
            mdist.destroy()
        Path(args.out).write_text(json.dumps(row))
        return 0

    rows = []
    for size in args.sizes.split(","):
        for seq_len in (int(s) for s in args.seq_lens.split(",")):
            for preset in args.presets.split(","):
                if split_name(f"{preset}_{size}") is None:
                    raise SystemExit(f"{preset}_{size} is not a registered model (miras-pretrain models): "
                                     "check --presets/--sizes")
                row = _row_in_child(preset, size, seq_len, args)
                rows.append(row)
                if "failed" in row:
                    print(f"  {row['model']:<18} T={seq_len:<6} FAILED: {row['failed']}", flush=True)
                else:
                    print(f"  {row['model']:<18} T={seq_len:<6} {row['tokens_per_s']:>10.1f} tok/s  "
                          f"MFU {100 * row['mfu']:.3f}%", flush=True)

    header = f"{'model':<18} {'params':>10} {'T':>6} {'step s':>9} {'tokens/s':>10} {'MFU %':>8} {'GFLOP/tok':>10} {'peak GiB':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if "failed" in r:
            print(f"{r['model']:<18} {'':>10} {r['seq_len']:>6}  failed: {r['failed']}")
            continue
        mem = r.get("mem/cuda_max_alloc_gib", r.get("mem/cpu_max_rss_gib", float("nan")))
        print(f"{r['model']:<18} {r['params'] / 1e6:>9.1f}M {r['seq_len']:>6} {r['step_s']:>9.2f} "
              f"{r['tokens_per_s']:>10.1f} {100 * r['mfu']:>8.3f} {r['flops_per_token'] / 1e9:>10.3f} {mem:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = mdist.pick_device("auto")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out.write_text(json.dumps({"device": device_name, "threads": torch.get_num_threads(), "rows": rows},
                              indent=1))
    print(f"\nwrote {out}")
    return 0 if rows and all("failed" not in r and math.isfinite(r["tokens_per_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
