"""Benchmark context parallelism on CPU (gloo): time per training step of CP = 1, 2, 4 on one long
sequence and the share of it spent waiting for memory state and in other CP communication.

    .venv/bin/python tools/bench_cp.py [--quick] [--presets titans,gated_delta] [--out PATH]

For every preset and CP size n, n gloo processes each hold T / n tokens of ONE sequence
(B = 1) and run ``--steps`` forward+backward steps of the model (after one warm-up step).
Reported per CP size (mean over ranks; the max rank is the step time): step seconds, tokens/s,
``wait`` = time blocked on rank r-1's state / rank r+1's state gradient (the wavefront bubble
plus transfer), ``comm`` = halos, all-gathers and send completion, both as a share of the step,
and bytes sent per rank and step. Read the numbers as a CPU illustration: with 2 cores, CP = 4
oversubscribes the machine, so absolute speed-ups are not GPU predictions (``tools/cp_model.py``
is the at-scale model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _model_cfg(preset: str, quick: bool) -> dict:
    if quick:
        return dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, miras={"preset": preset},
                    chunk_size=8, gate_rank=8, eta_max=0.1, backend="chunked")
    return dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, ffn_hidden=256, miras={"preset": preset},
                chunk_size=32, gate_rank=16, eta_max=0.1, backend="chunked")


def _worker(rank: int, world: int, preset: str, scheme: str, seq_len: int, steps: int, quick: bool, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from miras_pretrain.model import ModelConfig, build_model
    from miras_pretrain.parallel.context_parallel import ContextParallel, CPGroup, slice_batch_for_cp

    cfg = ModelConfig.from_dict(_model_cfg(preset, quick))
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    cp = ContextParallel(CPGroup(list(range(world)), dist.group.WORLD), scheme)
    local = slice_batch_for_cp(batch, rank, world, chunk_size=cfg.chunk_size)
    times = []
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        cp.reset_stats()
        dist.barrier()
        t0 = time.perf_counter()
        with cp.batch(local["cp_slice"]) as ctx:
            loss = model(local["input_ids"], labels=local["labels"], cp=ctx) * local["cp_loss_scale"]
        loss.backward()
        cp.finish_step()
        times.append(time.perf_counter() - t0)
        if step == 0:  # warm-up
            stats = None
            continue
        s = cp.stats
        stats = [a + b for a, b in zip(stats or [0.0] * 4, [s.wait_s, s.comm_s, float(s.bytes_sent), float(s.tokens)])]
    rec = {"rank": rank, "step_s": sum(times[1:]) / steps, "wait_s": stats[0] / steps, "comm_s": stats[1] / steps,
           "bytes_sent": stats[2] / steps, "tokens": local["input_ids"].numel()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec))


def run(presets: list[str], sizes: list[int], seq_len: int, steps: int, quick: bool) -> list[dict]:
    from miras_kernels import MirasSpec
    from miras_pretrain.testing.context_parallel_launch import spawn

    rows = []
    for item in presets:
        preset, _, scheme = item.partition(":")  # "gated_delta:state_passing" forces a scheme
        scheme = scheme or ("all_gather" if MirasSpec.preset(preset).is_affine else "state_passing")
        for n in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                spawn(_worker, n, preset, scheme, seq_len, steps, quick, tmp, timeout=590.0)
                recs = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(n)]
            step = max(r["step_s"] for r in recs)
            mean = lambda k: sum(r[k] for r in recs) / n  # noqa: E731
            rows.append({
                "preset": preset, "scheme": scheme if n > 1 else "none", "cp": n, "seq_len": seq_len,
                "step_s": step, "tokens_per_s": seq_len / step, "tokens_per_rank": recs[0]["tokens"],
                "wait_share": mean("wait_s") / step, "comm_share": mean("comm_s") / step,
                "bytes_sent_per_rank": mean("bytes_sent"), "ranks": recs,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and sequence (seconds; for tests)")
    p.add_argument("--presets", default="titans,gated_delta,gated_delta:state_passing",
                   help="comma list of Miras presets, optionally preset:scheme")
    p.add_argument("--sizes", default="1,2,4", help="CP sizes")
    p.add_argument("--seq-len", type=int, default=None, help="tokens of the one sequence (default 4096; quick 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 3; quick 1)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "bench_cp.json"), help="JSON output path")
    args = p.parse_args(argv)
    seq_len = args.seq_len or (64 if args.quick else 4096)
    steps = args.steps or (1 if args.quick else 3)
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        if n < 1 or seq_len % n:
            raise SystemExit(f"--sizes: {n} must be >= 1 and divide --seq-len {seq_len}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = run([s.strip() for s in args.presets.split(",") if s.strip()], sizes, seq_len, steps, args.quick)
    print(f"{'preset':<12} {'scheme':<14} {'cp':>3} {'step s':>8} {'tok/s':>9} {'wait %':>7} {'comm %':>7} {'MB sent/rank':>13}")
    for r in rows:
        print(f"{r['preset']:<12} {r['scheme']:<14} {r['cp']:>3} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{100 * r['wait_share']:>6.1f}% {100 * r['comm_share']:>6.1f}% {r['bytes_sent_per_rank'] / 1e6:>13.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seq_len": seq_len, "steps": steps, "quick": args.quick, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
