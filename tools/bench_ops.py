"""Benchmark of the Miras memory operator: chunked vs recurrent, forward + backward.

    .venv/bin/python tools/bench_ops.py [--quick] [--out bench_results/bench_ops.json]

For every preset and sequence length it times forward + backward (sum(y * g) with a fixed random
cotangent; gradients w.r.t. q, k, v, all gates and the initial state; best of --repeats runs for
the chunked form, one run of the token loop), in wall time and in process CPU time (with one
torch thread the CPU time does not swell while other jobs hold the shared cores, so its speed-up,
printed in brackets, is the robust one on a busy machine), and measures peak
memory in a second run, in a fresh process, as the growth of the peak resident set size (VmHWM in
/proc/self/status, reset through /proc/self/clear_refs after malloc_trim) over the resident size
before the run, with glibc's mmap threshold at 128 KiB so freed tensors leave the RSS (see
_limit_heap_reuse); this counts every allocation torch makes on CPU (tracemalloc would not).
The recurrent form at the longest length is extrapolated linearly from the previous length (it
is a token loop, O(T)) unless --full-recurrent is given. Targets (2-core CPU): chunked >= 10x faster than
recurrent at T=2048 for linear memories, >= 5x for MLP memories; chunked T=8192/T=2048 < 5.

Rows are variants: a preset name, optionally with ``+field=value`` MirasSpec overrides (e.g.
``moneta+retention_chunking=boundary``, the paper's chunk semantics), or ``fla_gated_delta``:
flash-linear-attention's pure-PyTorch Gated DeltaNet references (fla-core's ``naive.py``; the
chunked column is ``naive_chunk_gated_delta_rule``, the recurrent one
``naive_recurrent_gated_delta_rule``), run on the same inputs as the exact ``gated_delta`` row
(``beta = eta``, ``g = log alpha``, query scale 1). Before the fla row is timed, its output and
final state are checked against ``miras_memory`` with the exact gated_delta spec; a row that does
not compute the same function is refused (reported, not timed). Extra targets: the exact chunked
gated_delta at most as slow as fla's naive chunk reference (at T 2048 and 8192).
The bench runs with one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras_kernels import MirasSpec, miras_memory  # noqa: E402

PRESETS = list(MirasSpec.PRESETS)
FLA_LABEL = "fla_gated_delta"
# Gated DeltaNet as published: the per-token rule at every chunk size, step at the retained state
EXACT_GATED_DELTA = "gated_delta+chunk_rule=exact+step_at=retained"
# every preset, with the rows to compare placed next to their base preset
DEFAULT_VARIANTS = ["deltanet", "gated_delta", EXACT_GATED_DELTA, FLA_LABEL, "linear_attn", "gla", "yaad", "titans",
                    "ttt_mlp", "moneta", "moneta+retention_chunking=boundary", "memora",
                    "memora+retention_chunking=boundary"]
FLA_TOL = 1e-4  # float32 inputs, max relative error of output and final state (observed ~1e-6)


@dataclass(frozen=True)
class Variant:
    """One benchmark row: ``label`` as printed, ``spec`` (the semantics timed, or for the fla row
    the spec it must equal) and ``fla`` (time fla's naive references instead of miras_memory)."""

    label: str
    spec: MirasSpec
    fla: bool = False


def parse_variant(text: str) -> Variant:
    """``preset[+field=value...]`` or ``fla_gated_delta`` -> Variant (one-line ValueError otherwise)."""
    if text == FLA_LABEL:
        return Variant(text, parse_variant(EXACT_GATED_DELTA).spec, fla=True)
    name, *over = text.split("+")
    if name not in MirasSpec.PRESETS:
        raise ValueError(f"--presets: unknown preset {name!r} in {text!r}: choose from {', '.join(PRESETS)} "
                         f"or {FLA_LABEL}")
    kinds = {f.name: f.type for f in fields(MirasSpec)}
    kw = {}
    for item in over:
        key, sep, val = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"--presets {text!r}: override {item!r} must be field=value with a MirasSpec field "
                             f"({', '.join(kinds)})")
        kw[key] = float(val) if kinds[key] == "float" else int(val) if kinds[key] == "int" else val
    return Variant(text, MirasSpec.preset(name, **kw))


def parse_variants(text: str) -> list[Variant]:
    """Comma-separated variants; a miras variant whose spec equals an earlier one's is dropped
    (e.g. the exact gated_delta row once the preset itself is exact)."""
    out: list[Variant] = []
    for item in (p for p in text.split(",") if p):
        var = parse_variant(item)
        if not var.fla and any(not o.fla and o.spec == var.spec for o in out):
            continue
        out.append(var)
    return out


def _fla_function(backend: str, chunk: int):
    """fla's naive Gated DeltaNet: the WY chunk form for the chunked column, the token loop for
    the recurrent one (keywords q, k, v, g, beta, scale, initial_state, output_final_state)."""
    from miras_pretrain.testing.fla_reference import fla_naive

    mod = fla_naive("gated_delta_rule")
    if backend == "chunked":
        return partial(mod.naive_chunk_gated_delta_rule, chunk_size=chunk)
    return mod.naive_recurrent_gated_delta_rule


def check_fla_equal(var: Variant, B: int, H: int, D: int, chunk: int) -> str | None:
    """None when both fla references equal miras_memory(var.spec, chunked) on the bench's inputs
    at a short length with a partial last chunk; else the reason (the row is then not timed)."""
    from miras_pretrain.testing.fla_reference import FlaMismatchError, compare_with_fla

    T = 2 * chunk + chunk // 2 + 1
    args, kw = make_inputs(var.spec, B, T, H, D)
    W0 = kw["initial_state"]["W"].detach().expand(B, -1, -1, -1)
    try:
        for backend in ("chunked", "recurrent"):
            compare_with_fla(_fla_function(backend, chunk), *(a.detach() for a in args), spec=var.spec,
                             chunk_size=chunk, backend="chunked", initial_state=W0, scale=1.0, tol=FLA_TOL)
    except FlaMismatchError as exc:
        return str(exc)
    return None


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_peak() -> int:
    """Return freed heap to the OS (else a run reusing an earlier run's freed pages shows no
    growth) and reset the peak-RSS counter; returns the current RSS in bytes (0 if unsupported)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status()["VmRSS"]
    except OSError:
        return 0


def _limit_heap_reuse() -> None:
    """glibc keeps freed heap blocks below its mmap threshold (raised dynamically up to 32 MiB),
    so a run's peak RSS would include earlier runs' fragmentation, not only live tensors. Memory
    probes run in a fresh process with the threshold at 128 KiB: big tensors are mmapped and
    unmapped when freed, so the RSS follows the live bytes. (Timing runs keep the default: the
    small threshold makes allocation ~2x slower.)"""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _probe_memory(argv: list[str]) -> dict[str, int]:
    """Peak memory of every measured row, from ONE fresh subprocess that runs the same loop with
    the small mmap threshold (see _limit_heap_reuse); keys "preset,backend,T"."""
    cmd = [sys.executable, __file__, *argv, "--memory-probe"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3000).stdout
    return json.loads(out.strip().splitlines()[-1])


def plan(presets: list[str], lengths: list[int], full_recurrent: bool):
    """(variant label, T, backend, measured) rows in benchmark order; the recurrent form at the
    longest length is extrapolated (measured=False) unless full_recurrent."""
    for name in presets:
        for T in lengths:
            for backend in ("chunked", "recurrent"):
                yield name, T, backend, not (backend == "recurrent" and T == lengths[-1] and not full_recurrent)


def make_inputs(spec: MirasSpec, B: int, T: int, H: int, D: int, seed: int = 0) -> tuple[list, dict]:
    """Realistic gates: alpha in (0.9, 1), eta = 0.1, mu ~ 0.9, delta ~ 1; l2-normalised q, k."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = torch.nn.functional.normalize(rnd(B, T, H, D), dim=-1)
    k = torch.nn.functional.normalize(rnd(B, T, H, D), dim=-1)
    v = rnd(B, T, H, D)
    alpha = 0.9 + 0.1 * torch.sigmoid(rnd(B, T, H))
    eta = torch.full((B, T, H), 0.1)
    extra = {"delta": 0.5 + torch.rand(B, T, H, generator=g), "mu": 0.85 + 0.1 * torch.rand(B, T, H, generator=g)}
    state = {}
    for name, (r, c) in spec.weight_shapes(D, D).items():
        state[name] = rnd(H, r, c) / c**0.5
    leaves = [q, k, v, alpha, eta, extra["delta"], extra["mu"], *state.values()]
    for t in leaves:
        t.requires_grad_(True)
    return [q, k, v, alpha, eta], {**extra, "initial_state": state}


def run_once(var: Variant, backend: str, T: int, B: int, H: int, D: int, chunk: int) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, peak-RSS growth in bytes) of one forward + backward.
    With one torch thread the CPU time is the time the run got on a core: unlike the wall time
    it does not grow while other jobs hold the (shared) cores."""
    spec = var.spec
    args, kw = make_inputs(spec, B, T, H, D)
    cot = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    if var.fla:
        fla_fn = _fla_function(backend, chunk)
        from miras_pretrain.testing.fla_reference import gated_delta_fla_args
    base = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if var.fla:
        # the same function as miras_memory(spec=exact gated_delta) on these inputs (check_fla_equal);
        # fla's state is W transposed, its query scale is set to 1 like miras_memory's
        h0 = kw["initial_state"]["W"].transpose(-1, -2).expand(B, -1, -1, -1)
        y, _ = fla_fn(**gated_delta_fla_args(*args), scale=1.0, initial_state=h0)
    else:
        y, _ = miras_memory(*args, spec=spec, chunk_size=chunk, backend=backend, **kw)
    (y * cot).sum().backward()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(_proc_status()["VmHWM"] - base, 0) if base else 0
    if not bool(torch.isfinite(y).all()):
        raise RuntimeError(f"non-finite output for {var.label} {backend} T={T}")
    return elapsed, cpu, peak


def _fla_version(variants: list[Variant]) -> str | None:
    """fla-core's version when an fla row is benchmarked (recorded with the numbers)."""
    if not any(v.fla for v in variants):
        return None
    from miras_pretrain.testing.fla_reference import fla_version

    return fla_version()


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x]
    except ValueError:
        lengths = []
    if len(lengths) < 2 or any(t < 1 for t in lengths) or lengths != sorted(set(lengths)):
        raise SystemExit(f"--lengths {text!r}: give at least two increasing positive lengths, e.g. 2048,8192")
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", default="bench_results/bench_ops.json", help="JSON output path")
    parser.add_argument("--presets", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated rows: preset[+field=value...] or {FLA_LABEL}")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 512,2048,8192; "
                        "--quick 32,64)")
    parser.add_argument("--full-recurrent", action="store_true", help="also time recurrent at the longest T")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs of the chunked form (best kept)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variants = parse_variants(args.presets)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    by_label = {v.label: v for v in variants}
    presets = list(by_label)
    if args.quick:
        B, H, D, chunk, lengths = 1, 2, 8, 16, [32, 64]
    else:
        B, H, D, chunk, lengths = 1, 4, 64, 64, [512, 2048, 8192]
    if args.lengths:
        lengths = _parse_lengths(args.lengths)
    # fla rows are timed only when they compute the same function as miras_memory (same check in
    # the memory probe: it is deterministic)
    refused = {v.label: r for v in variants if v.fla and (r := check_fla_equal(v, B, H, D, chunk))}
    timed = [p for p in presets if p not in refused]
    if args.memory_probe:
        _limit_heap_reuse()
        peaks = {}
        for name, T, backend, measured in plan(timed, lengths, args.full_recurrent):
            if measured:
                var = by_label[name]
                run_once(var, "chunked", chunk * 2, B, H, D, chunk)  # same warm-up as timing
                peaks[f"{name},{backend},{T}"] = run_once(var, backend, T, B, H, D, chunk)[2]
        print(json.dumps(peaks))
        return 0
    for label, reason in refused.items():
        print(f"  {label}: REFUSED, not timed: {reason}", flush=True)
    torch.manual_seed(0)
    rows = []
    for name, T, backend, measured in plan(timed, lengths, args.full_recurrent):
        var = by_label[name]
        if not measured:
            prev = next(r for r in rows if r["preset"] == name and r["backend"] == backend and r["T"] == lengths[-2])
            rows.append(dict(preset=name, memory=var.spec.memory, T=T, backend=backend,
                             time_s=prev["time_s"] * T / lengths[-2], cpu_s=prev["cpu_s"] * T / lengths[-2],
                             measured=False))
            continue
        if T == lengths[0] and backend == "chunked":
            run_once(var, "chunked", chunk * 2, B, H, D, chunk)  # warm-up (lazy init, allocator)
        # best of --repeats for the chunked form (cheap; the machine is shared, so single runs are
        # noisy); the slow token loop runs once
        reps = args.repeats if backend == "chunked" else 1
        runs = [run_once(var, backend, T, B, H, D, chunk) for _ in range(reps)]
        t, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append(dict(preset=name, memory=var.spec.memory, T=T, backend=backend, time_s=t, cpu_s=cpu,
                         measured=True))
        print(f"  {name:12s} T={T:5d} {backend:9s} {t:8.3f} s (cpu {cpu:.3f} s)", flush=True)
    if args.no_memory or not timed:
        peaks = {}
    else:
        print("measuring peak memory in a subprocess ...", flush=True)
        probe_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        peaks = _probe_memory(probe_argv)
    for r in rows:
        key = f"{r['preset']},{r['backend']},{r['T']}"
        if key in peaks:
            r["peak_mb"] = peaks[key] / 2**20
        elif not r["measured"] and peaks:  # extrapolated like the time
            prev = next(x for x in rows if x["preset"] == r["preset"] and x["backend"] == r["backend"]
                        and x["T"] == lengths[-2])
            r["peak_mb"] = prev["peak_mb"] * r["T"] / lengths[-2]
        else:
            r["peak_mb"] = float("nan")

    def get(name, T, backend):
        return next(r for r in rows if r["preset"] == name and r["T"] == T and r["backend"] == backend)

    mid, last = lengths[-2], lengths[-1]
    summary = []
    width = max([12] + [len(p) for p in timed])
    print(f"\nforward+backward, B={B} H={H} D={D} chunk={chunk}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; wall seconds (speedup), and in brackets the speedup "
          "in process CPU time (robust when other jobs share the cores); peak = growth of peak RSS; "
          f"'~' = recurrent extrapolated linearly from the previous T; {FLA_LABEL}: fla's naive chunk "
          "reference (chunk column) and naive token loop (rec column), same inputs and function as "
          f"{EXACT_GATED_DELTA}")
    header = f"{'preset':{width}s} {'mem':6s}" + "".join(
        f" | T={T:<5d} chunk s  rec s    speedup  (cpu)  chunk MiB rec MiB" for T in lengths) + f" | T{last}/T{mid}"
    print(header)
    for name in timed:
        memory = by_label[name].spec.memory
        line = f"{name:{width}s} {memory:6s}"
        entry = {"preset": name, "memory": memory}
        for T in lengths:
            c, r = get(name, T, "chunked"), get(name, T, "recurrent")
            sp, sp_cpu = r["time_s"] / c["time_s"], r["cpu_s"] / c["cpu_s"]
            mark = "" if r["measured"] else "~"
            line += (f" | {'':7s} {c['time_s']:7.3f} {mark + format(r['time_s'], '.2f'):>8s} {sp:7.1f}x"
                     f" ({sp_cpu:4.1f}x) {c['peak_mb']:9.1f} {mark + format(r['peak_mb'], '.0f'):>7s}")
            entry[f"speedup_T{T}"] = sp
            entry[f"cpu_speedup_T{T}"] = sp_cpu
        ratio = get(name, last, "chunked")["time_s"] / get(name, mid, "chunked")["time_s"]
        entry[f"chunked_ratio_T{last}_over_T{mid}"] = ratio
        entry[f"chunked_cpu_ratio_T{last}_over_T{mid}"] = (
            get(name, last, "chunked")["cpu_s"] / get(name, mid, "chunked")["cpu_s"])
        line += f" | {ratio:6.2f}"
        summary.append(entry)
        print(line)
    # Comparisons of equal functions: the exact gated delta rule vs fla's chunk reference, and the
    # paper's boundary chunking of Moneta/Memora vs their per-token default (chunked columns).
    comparisons = []
    exact_spec = parse_variant(EXACT_GATED_DELTA).spec
    exact = next((p for p in timed if not by_label[p].fla and by_label[p].spec == exact_spec), None)
    pairs = [(exact, FLA_LABEL)] + [(f"{m}+retention_chunking=boundary", m) for m in ("moneta", "memora")]
    for a, b in pairs:
        if a in timed and b in timed:
            for T in lengths:
                ca, cb = get(a, T, "chunked"), get(b, T, "chunked")
                comparisons.append(dict(row=a, versus=b, T=T, time_ratio=ca["time_s"] / cb["time_s"],
                                        cpu_ratio=ca["cpu_s"] / cb["cpu_s"]))
    if comparisons:
        print("\nchunked time of row / chunked time of versus (< 1: row is faster), wall (cpu):")
        for c in comparisons:
            print(f"  {c['row']} / {c['versus']} T={c['T']}: {c['time_ratio']:.2f} ({c['cpu_ratio']:.2f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": dict(B=B, H=H, D=D, chunk=chunk, lengths=lengths, quick=args.quick,
                       threads=torch.get_num_threads(), torch=torch.__version__, chunked_repeats=args.repeats,
                       machine=platform.machine(), cpus=os.cpu_count(),
                       load_average=os.getloadavg(), variants=presets, fla_core=_fla_version(variants),
                       memory_method=("peak RSS growth over RSS before the run, in a fresh process per row with glibc "
                                      "M_MMAP_THRESHOLD=128KiB (VmHWM reset by clear_refs=5 after malloc_trim)")),
        "rows": rows,
        "summary": summary,
        "comparisons": comparisons,
        "refused": refused,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
