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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miras_kernels import MirasSpec, miras_memory  # noqa: E402

PRESETS = list(MirasSpec.PRESETS)


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
    """(preset, T, backend, measured) rows in benchmark order; the recurrent form at the longest
    length is extrapolated (measured=False) unless full_recurrent."""
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


def run_once(spec: MirasSpec, backend: str, T: int, B: int, H: int, D: int, chunk: int) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, peak-RSS growth in bytes) of one forward + backward.
    With one torch thread the CPU time is the time the run got on a core: unlike the wall time
    it does not grow while other jobs hold the (shared) cores."""
    args, kw = make_inputs(spec, B, T, H, D)
    cot = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    base = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    y, _ = miras_memory(*args, spec=spec, chunk_size=chunk, backend=backend, **kw)
    (y * cot).sum().backward()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(_proc_status()["VmHWM"] - base, 0) if base else 0
    if not bool(torch.isfinite(y).all()):
        raise RuntimeError(f"non-finite output for {spec} {backend} T={T}")
    return elapsed, cpu, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out", default="bench_results/bench_ops.json", help="JSON output path")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--full-recurrent", action="store_true", help="also time recurrent at the longest T")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs of the chunked form (best kept)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in MirasSpec.PRESETS:
            raise SystemExit(f"--presets: unknown preset {p!r}: choose from {', '.join(PRESETS)}")
    if args.quick:
        B, H, D, chunk, lengths = 1, 2, 8, 16, [32, 64]
    else:
        B, H, D, chunk, lengths = 1, 4, 64, 64, [512, 2048, 8192]
    if args.memory_probe:
        _limit_heap_reuse()
        peaks = {}
        for name, T, backend, measured in plan(presets, lengths, args.full_recurrent):
            if measured:
                spec = MirasSpec.preset(name)
                run_once(spec, "chunked", chunk * 2, B, H, D, chunk)  # same warm-up as timing
                peaks[f"{name},{backend},{T}"] = run_once(spec, backend, T, B, H, D, chunk)[2]
        print(json.dumps(peaks))
        return 0
    torch.manual_seed(0)
    rows = []
    for name, T, backend, measured in plan(presets, lengths, args.full_recurrent):
        spec = MirasSpec.preset(name)
        if not measured:
            prev = next(r for r in rows if r["preset"] == name and r["backend"] == backend and r["T"] == lengths[-2])
            rows.append(dict(preset=name, memory=spec.memory, T=T, backend=backend,
                             time_s=prev["time_s"] * T / lengths[-2], cpu_s=prev["cpu_s"] * T / lengths[-2],
                             measured=False))
            continue
        if T == lengths[0] and backend == "chunked":
            run_once(spec, "chunked", chunk * 2, B, H, D, chunk)  # warm-up (lazy init, allocator)
        # best of --repeats for the chunked form (cheap; the machine is shared, so single runs are
        # noisy); the slow token loop runs once
        reps = args.repeats if backend == "chunked" else 1
        runs = [run_once(spec, backend, T, B, H, D, chunk) for _ in range(reps)]
        t, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append(dict(preset=name, memory=spec.memory, T=T, backend=backend, time_s=t, cpu_s=cpu, measured=True))
        print(f"  {name:12s} T={T:5d} {backend:9s} {t:8.3f} s (cpu {cpu:.3f} s)", flush=True)
    if args.no_memory:
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
    print(f"\nforward+backward, B={B} H={H} D={D} chunk={chunk}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; wall seconds (speedup), and in brackets the speedup "
          "in process CPU time (robust when other jobs share the cores); peak = growth of peak RSS; "
          "'~' = recurrent extrapolated linearly from the previous T")
    header = f"{'preset':12s} {'mem':6s}" + "".join(
        f" | T={T:<5d} chunk s  rec s    speedup  (cpu)  chunk MiB rec MiB" for T in lengths) + f" | T{last}/T{mid}"
    print(header)
    for name in presets:
        line = f"{name:12s} {MirasSpec.preset(name).memory:6s}"
        entry = {"preset": name, "memory": MirasSpec.preset(name).memory}
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": dict(B=B, H=H, D=D, chunk=chunk, lengths=lengths, quick=args.quick,
                       threads=torch.get_num_threads(), torch=torch.__version__, chunked_repeats=args.repeats,
                       machine=platform.machine(), cpus=os.cpu_count(),
                       load_average=os.getloadavg(),
                       memory_method=("peak RSS growth over RSS before the run, in a fresh process per row with glibc "
                                      "M_MMAP_THRESHOLD=128KiB (VmHWM reset by clear_refs=5 after malloc_trim)")),
        "rows": rows,
        "summary": summary,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
