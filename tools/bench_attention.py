#!/usr/bin/env python
"""Packed-document attention: the old dense-mask path vs the new one, peak memory and time.

For each sequence length T (default 1024, 4096, 8192), with B = 1, H = 4, D = 64 and 4 packed
documents (``cu_seqlens`` at 0, 3T/16, 7T/16, 12T/16, T: unequal, none on a tile edge), runs one
forward + backward of the attention core (q, k, v [B, H, T, D] fp32 leaves, gradient of o
given) along two paths:

* ``dense``: the old path -- the boolean [T, T] mask (causal, same document, window) built
  from ``cu_seqlens`` and passed to ``F.scaled_dot_product_attention(attn_mask=mask)``;
* ``tiled``: ``miras_pretrain.model.attention.document_causal_attention`` (the model's path on
  CPU: query tiles with [tile, keys] masks, no dense mask; on CUDA the model uses FlexAttention).

Both for full causal attention and for a sliding window (``--window``, default 1024). Memory is
the peak of torch's CPU allocator during the call, read from torch's profiler
(``torch.profiler.profile(profile_memory=True)``: the largest "Total Allocated" among the
allocation events of the exported trace, minus the value before the call), i.e. every tensor
allocated by the path, mask and autograd buffers included, inputs excluded. Time: the best of
``--repeats`` runs (perf_counter) after one warm-up, one thread. The outputs and gradients of the
two paths are compared (max abs difference, reported).

Prints a table and writes JSON (``--out``, default ``bench_results/bench_attention.json``).

    python tools/bench_attention.py                     # T = 1024, 4096, 8192
    python tools/bench_attention.py --seq-lens 128 256 --repeats 1 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_bytes(fn) -> int:
    """Peak bytes of torch's CPU allocator during ``fn()`` above the level at its start."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    # "Total Allocated" counts from the profiler's start; the level before the first event is
    # that event's total minus its own (signed) size
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    del torch
    return max(e["args"]["Total Allocated"] for e in mem) - start


def _inputs(seq_len: int, heads: int, dim: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(1, heads, seq_len, dim, generator=g) for _ in range(4))
    cu = torch.tensor([0, 3 * seq_len // 16, 7 * seq_len // 16, 12 * seq_len // 16, seq_len], dtype=torch.int32)
    return q, k, v, go, cu


def _run(path: str, q, k, v, go, cu, window: int | None, tile: int):
    """One forward + backward; returns (o, dq, dk, dv)."""
    import torch
    import torch.nn.functional as F

    from miras_pretrain.model.attention import dense_attention_mask, document_causal_attention, document_ids

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    t = q.shape[2]
    if path == "dense":
        mask = dense_attention_mask(t, window=window, cu_seqlens=cu, device=q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        doc = document_ids(cu, t)
        o = document_causal_attention(q, k, v, window=window, doc_q=doc, doc_k=doc, impl="tiled", tile=tile)
    o.backward(go)
    del torch
    return o.detach(), q.grad, k.grad, v.grad


def bench(seq_lens: list[int], windows: list[int | None], repeats: int, heads: int, dim: int, tile: int) -> dict:
    import torch

    torch.set_num_threads(1)
    rows = []
    for window in windows:
        for t in seq_lens:
            q, k, v, go, cu = _inputs(t, heads, dim)
            outs, row = {}, {"seq_len": t, "window": window, "heads": heads, "dim": dim, "docs": 4}
            for path in ("dense", "tiled"):
                _run(path, q, k, v, go, cu, window, tile)  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    outs[path] = _run(path, q, k, v, go, cu, window, tile)
                    times.append(time.perf_counter() - t0)
                row[f"{path}_s"] = min(times)
                row[f"{path}_peak_mib"] = _peak_bytes(lambda: _run(path, q, k, v, go, cu, window, tile)) / 2**20
            row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(outs["dense"], outs["tiled"]))
            row["mem_ratio"] = row["dense_peak_mib"] / max(row["tiled_peak_mib"], 1e-9)
            row["speedup"] = row["dense_s"] / row["tiled_s"]
            rows.append(row)
            print(_fmt(row), flush=True)
    return {"tool": "bench_attention", "torch": torch.__version__, "threads": 1, "tile": tile, "repeats": repeats,
            "machine": platform.machine(), "python": platform.python_version(),
            "memory": "torch.profiler profile_memory: peak 'Total Allocated' of the CPU allocator during fwd+bwd",
            "rows": rows}


HEADER = (f"{'T':>6} {'window':>6} {'dense s':>9} {'tiled s':>9} {'speedup':>8} "
          f"{'dense MiB':>10} {'tiled MiB':>10} {'mem x':>7} {'max|diff|':>10}")


def _fmt(r: dict) -> str:
    w = "-" if r["window"] is None else str(r["window"])
    return (f"{r['seq_len']:>6} {w:>6} {r['dense_s']:>9.3f} {r['tiled_s']:>9.3f} {r['speedup']:>8.2f} "
            f"{r['dense_peak_mib']:>10.1f} {r['tiled_peak_mib']:>10.1f} {r['mem_ratio']:>7.1f} {r['max_abs_diff']:>10.2e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--window", type=int, default=1024, help="sliding window of the second set of rows (0: none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tile", type=int, default=None, help="queries per tile (default: the model's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "bench_attention.json")
    args = ap.parse_args(argv)
    for name in ("repeats", "heads", "dim"):
        if getattr(args, name) < 1:
            print(f"bench_attention: --{name} must be >= 1 (got {getattr(args, name)})", file=sys.stderr)
            return 2
    if any(t < 16 or t % 16 for t in args.seq_lens):
        print(f"bench_attention: --seq-lens must be multiples of 16, >= 16 (got {args.seq_lens})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from miras_pretrain.model.attention import DEFAULT_TILE

    windows = [None] + ([args.window] if args.window else [])
    print(HEADER, flush=True)
    result = bench(args.seq_lens, windows, args.repeats, args.heads, args.dim, args.tile or DEFAULT_TILE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
