"""Ahead-of-time compile report for the shipped Triton kernel configurations (no GPU needed).

For every config in ``miras_kernels.configs.LINEAR_SHIPPED`` (``--family mlp``: every entry of
``miras_kernels.miras_mlp.aot.aot_specs``, built from the configs' MLP section; ``--family drivers``:
every chunk-loop driver candidate of ``aot.driver_specs``, each row marked ``shipped`` where
``configs.MLP_DRIVER_SHIPPED`` runs it on that arch, else ``candidate``, whose spills are reported but
do not fail the run, since a launch there takes the per-phase path) and every compile
variant of its kernel, compile
for sm_80 (A100) and sm_90 (H100) with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
run the bundled ``ptxas -v`` on the PTX for registers and spill bytes, read shared memory from
``metadata.shared``, and check every ``tt.dot`` in the TTIR (fp32 operands, all dims >= 16).
Prints a table (and writes JSON with ``--out``); exits 1 on any compile error, spill, shared
memory over the limit (A100 164 KiB, H100 227 KiB) or dot violation.

    python tools/kernel_report.py [--arch 80 90] [--kernel chunk_bwd_dqg] [--jobs 2] [--out report.json] [--md report.md]

Arguments are specialised as a launch specialises them (``miras_kernels.common.launch_spec``):
pointers 16-byte aligned, integers from the shipped 340M launch (``LAUNCH_INTS``) unless the kernel
lists them in ``do_not_specialize``; fp32 dots compile as TF32 (the training default).

Must not run under TRITON_INTERPRET=1 (the interpreter replaces compilation): the script clears
it and re-executes itself when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024}
# Code variants compiled per config: the heaviest one of its learner class (huber: most live
# values of the biases; dot/l2/lp generate a subset of its tiles), decay gates, varlen.
CHUNK_VARIANTS = {"gd": {"gd-huber": dict(BIAS=3, MOMENTUM=False)},
                  "momentum": {"mom-huber": dict(BIAS=3, MOMENTUM=True)}}
RECURRENT_VARIANTS = {"mom-huber-lq": dict(BIAS=3, MOMENTUM=True, RET=1),
                      "mom-huber-kl": dict(BIAS=3, MOMENTUM=True, RET=2),
                      "gd-l2-retained": dict(BIAS=1, MOMENTUM=False, RET=0, RETAINED=True)}
# the exact delta rule (kernels/miras_linear/chunk_exact_kernels.py): the WY kernels in both step_at orders
EXACT_VARIANTS = {"delta_wy_fwd": {"previous": dict(RETAINED=False), "retained": dict(RETAINED=True)},
                  "delta_wy_bwd_da": {"delta": dict(RETAINED=False)},  # RETAINED only in the gates
                  "delta_wy_bwd_dk": {"previous": dict(RETAINED=False), "retained": dict(RETAINED=True)},
                  "delta_state": {"delta": {}}, "delta_bwd_dstate": {"delta": {}}}


# lq/kl (kernels/miras_linear/chunk_mat_kernels.py): the state pass and the dk launch get their
# MAT / LOCAL_DU variants; the per-token sweeps are compiled for every padded key width (their
# tile spans all of it) and both retentions.
MAT_NAMES = {1: "lq", 2: "kl"}
# step_at="retained" with mini-batch GD (decay, lq): the RETAINED variants of the kernels that
# take or differentiate the residual (state pass, state adjoints, the dk launch)


def variants_of(cfg) -> dict:
    if cfg.kernel == "recurrent_fwd":
        return RECURRENT_VARIANTS
    if cfg.kernel in EXACT_VARIANTS:
        return EXACT_VARIANTS[cfg.kernel]
    from miras_kernels.configs import linear_retained_shipped

    base = CHUNK_VARIANTS[cfg.learner]
    (bname, bvar), = base.items()
    if not linear_retained_shipped(cfg.learner, cfg.BT):
        # the retained variants are not shipped at this (learner, chunk): GPUs fall back (dispatch)
        return {n: v for n, v in _chunk_variants(cfg, bname, bvar).items() if not n.endswith("-ret")} or base
    return _chunk_variants(cfg, bname, bvar)


def _chunk_variants(cfg, bname: str, bvar: dict) -> dict:
    """Every compiled variant of a mini-batch chunk kernel config (retained ones included)."""
    base = {bname: bvar}
    if cfg.kernel == "chunk_state":
        return {bname: bvar, **{f"{bname}-{n}": dict(bvar, MAT=m) for m, n in MAT_NAMES.items()},
                f"{bname}-ret": dict(bvar, RETAINED=True), f"{bname}-lq-ret": dict(bvar, MAT=1, RETAINED=True)}
    if cfg.kernel == "chunk_bwd_dstate":
        return {bname: bvar, f"{bname}-ret": dict(bvar, RETAINED=True)}
    if cfg.kernel == "chunk_bwd_dkv":
        return {bname: bvar, f"{bname}-local": dict(bvar, LOCAL_DU=True), f"{bname}-ret": dict(bvar, RETAINED=True),
                f"{bname}-local-lq-ret": dict(bvar, LOCAL_DU=True, RETAINED=True, LQ=True)}
    if cfg.kernel in ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk"):
        return {f"{bname}-{n}": dict(bvar, MAT=m, BKP=cfg.BK) for m, n in MAT_NAMES.items()}
    if cfg.kernel == "chunk_bwd_dstate_mat":
        return {**{f"{bname}-{n}": dict(bvar, MAT=m, HAS_DY=m == 1) for m, n in MAT_NAMES.items()},
                f"{bname}-lq-ret": dict(bvar, MAT=1, HAS_DY=True, RETAINED=True)}
    return base


_DOT_RE = re.compile(r"tt\.dot\s[^\n]*?:\s*tensor<([0-9x]+)x(\w+)>\s*\*\s*tensor<([0-9x]+)x(\w+)>")


def _kernel_fn(kernel: str):
    if kernel == "chunk_state":
        from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_state_kernel as fn
    elif kernel == "chunk_out":
        from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_out_kernel as fn
    elif kernel == "chunk_bwd_du":
        from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_bwd_du_kernel as fn
    elif kernel == "chunk_bwd_dstate":
        from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_bwd_dstate_kernel as fn
    elif kernel in ("chunk_bwd_dqg", "chunk_bwd_dkv", "chunk_bwd_dgate", "chunk_bwd_dmu"):
        from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_bwd_grads_kernel as fn
    elif kernel == "chunk_scan_fwd":
        from miras_kernels.miras_linear.chunk_mat_kernels import miras_linear_chunk_scan_fwd_kernel as fn
    elif kernel in ("chunk_scan_bwd", "chunk_scan_bwd_dk"):
        from miras_kernels.miras_linear.chunk_mat_kernels import miras_linear_chunk_scan_bwd_kernel as fn
    elif kernel == "chunk_bwd_dstate_mat":
        from miras_kernels.miras_linear.chunk_mat_kernels import miras_linear_chunk_bwd_dstate_mat_kernel as fn
    elif kernel.startswith("delta_"):
        from miras_kernels.miras_linear import chunk_exact_kernels

        fn = getattr(chunk_exact_kernels, f"miras_{kernel}_kernel")
    else:
        from miras_kernels.miras_linear.fused_recurrent import miras_linear_recurrent_fwd_kernel as fn
    return fn


def _signature(fn, constexprs: dict) -> dict:
    """Argument types as a bf16 training launch passes them."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("T", "H", "CS", "NTOK") or (name in ("K", "V") and name not in constexprs):
            sig[name] = "i32"
        elif name in ("p", "qexp", "lq_eps", "c"):
            sig[name] = "fp32"
        elif name in ("q", "k", "v", "y", "dy"):
            sig[name] = "*bf16"
        elif name in ("cu_seqlens", "chunk_offsets", "chunk_indices"):
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32"
    return sig


# value dim the chunk kernels are compiled with: the largest covered (the huber state pass loops
# over all V / BV value blocks; registers depend on the block, not the trip count)
CHUNK_V = 128


# Integer values of a shipped training launch (the 340M presets: 16 heads of 64, micro batch 8 x
# 4096 tokens, chunk 64), from which a launch specialises the integers a kernel does not list in
# do_not_specialize (== 1: a constant; % 16 == 0: divisibility 16). The linear chunk kernels list
# all of theirs (common.linear_blocks.RUNTIME_INTS); the recurrent kernel's T, H and CS are
# specialised from these values (a decoding call with T == 1 or CS == 1 compiles another variant).
LAUNCH_INTS = dict(T=4096, H=16, K=64, V=64, NTOK=8 * 4096, CS=64)
# fp32 dots as training compiles them (miras_kernels.common.precision: tf32 unless MIRAS_EXACT_FP32=1)
TRAIN_DOT_PRECISION = "tf32"


def specialise(fn, sig: dict, consts: dict) -> tuple[dict, dict, dict, list[str]]:
    """``(signature, constexprs, attrs, names turned into the constant 1)`` as a launch with
    :data:`LAUNCH_INTS` compiles ``fn``: 16-byte aligned pointers, integers specialised unless
    ``do_not_specialize`` (``miras_kernels.common.launch_spec.launch_specialization``)."""
    from miras_kernels.common.launch_spec import launch_specialization

    sig, ones, attrs = launch_specialization(fn, sig, LAUNCH_INTS)
    return sig, {**consts, **ones}, attrs, sorted(ones)


def triton_version() -> str:
    import triton

    return triton.__version__


def _constexprs(kernel: str, cfg, variant: dict) -> dict:
    if kernel.startswith("delta_"):
        # exact delta rule: runtime head dims, decay gates, varlen, initial state / final-state adjoint
        c = dict(BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, HAS_ALPHA=True, IS_VARLEN=True, **variant)
        if kernel == "delta_state":
            c["USE_H0"] = True
        if kernel == "delta_bwd_dstate":
            c["USE_DHT"] = True
        return c
    c = dict(K=cfg.BK, V=cfg.BV, BK=cfg.BK, BV=cfg.BV, EPS=1e-6, HAS_ALPHA=True, IS_VARLEN=True, USE_H0=True)
    c.update(variant)
    if kernel.startswith("chunk_"):
        del c["K"], c["V"]  # runtime head dims
    if kernel == "chunk_state":
        c.setdefault("MAT", 0)
        c.setdefault("RETAINED", False)
        # huber and lq (non-dot) loop over every value block in one program per head
        c.update(BT=cfg.BT, NVB=CHUNK_V // cfg.BV if variant.get("BIAS") == 3 or c["MAT"] == 1 else 1)
    elif kernel in ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk"):
        c.update(BT=cfg.BT)
        if kernel != "chunk_scan_fwd":
            c["PART"] = int(kernel == "chunk_scan_bwd_dk")
        for n in ("K", "V", "BK", "USE_H0"):
            c.pop(n, None)
    elif kernel == "chunk_bwd_dstate_mat":
        c.update(BT=cfg.BT, USE_DHT=True, NVB=CHUNK_V // cfg.BV if variant["MAT"] == 1 else 1)
        c.setdefault("RETAINED", False)
        c.pop("USE_H0")
    elif kernel == "chunk_out":
        c.update(BT=cfg.BT)
        c.pop("USE_H0")
    elif kernel == "chunk_bwd_du":
        c = {n: val for n, val in c.items() if n in ("BK", "BV", "HAS_ALPHA", "MOMENTUM", "IS_VARLEN")}
        c.update(BT=cfg.BT)
    elif kernel == "chunk_bwd_dstate":
        c.update(BT=cfg.BT, USE_DHT=True)
        c.setdefault("RETAINED", False)
        c.pop("USE_H0")
    elif kernel in ("chunk_bwd_dqg", "chunk_bwd_dkv", "chunk_bwd_dgate", "chunk_bwd_dmu"):
        c.update(BT=cfg.BT, PART={"chunk_bwd_dqg": 0, "chunk_bwd_dkv": 1, "chunk_bwd_dgate": 2, "chunk_bwd_dmu": 3}[kernel])
        c.setdefault("LOCAL_DU", False)
        c.setdefault("RETAINED", False)
        c.setdefault("LQ", False)
        c.pop("USE_H0")
    return c


def _describe(fn, sig: dict, attrs: dict, ones: list[str]) -> str:
    """One line: which arguments the launch specialisation touched."""
    aligned = [fn.arg_names[i] for (i,) in attrs if sig[fn.arg_names[i]].startswith("*")]
    div16 = [fn.arg_names[i] for (i,) in attrs if not sig[fn.arg_names[i]].startswith("*")]
    return f"aligned: {len(aligned)} pointers; div16: {','.join(div16) or '-'}; ==1: {','.join(ones) or '-'}"


def check_ttir_dots(ttir: str) -> list[str]:
    """Problems with the ``tt.dot`` ops of a TTIR module: non-fp32 operands or a dim < 16."""
    problems = []
    for m in _DOT_RE.finditer(ttir):
        a_shape, a_ty, b_shape, b_ty = m.groups()
        dims = [int(x) for x in a_shape.split("x")] + [int(x) for x in b_shape.split("x")]
        if a_ty != "f32" or b_ty != "f32":
            problems.append(f"tt.dot operands {a_ty} x {b_ty} (must be f32)")
        if min(dims) < 16:
            problems.append(f"tt.dot dims {a_shape} x {b_shape} (must be >= 16)")
    return problems


def compile_one(job: tuple) -> dict:
    """Compile one (config, variant, arch); returns a result row."""
    cfg, vname, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=cfg.kernel, config=cfg.label(), variant=vname, arch=f"sm_{arch}",
               registers=None, spill_bytes=None, shared_bytes=None, dots=0, error="", triton=triton.__version__)
    t0 = time.time()
    try:
        fn = _kernel_fn(cfg.kernel)
        consts = _constexprs(cfg.kernel, cfg, variants_of(cfg)[vname])
        if "DOT_PRECISION" in fn.arg_names:
            consts.setdefault("DOT_PRECISION", TRAIN_DOT_PRECISION)
        sig = _signature(fn, consts)
        if cfg.kernel == "chunk_scan_fwd" and consts.get("MAT") == 2:
            sig["out"] = "*bf16"  # kl writes the read in the inputs' dtype
        sig, consts, attrs, ones = specialise(fn, sig, consts)
        row["specialised"] = _describe(fn, sig, attrs, ones)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        row["shared_bytes"] = int(ck.metadata.shared)
        ttir = ck.asm["ttir"]
        row["dots"] = len(_DOT_RE.findall(ttir))
        problems = check_ttir_dots(ttir)
        if ttir.count("tt.dot") != row["dots"]:
            problems.append("unparsed tt.dot in TTIR")
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ck.asm["ptx"])
            gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
            out = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
        row["registers"] = int(regs.group(1)) if regs else None
        row["spill_bytes"] = max(spills) if spills else 0
        if row["spill_bytes"]:
            problems.append(f"spills {row['spill_bytes']} bytes")
        if row["shared_bytes"] > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {row['shared_bytes']} > {SHARED_LIMIT[arch]}")
        row["error"] = "; ".join(problems)
    except Exception as err:  # a compile error is a finding, reported in the table
        row["error"] = f"compile error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def compile_mlp_one(job: tuple) -> dict:
    """One ``miras_kernels.miras_mlp.aot`` entry (the MLP-memory family's shipped list) as a report row."""
    idx, arch = job
    from miras_kernels.miras_mlp import aot

    return _aot_row(aot.aot_specs()[idx], arch, variant="-", shipped=True)


def _aot_row(entry: tuple, arch: int, *, variant: str, shipped: bool) -> dict:
    """Compile one ``aot`` entry (phase kernel or driver) for ``sm_<arch>`` as a report row. A spill
    or shared memory over the card's limit is an error when ``shipped``; otherwise a note (the
    entry is a candidate a launch does not run)."""
    from miras_kernels.miras_mlp import aot
    import triton

    name = entry[3]
    row = dict(kernel=name.split("[")[0], config=name, variant=variant, arch=f"sm_{arch}", registers=None,
               spill_bytes=None, shared_bytes=None, dots=0, error="", note="", triton=triton.__version__)
    t0 = time.time()
    try:
        r = aot.compile_entry(entry, arch)
        row.update(registers=r["registers"], spill_bytes=r["spill_bytes"], shared_bytes=r["shared_bytes"],
                   specialised=f"aligned: {len(r['aligned_args'])} pointers")
        problems = [f"spills {r['spill_bytes']} bytes"] if r["spill_bytes"] else []
        if r["shared_bytes"] > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {r['shared_bytes']} > {SHARED_LIMIT[arch]}")
        if shipped:
            row["error"] = "; ".join(problems)
        elif problems:
            row["note"] = "; ".join(problems) + " (not shipped: the per-phase path runs)"
    except Exception as err:
        row["error"] = f"compile error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    row["seconds"] = round(time.time() - t0, 1)
    return row


def driver_jobs(archs: list[int], kernels: list[str] | None = None) -> list[tuple[int, int]]:
    """``(index into aot.driver_specs(), arch)`` for every driver candidate (optionally only the
    driver kernels named in ``kernels``, e.g. ``mlp_bwd_driver``) on every arch."""
    from miras_kernels.miras_mlp import aot

    return [(i, a) for i, entry in enumerate(aot.driver_specs())
            if kernels is None or entry[3].split("[")[0] in kernels for a in archs]


def driver_shipped(name: str, arch: int) -> bool:
    """Whether ``configs.MLP_DRIVER_SHIPPED`` runs the driver ``name`` (an ``aot.driver_specs``
    name) on ``sm_<arch>``: the same selection as ``aot.driver_specs(arch=arch)``."""
    from miras_kernels.miras_mlp import aot

    return any(entry[3] == name for entry in aot.driver_specs(arch=arch))


def compile_driver_one(job: tuple) -> dict:
    """One chunk-loop driver candidate (``aot.driver_specs``) on one arch as a report row; only a
    shipped driver's spill or shared-memory excess is a failure (a candidate's is a finding)."""
    idx, arch = job
    from miras_kernels.miras_mlp import aot

    entry = aot.driver_specs()[idx]
    shipped = driver_shipped(entry[3], arch)
    return _aot_row(entry, arch, variant="shipped" if shipped else "candidate", shipped=shipped)


def write_markdown(path: str, rows: list[dict]) -> None:
    """The rows as a markdown table under a heading naming the Triton version and the failures."""
    bad = sum(bool(r["error"]) for r in rows)
    lines = [f"# Kernel AOT report (triton {triton_version()})", "",
             f"{len(rows)} compiles, {bad} failing. Launch specialisation: 16-byte aligned pointers, integers "
             f"from LAUNCH_INTS {LAUNCH_INTS} unless do_not_specialize; fp32 dots {TRAIN_DOT_PRECISION}.", "",
             "| kernel | config | variant | arch | regs | spill B | shared B | status |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['config']} | {r['variant']} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes']} | {r['error'] or r.get('note') or 'ok'} |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _run(fn, jobs, n_procs):
    if n_procs > 1:
        with ProcessPoolExecutor(n_procs) as ex:
            return list(ex.map(fn, jobs))
    return [fn(j) for j in jobs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--kernel", nargs="+", default=None,
                    help="only these kernels (miras_kernels.configs.LINEAR_CHUNK_KERNELS, recurrent_fwd; MLP phase names such as mlp_fwd_out)")
    ap.add_argument("--bt", type=int, nargs="+", default=None, help="only these chunk sizes")
    ap.add_argument("--learner", nargs="+", default=None, help="only these learners (gd, momentum)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--family", choices=["linear", "mlp", "drivers", "all"], default="linear",
                    help="linear: miras_kernels.configs.LINEAR_SHIPPED (this report's default); mlp: the phase "
                         "kernels of miras_kernels.miras_mlp.aot; drivers: its chunk-loop driver candidates "
                         "(slow: minutes each); all: linear + mlp")
    ap.add_argument("--out", default=None, help="write the rows as JSON here (every row names the Triton version)")
    ap.add_argument("--md", default=None, help="write a markdown table here (Triton version in its heading)")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET"):
        # the interpreter would replace compilation: re-run in a clean environment
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from miras_kernels.configs import LINEAR_SHIPPED as SHIPPED

    t0 = time.time()
    rows = []
    if args.family in ("linear", "all"):
        cfgs = [c for c in SHIPPED if (args.kernel is None or c.kernel in args.kernel)
                and (args.bt is None or c.BT in args.bt or c.kernel == "recurrent_fwd")
                and (args.learner is None or c.learner in args.learner)]
        rows += _run(compile_one, [(c, v, a) for c in cfgs for v in variants_of(c) for a in args.arch], args.jobs)
    if args.family in ("mlp", "all"):
        from miras_kernels.miras_mlp import aot

        picked = [i for i, entry in enumerate(aot.aot_specs())
                  if args.kernel is None or entry[3].split("[")[0] in args.kernel]
        rows += _run(compile_mlp_one, [(i, a) for i in picked for a in args.arch], args.jobs)
    if args.family == "drivers":
        rows += _run(compile_driver_one, driver_jobs(args.arch, args.kernel), args.jobs)
    # the MLP family's phase names and configs are longer than the linear ones
    kw, cw = max([16] + [len(r["kernel"]) for r in rows]), max([46] + [len(r["config"]) for r in rows])
    head = f"{'kernel':<{kw}} {'config':<{cw}} {'variant':<18} {'arch':<6} {'regs':>5} {'spill':>6} {'shared':>7}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        status = r["error"] or r.get("note") or "ok"
        print(f"{r['kernel']:<{kw}} {r['config']:<{cw}} {r['variant']:<18} {r['arch']:<6} "
              f"{r['registers'] if r['registers'] is not None else '-':>5} "
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>6} "
              f"{r['shared_bytes'] if r['shared_bytes'] is not None else '-':>7}  {status}")
    bad = [r for r in rows if r["error"]]
    print(f"{len(rows)} compiles, {len(bad)} failing, {time.time() - t0:.0f} s (triton {triton_version()}, "
          f"launch specialisation: aligned pointers, integers from LAUNCH_INTS)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        write_markdown(args.md, rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
