"""Benchmark of the MLP-memory Triton kernels: forward + backward time per preset.

    .venv/bin/python tools/bench_kernels_mlp.py [--quick] [--out bench_results/kernels_mlp.json]

For each MLP preset (moneta, yaad, memora, titans, ttt_mlp) and sequence length it times one
forward + backward (sum(y * g) with a fixed random cotangent; gradients w.r.t. q, k, v, every
gate and the initial weights) of

* ``triton``  -- ``miras_kernels.miras_mlp.chunk_miras_mlp`` (``fallback`` when ``supports`` says no),
* ``chunked`` -- the PyTorch chunked operator ``miras_memory(backend="chunked")``,
* ``gated_delta_triton`` -- the linear gated-delta preset on ``miras_kernels.miras_linear`` (the
  linear-memory reference point of the paper's throughput comparison).

GPU (default): B=4, H=16, D=64, e=4, T in {2048, 8192}, bf16, chunk 64. ``--quick`` runs the same
code in the Triton interpreter on CPU with tiny shapes (B=1, H=2, D=16, e=2, T=32, fp32, chunk
16) so the tool itself is exercised without a GPU; its timings mean nothing. Targets (GPU):
none enforced here; the paper reports ~34-37K tokens/s at 8K for the 340M-760M models.

    .venv/bin/python tools/bench_kernels_mlp.py --count [--out bench_results/kernels_mlp_count.json]

``--count`` (CPU, no GPU needed) counts the Triton launches of one layer forward + backward and the
programs of each launch, for moneta, yaad, memora and titans at B 4, H 16, d 64 and 128 (e 4),
T 4096 and 16384, chunk 64 (``--count-dims``, ``--count-seq-lens`` change the grid). Method: the
interpreter's launch entry (``InterpretedFunction.run``, which every ``kernel[grid](...)`` goes
through under ``TRITON_INTERPRET=1``) is wrapped so that it records (kernel name, grid) and returns
without running the kernel body; the layer itself -- ``chunk_miras_mlp`` and its autograd
backward, the same host code as on a GPU -- runs on ``meta`` tensors (shapes without storage), so
the full shapes cost no memory. ``supports`` refuses ``meta`` tensors and d 128 (not shipped), so it
is bypassed for the count only. :func:`count_layer_launches` with ``dry=False`` runs the kernels
for real on CPU (tests check both modes give the same records at tiny shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PRESETS = ("moneta", "yaad", "memora", "titans", "ttt_mlp")
COUNT_PRESETS = ("moneta", "yaad", "memora", "titans")


def count_layer_launches(preset: str, B: int, H: int, D: int, T: int, chunk: int = 64, expansion: int = 4,
                         dry: bool = True, cu_seqlens: list[int] | None = None) -> list[tuple[str, int]]:
    """Triton launches of one MLP layer forward + backward, in order, as ``(kernel name, programs)``.

    Needs ``TRITON_INTERPRET=1`` set before triton was imported. ``dry=True``: tensors on ``meta``
    and kernel bodies skipped (counts only); ``dry=False``: CPU tensors, kernels executed in the
    interpreter. ``cu_seqlens`` (host list, B must be 1): a varlen batch.
    """
    import math

    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from miras_kernels import MirasSpec
    from miras_kernels.common.varlen import VarlenMeta
    from miras_kernels.miras_mlp import chunk as chunk_mod

    records: list[tuple[str, int]] = []
    orig_run = InterpretedFunction.run
    orig_supports = chunk_mod.supports

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            g = grid(kwargs) if callable(grid) else grid
            records.append((self.fn.__name__, math.prod(g)))
            if dry:
                return None
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    dev = "meta" if dry else "cpu"
    spec = MirasSpec.preset(preset, expansion=expansion)
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        x = torch.randn(*shape, generator=g) if not dry else torch.empty(*shape)
        return x.to(dev)

    q = torch.nn.functional.normalize(r(B, T, H, D), dim=-1) if not dry else r(B, T, H, D)
    k = torch.nn.functional.normalize(r(B, T, H, D), dim=-1) if not dry else r(B, T, H, D)
    v = r(B, T, H, D)
    alpha = torch.sigmoid(r(B, T, H) + 3)
    eta = torch.sigmoid(r(B, T, H)) * 0.1
    delta = torch.nn.functional.softplus(r(B, T, H)) + 0.5
    mu = torch.sigmoid(r(B, T, H) + 1)
    shapes = spec.weight_shapes(D, D)
    st = {}
    for n in spec.state_keys():
        base = n[2:] if n.startswith("S_") else n
        val = r(H, *shapes[base]) * (0.01 if n.startswith("S_") else shapes[base][1] ** -0.5)
        st[n] = val.abs() + 0.1 if spec.retention == "kl" and not n.startswith("S_") else val
    leaves = [q, k, v, alpha, eta, delta, mu, *st.values()]
    for t in leaves:
        t.requires_grad_(True)
    cu = None
    if cu_seqlens is not None:
        cu = VarlenMeta.from_host(cu_seqlens, device=dev)
    InterpretedFunction.run = run
    if dry:
        chunk_mod.supports = lambda *a, **kw: (True, "")
    try:
        y, _ = chunk_mod.chunk_miras_mlp(q, k, v, alpha if spec.needs_alpha else None, eta, spec=spec,
                                         chunk_size=chunk, delta=delta if spec.needs_delta else None,
                                         mu=mu if spec.needs_mu else None, initial_state=st,
                                         cu_seqlens=cu)
        used = [t for t in leaves if t.requires_grad]
        torch.autograd.grad((y.float() * 0.01).sum(), used, allow_unused=True)
    finally:
        InterpretedFunction.run = orig_run
        chunk_mod.supports = orig_supports
    return records


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes in the Triton interpreter (CPU)")
    ap.add_argument("--out", default="bench_results/kernels_mlp.json", help="JSON output path")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--seq-lens", default=None, help="comma list (default 2048,8192; quick: 32)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--count", action="store_true",
                    help="count launches / programs per launch of one layer fwd+bwd (CPU, no kernel runs)")
    ap.add_argument("--count-dims", default="64,128", help="--count: head dims (default 64,128)")
    ap.add_argument("--count-seq-lens", default="4096,16384", help="--count: sequence lengths")
    ap.add_argument("--label", default="", help="--count: a label stored in the JSON (e.g. before/after)")
    return ap.parse_args(argv)


def count_main(args) -> int:
    """``--count``: the launch table (stdout) and JSON (``--out``)."""
    os.environ["TRITON_INTERPRET"] = "1"   # before the first triton import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    B, H, C = 4, 16, 64
    dims = [int(x) for x in args.count_dims.split(",")]
    lens = [int(x) for x in args.count_seq_lens.split(",")]
    rows = []
    for preset in COUNT_PRESETS:
        for D in dims:
            for T in lens:
                rec = count_layer_launches(preset, B, H, D, T, C)
                progs = sorted({n for _, n in rec})
                kernels = sorted({k for k, _ in rec})
                rows.append({"preset": preset, "D": D, "T": T, "launches": len(rec),
                             "distinct_kernels": len(kernels), "programs_per_launch": progs,
                             "program_launches": sum(n for _, n in rec)})
    hdr = f"{'preset':<8} {'d':>4} {'T':>6} {'launches':>9} {'kernels':>8}  programs per launch"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['preset']:<8} {r['D']:>4} {r['T']:>6} {r['launches']:>9} {r['distinct_kernels']:>8}  "
              f"{', '.join(str(x) for x in r['programs_per_launch'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mode": "count", "label": args.label, "B": B, "H": H, "chunk_size": C, "expansion": 4,
            "method": "interpreter launch entry wrapped (records kernel name and grid, skips the body); "
                      "chunk_miras_mlp forward + autograd backward on meta tensors"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.count:
        if args.out == "bench_results/kernels_mlp.json":
            args.out = "bench_results/kernels_mlp_count.json"
        return count_main(args)
    if args.quick:
        # must precede the first triton import
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from miras_kernels import MirasSpec, miras_memory, supports
    from miras_kernels.miras_mlp import chunk_miras_mlp

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p not in PRESETS:
            raise ValueError(f"--presets: {p!r} is not an MLP preset (choose from {', '.join(PRESETS)})")
    if args.quick:
        dev, dtype, B, H, D, e, C = "cpu", torch.float32, 1, 2, 16, 2, 16
        lens = [32]
        reps = args.reps or 1
    else:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device: run on a GPU, or pass --quick for the interpreter check")
        dev, dtype, B, H, D, e, C = "cuda", torch.bfloat16, 4, 16, 64, 4, 64
        lens = [2048, 8192]
        reps = args.reps or 5
    if args.seq_lens:
        lens = [int(x) for x in args.seq_lens.split(",")]

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def inputs(T, spec):
        g = torch.Generator(device="cpu").manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        x = {
            "q": torch.nn.functional.normalize(r(B, T, H, D), dim=-1).to(dev, dtype),
            "k": torch.nn.functional.normalize(r(B, T, H, D), dim=-1).to(dev, dtype),
            "v": r(B, T, H, D).to(dev, dtype),
            "alpha": torch.sigmoid(r(B, T, H) + 3).to(dev),
            "eta": (torch.sigmoid(r(B, T, H)) * 0.1).to(dev),
            "delta": (torch.nn.functional.softplus(r(B, T, H)) + 0.5).to(dev),
            "mu": torch.sigmoid(r(B, T, H) + 1).to(dev),
        }
        shapes = spec.weight_shapes(D, D)
        st = {}
        for n in spec.state_keys():
            base = n[2:] if n.startswith("S_") else n
            val = r(H, *shapes[base]) * (0.01 if n.startswith("S_") else 1.0 / shapes[base][1] ** 0.5)
            if spec.retention == "kl" and not n.startswith("S_"):
                val = val.abs() + 0.1  # Memora keeps log-weights; any finite Z works
            st[n] = val.to(dev)
        for t in list(x.values()) + list(st.values()):
            t.requires_grad_(True)
        return x, st

    def run(fn, x, st, spec):
        y, _ = fn(x["q"], x["k"], x["v"], x["alpha"] if spec.needs_alpha else None, x["eta"], spec=spec,
                  chunk_size=C, delta=x["delta"] if spec.needs_delta else None,
                  mu=x["mu"] if spec.needs_mu else None, initial_state=st)
        leaves = [t for t in list(x.values()) + list(st.values()) if t.requires_grad]
        torch.autograd.grad((y.float() * 0.01).sum(), leaves, allow_unused=True)

    def timed(fn, x, st, spec):
        run(fn, x, st, spec)  # warm-up (compiles the kernels on a GPU)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            run(fn, x, st, spec)
        sync()
        return (time.perf_counter() - t0) / reps * 1e3

    chunked = lambda *a, **k: miras_memory(*a, backend="chunked", **k)  # noqa: E731
    try:
        from miras_kernels.miras_linear import chunk_miras_linear
    except Exception as err:  # the linear kernels are another helper's; report, don't fail
        chunk_miras_linear = None
        print(f"note: miras_kernels.miras_linear unavailable ({err}); gated-delta column empty")

    rows = []
    for T in lens:
        gd_spec = MirasSpec.preset("gated_delta")
        gd_ms = None
        if chunk_miras_linear is not None:
            x, st = inputs(T, gd_spec)
            try:
                gd_ms = timed(chunk_miras_linear, x, {"W": torch.zeros(H, D, D, device=dev, requires_grad=True)}, gd_spec)
            except ValueError as err:  # e.g. the linear family ships no config for the quick shapes
                print(f"note: gated-delta reference skipped at T={T}: {err}")
        for name in presets:
            spec = MirasSpec.preset(name, expansion=e)
            x, st = inputs(T, spec)
            ok, why = supports(spec, x["q"], chunk_size=C, initial_state=st)
            tri = timed(chunk_miras_mlp, x, st, spec) if ok else None
            ch = timed(chunked, x, st, spec)
            rows.append({"preset": name, "T": T, "triton_ms": tri, "chunked_ms": ch,
                         "gated_delta_triton_ms": gd_ms, "triton_status": "ok" if ok else f"fallback: {why}",
                         "speedup_vs_chunked": (ch / tri) if tri else None,
                         "tokens_per_s_triton": (B * T / tri * 1e3) if tri else None})

    hdr = f"{'preset':<9} {'T':>6} {'triton ms':>10} {'chunked ms':>11} {'x chunked':>9} {'gdelta ms':>10}  status"
    print(hdr)
    print("-" * len(hdr))
    fmt = lambda v, w, p=2: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    for r in rows:
        print(f"{r['preset']:<9} {r['T']:>6} {fmt(r['triton_ms'], 10)} {fmt(r['chunked_ms'], 11)} "
              f"{fmt(r['speedup_vs_chunked'], 9)} {fmt(r['gated_delta_triton_ms'], 10)}  {r['triton_status']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
            "mode": "quick" if args.quick else "gpu", "B": B, "H": H, "D": D, "expansion": e,
            "chunk_size": C, "dtype": str(dtype), "reps": reps}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
