"""Benchmark the Triton linear-memory Miras kernels: forward+backward time and peak memory vs the
PyTorch chunked path (and flash-linear-attention's chunk_gated_delta_rule when ``fla`` is
installed).

    python tools/bench_kernels.py [--out bench_results/bench_kernels.json]   # CUDA: B=4 H=16 D=128 bf16
    python tools/bench_kernels.py --quick                                    # CPU interpreter, tiny shapes
    python tools/bench_kernels.py --specs gated_delta gated_delta+bias=huber+learner=momentum \
        --chunk-size 16 32 64 --dims 128x128 64x128                           # any covered config

A spec is a ``MirasSpec`` preset name with optional ``+field=value`` overrides; ``--dims`` are
``dkxdv`` pairs. Every (spec, chunk size, dims, T) is one row.

Prints a table and writes JSON. fla's ``chunk_gated_delta_rule`` (GPU only) is timed beside the
``gated_delta`` rows only after :func:`fla_timing` has checked that it computes the same function
as ``miras_memory`` on the row's inputs (``beta = eta``, ``g = log alpha``, query scale 1, on the
first ``FLA_CHECK_T`` tokens in float32); otherwise the row records why it was refused and no fla
time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

FLA_NOTE = ("note: fla chunk_gated_delta_rule is timed only where its output and final state equal miras_memory's "
            "(beta = eta, g = log alpha, scale 1; checked on the first FLA_CHECK_T tokens in float32): "
            "else fla_refused")
# tokens of the equality check before fla is timed, and its tolerance (max relative error of output
# and final state, float32): TF32 dots on a GPU (both fla's kernels and ours unless
# MIRAS_EXACT_FP32=1) give ~1e-3; exact fp32 on CPU ~1e-6
FLA_CHECK_T = 256
FLA_TOL_CUDA = 1e-2
FLA_TOL_CPU = 1e-4


def fla_timing(fla_fn, x: dict, spec, chunk_size: int, device: str, reps: int, tol: float | None = None) -> dict:
    """Time ``fla_fn`` (fwd + bwd) on the row's inputs only if it computes the same function.

    Args:
        fla_fn: fla's gated delta rule, called with keywords ``q, k, v, g, beta, scale,
            initial_state, output_final_state`` (``chunk_gated_delta_rule`` on a GPU; its naive
            reference in the CPU tests).
        x: the row's leaves: ``q, k [B, T, H, dk]``, ``v [B, T, H, dv]``, ``alpha, eta [B, T, H]``.
        spec: the row's MirasSpec (the gated-delta preset); chunk_size: its C.
        device: ``"cuda"`` or ``"cpu"`` (picks the tolerance unless ``tol`` is given); reps: timing runs.
    Returns:
        ``{"fla_ms", "fla_peak_mib", "fla_check_rel_err"}`` when equal, else ``{"fla_refused": reason}``.
    """
    from miras_pretrain.testing.fla_reference import FlaMismatchError, compare_with_fla, gated_delta_fla_args

    n = min(x["q"].shape[1], FLA_CHECK_T)
    pre = {name: t.detach()[:, :n].float() for name, t in x.items()}
    alpha = pre["alpha"] if spec.needs_alpha else None
    tol = tol if tol is not None else (FLA_TOL_CUDA if device == "cuda" else FLA_TOL_CPU)
    try:
        # the miras side runs what the row times on this device: the Triton kernels where they
        # cover the call (backend "auto" on CUDA), the chunked PyTorch path otherwise
        err = compare_with_fla(fla_fn, pre["q"], pre["k"], pre["v"], alpha, pre["eta"], spec=spec,
                               chunk_size=chunk_size, backend="auto", scale=1.0, tol=tol)
    except FlaMismatchError as exc:
        return {"fla_refused": str(exc)}

    def fla_call(x):
        a = x["alpha"] if spec.needs_alpha else None
        return fla_fn(**gated_delta_fla_args(x["q"], x["k"], x["v"], a, x["eta"]), scale=1.0)[0]

    ms, peak, _ = _timed(_fwd_bwd(fla_call, x), device, reps)
    return {"fla_ms": ms, "fla_peak_mib": peak, "fla_check_rel_err": err}


def _inputs(B, T, H, dk, dv, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g)
    alpha = torch.sigmoid(torch.randn(B, T, H, generator=g) + 3.0)
    eta = torch.sigmoid(torch.randn(B, T, H, generator=g))
    delta = 0.5 + torch.rand(B, T, H, generator=g)
    mu = 0.9 * torch.sigmoid(torch.randn(B, T, H, generator=g))
    out = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), alpha=alpha, eta=eta, delta=delta, mu=mu)
    return {n: t.to(device).requires_grad_() for n, t in out.items()}


def parse_spec(text: str):
    """``preset[+field=value...]`` -> MirasSpec (e.g. ``gated_delta+bias=huber+learner=momentum``).

    The delta-rule presets are exact (``chunk_rule="exact"``, gated_delta also ``step_at="retained"``),
    which exists only for the delta rule; a variant that overrides bias/retention/learner away
    from it is the grid's mini-batch point (``chunk_rule="minibatch"``, ``step_at="previous"``, what
    the Triton chunk kernels compute for it) unless it sets those fields itself."""
    from miras_kernels import MirasSpec

    name, *over = text.split("+")
    kw = {}
    for item in over:
        key, sep, val = item.partition("=")
        if not sep:
            raise ValueError(f"--specs {text!r}: override {item!r} must be field=value")
        kw[key] = float(val) if key in ("p", "q", "c", "lq_eps", "huber_eps") else val
    if name in MirasSpec.PRESETS and "chunk_rule" not in kw:
        grid = {f: kw.get(f, MirasSpec.PRESETS[name].get(f)) for f in ("memory", "bias", "retention", "learner")}
        if not MirasSpec(**grid).exact_chunking_exists:
            kw = {"chunk_rule": "minibatch", "step_at": kw.get("step_at", "previous"), **kw}
    return MirasSpec.preset(name, **kw)


def parse_dims(text: str) -> tuple[int, int]:
    dk, sep, dv = text.partition("x")
    if not sep or not dk.isdigit() or not dv.isdigit():
        raise ValueError(f"--dims {text!r}: use DKxDV, e.g. 128x64")
    return int(dk), int(dv)


def _timed(fn, device, reps):
    """(ms per call, peak MiB above the start, outputs of the last call) of fn() (fwd + bwd)."""
    import torch

    fn()  # warm-up (compiles kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = None
    return (time.perf_counter() - t0) * 1e3 / reps, peak, out


def _fwd_bwd(call, x):
    def run():
        for t in x.values():
            t.grad = None
        y = call(x)
        y.float().square().mean().backward()
        return [y.detach()] + [t.grad.detach().clone() for t in x.values() if t.grad is not None]

    return run


def _max_rel_err(a, b) -> float:
    return max(((u.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item() for u, w in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Triton vs PyTorch chunked Miras linear memory (fwd+bwd)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU shapes in the Triton interpreter")
    ap.add_argument("--out", default="bench_results/bench_kernels.json")
    ap.add_argument("--specs", nargs="+", default=None,
                    help="preset[+field=value...] (default: the three linear presets and gated_delta with lp, "
                         "huber, momentum, lp + lq retention (linear Moneta) and kl retention (linear Memora))")
    ap.add_argument("--T", type=int, nargs="+", default=None)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=None, help="default 64 (GPU), 16 and 64 (--quick)")
    ap.add_argument("--dims", nargs="+", default=None, help="DKxDV head dims (default 128x128; --quick 16x16 64x32)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)

    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import miras_kernels
    from miras_kernels import miras_memory

    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("no CUDA device: run with --quick (Triton interpreter) or on a GPU machine")
    if args.quick:
        B, H, dtype, Ts, reps = 1, 2, torch.float32, args.T or [70], args.reps or 1
        specs = args.specs or ["gated_delta", "gated_delta+bias=huber+learner=momentum"]
        cs = args.chunk_size or [16, 64]
        dims = args.dims or ["16x16", "64x32"]
    else:
        B, H, dtype, Ts, reps = 4, 16, torch.bfloat16, args.T or [2048, 4096, 8192, 16384], args.reps or 5
        specs = args.specs or ["gated_delta", "gla", "deltanet", "gated_delta+bias=lp",
                               "gated_delta+bias=huber", "gated_delta+learner=momentum",
                               "gated_delta+bias=lp+retention=lq", "gated_delta+retention=kl"]
        cs = args.chunk_size or [64]
        dims = args.dims or ["128x128"]
    dims = [parse_dims(d) for d in dims]
    grid = [(C, dk, dv) for C in cs for dk, dv in dims]
    if args.quick and args.specs is None and args.chunk_size is None and args.dims is None:
        # smoke test, kept short: the gated-delta preset at C=16 and the heaviest variant (huber +
        # momentum, several key/value blocks) at C=64
        runs = [(specs[0], 16, 16, 16), (specs[1], 64, 64, 32)]
    else:
        runs = [(name, C, dk, dv) for name in specs for C, dk, dv in grid]
    from miras_kernels.miras_linear import chunk_miras_linear

    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        fla_missing = ""
    except ImportError as exc:  # recorded in the gated_delta rows on a GPU: why there is no fla time
        chunk_gated_delta_rule, fla_missing = None, f"fla's chunk_gated_delta_rule is not importable: {exc}"

    rows = []
    for name, C, dk, dv in runs:
        spec = parse_spec(name)
        for T in Ts:
            x = _inputs(B, T, H, dk, dv, dtype, device)
            row = dict(preset=name, B=B, T=T, H=H, dk=dk, dv=dv, C=C, dtype=str(dtype).replace("torch.", ""))
            kw = dict(spec=spec, chunk_size=C)

            def gates(x):
                return dict(delta=x["delta"] if spec.needs_delta else None, mu=x["mu"] if spec.needs_mu else None)

            alpha_of = (lambda x: x["alpha"]) if spec.needs_alpha else (lambda x: None)

            def chunked(x):
                return miras_memory(x["q"], x["k"], x["v"], alpha_of(x), x["eta"], **kw, **gates(x),
                                    backend="chunked")[0]

            def triton_path(x):
                return chunk_miras_linear(x["q"], x["k"], x["v"], alpha_of(x), x["eta"], **kw, **gates(x))[0]

            ok, reason = miras_kernels.supports(spec, x["q"], x["k"], x["v"], chunk_size=C)
            row["chunked_ms"], row["chunked_peak_mib"], ref = _timed(_fwd_bwd(chunked, x), device, reps)
            if ok:
                row["triton_ms"], row["triton_peak_mib"], out = _timed(_fwd_bwd(triton_path, x), device, reps)
                row["max_rel_err"] = _max_rel_err(out, ref)
                row["speedup"] = row["chunked_ms"] / row["triton_ms"]
            else:
                row["triton_ms"] = None
                row["fallback"] = reason
            if name == "gated_delta" and device == "cuda" and dk == dv:
                if chunk_gated_delta_rule is None:
                    row["fla_refused"] = fla_missing
                else:
                    row.update(fla_timing(chunk_gated_delta_rule, x, spec, C, device, reps))
            rows.append(row)
            del x

    cols = ["preset", "T", "C", "dk", "dv", "dtype", "chunked_ms", "triton_ms", "speedup", "fla_ms", "chunked_peak_mib",
            "triton_peak_mib", "max_rel_err"]
    print(f"device: {device}" + ("" if device == "cuda" else " (Triton interpreter: timings say nothing about GPU speed)"))
    print(" ".join(f"{c:>{40 if c == 'preset' else 16}}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c)
            w = 40 if c == "preset" else 16
            cells.append(f"{val:>{w}.4g}" if isinstance(val, float) else f"{str(val if val is not None else '-'):>{w}}")
        print(" ".join(cells) + (f"  fallback: {r['fallback']}" if "fallback" in r else "")
              + (f"  fla refused: {r['fla_refused']}" if "fla_refused" in r else ""))
    print(FLA_NOTE + ("" if chunk_gated_delta_rule is not None else " (fla not installed: column empty)"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=device, fla_available=chunk_gated_delta_rule is not None, note=FLA_NOTE, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
