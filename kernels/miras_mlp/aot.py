"""Ahead-of-time compile descriptions of the shipped MLP-memory kernel configurations.

``aot_specs()`` lists ``(kernel, signature, constexprs, config_name)`` tuples that
``triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
target=GPUTarget("cuda", 80|90, 32), options={"num_warps": aot_num_warps(config_name)})``
compiles without a GPU; ``compile_entry`` does exactly that and reads registers/spills from
``ptxas -v``. ``tools/kernel_report.py`` consumes the same list. Arguments are specialised as a
launch specialises them (``miras_kernels.common.launch_spec``: 16-byte aligned pointers; the only
integers, the chunk ``step`` and the decoding ``pos0``, are ``do_not_specialize`` on the kernels),
and every fp32 ``tl.dot`` is compiled with ``DOT_PRECISION = "tf32"`` (the training default). The
configurations themselves
(shipped triples, hidden blocks, warps per phase) are the MLP section of ``miras_kernels.configs``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from miras_kernels.common.codes import BIAS_CODES
from miras_kernels.common.launch_spec import launch_specialization
from miras_kernels.configs import (MLP_DRIVER_SHIPPED, MLP_NUM_STAGES, MLP_SHIPPED, MLP_SHIPPED_KL,
                                   mlp_driver_variant, mlp_driver_warps, mlp_hidden_block, mlp_phase_warps,
                                   mlp_recurrent_block)
from miras_kernels.miras_mlp.chunk import driver_for
from miras_kernels.miras_mlp.chunk_drivers import DRIVER_PHASES
from miras_kernels.miras_mlp.chunk_kernels import BIAS_KERNELS, BWD_KERNELS, FWD_KERNELS, MOMENTUM_ONLY
from miras_kernels.miras_mlp.chunk_kl_kernels import kl_phases
from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS, LQ_ARG_KERNELS
from miras_kernels.miras_mlp.fused_recurrent import mlp_recurrent_kernel

# Shipped configurations (head dim, expansion, chunk size): miras_kernels.configs.MLP_SHIPPED.
# Variant flags that change the generated code: (bias, momentum).
VARIANTS = [("l2", False), ("huber", False), ("lp", False), ("dot", False), ("l2", True)]
# The l_q retention (q = 4): the lq phase list (chunk_lq_kernels) compiled with LQ=True, as (bias, q,
# momentum): Moneta's lp + gd, and l2 + momentum. ``aot_specs(lq=...)`` selects them.
LQ_VARIANTS = [("lp", 4.0, False), ("l2", 4.0, True)]   # q values: configs.MLP_SHIPPED_LQ_Q
# The kl retention (Memora): the kl phase list (chunk_kl_kernels.kl_phases; shared phases with LQ = REV) as
# (bias, momentum), for the configurations of configs.MLP_SHIPPED_KL: Memora's l2 + gd, and l2 + momentum.
# ``aot_specs(kl=...)`` selects them.
KL_VARIANTS = [("l2", False), ("l2", True)]

# fp32 dots as training compiles them (common.precision.dot_precision() without MIRAS_EXACT_FP32)
TRAIN_DOT_PRECISION = "tf32"
# Integer values a launch passes for the integer arguments it specialises: none (the MLP kernels'
# integers, ``step`` and ``pos0``, change every launch and are ``do_not_specialize``; a new integer
# argument makes launch_specialization ask for its value here).
LAUNCH_INTS: dict[str, int] = {}

_PTR = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "y": "*bf16", "dy": "*bf16",
        "cu": "*i32", "coff": "*i32"}


def _signature(kernel) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in ("H", "D", "E", "BT", "BH", "SW", "C", "BIAS", "MOMENTUM", "REV", "LQ", "LQQ", "DOT_PRECISION"):
            sig[name] = "constexpr"
        elif name in ("p", "lqe", "kc"):
            sig[name] = "fp32"
        elif name in ("pos0", "step", "nt_max"):
            sig[name] = "i32"
        else:
            sig[name] = _PTR.get(name, "*fp32")
    return sig


def aot_num_warps(config_name: str) -> int:
    """Warps used for a config (encoded as the trailing ``wN`` of its name)."""
    m = re.search(r"w(\d+)\]?$", config_name)
    if not m:
        raise ValueError(f"config name {config_name!r} does not end with wN (warps)")
    return int(m.group(1))


def driver_specs(variants=None, shipped=None, lq=None, kl=None, arch: int | None = None) -> list[tuple]:
    """The chunk-loop driver kernels (``chunk_drivers``), forward and backward, for every shipped
    config and code variant (the candidates), as ``(kernel, signature, constexprs, name)``; same
    selection arguments as :func:`aot_specs`. ``arch`` (80 or 90): only the (config, variant) pairs
    that ``configs.MLP_DRIVER_SHIPPED`` ships on ``sm_<arch>`` (what a launch there runs; compile
    them for that arch). Names are tagged like the phases'
    (``mlp_bwd_driver[l2,momentum D64 E256 C64 BH16 w8]``). ``aot_specs`` keeps listing the phase
    kernels (the per-phase path, and the drivers' device functions)."""
    out = []
    for d, e, c in (shipped or MLP_SHIPPED):
        bh = mlp_hidden_block(d, e, c)
        # (bias, momentum, lq, q, kl)
        paths = [(bias, mom, False, 4.0, False) for bias, mom in (variants or VARIANTS)]
        paths += [(bias, mom, True, float(qexp), False) for bias, qexp, mom in (LQ_VARIANTS if lq is None else lq)]
        if (d, e, c) in MLP_SHIPPED_KL:
            paths += [(bias, mom, False, 4.0, True) for bias, mom in (KL_VARIANTS if kl is None else kl)]
        for bias, mom, is_lq, qexp, is_kl in paths:
            variant = mlp_driver_variant(bias, mom, is_lq, is_kl)
            if arch is not None and (arch, d, e, c, variant) not in MLP_DRIVER_SHIPPED:
                continue
            for rev in (False, True):
                dname = driver_for(rev, is_lq, is_kl, mom)
                kern = DRIVER_PHASES[dname][0]
                nw = mlp_driver_warps(dname, d, c)
                cx = {"H": 16, "D": d, "E": d * e, "BT": c, "BH": bh, "SW": max(d, c), "BIAS": BIAS_CODES[bias],
                      "MOMENTUM": mom, "REV": rev, "LQ": rev if is_kl else is_lq, "DOT_PRECISION": TRAIN_DOT_PRECISION,
                      "LQQ": qexp}
                path = ",lq" if is_lq else (",kl" if is_kl else "")
                tag = f"{bias},{'momentum' if mom else 'gd'}{path} D{d} E{d * e} C{c} BH{bh} w{nw}"
                out.append((kern, _signature(kern), cx, f"{dname}[{tag}]"))
    return out


def aot_specs(variants=None, shipped=None, lq=None, kl=None) -> list[tuple]:
    """Every phase kernel x shipped config x code variant, as ``(kernel, signature, constexprs,
    name)``. Inputs are bf16 (the training dtype), state and gates fp32, H = 16. Phases whose code
    does not depend on the bias are listed once per learner (named with the first bias asked).
    ``lq``: the l_q (Moneta) variants ``[(bias, q, momentum), ...]`` (default :data:`LQ_VARIANTS`;
    ``[]`` for none): every phase of the lq path (``chunk_lq_kernels``) with ``LQ=True``, tagged ``,gd,lq`` /
    ``,momentum,lq``. ``kl``: the kl (Memora) variants ``[(bias, momentum), ...]`` (default
    :data:`KL_VARIANTS`; ``[]`` for none): every phase of the kl path (``chunk_kl_kernels.kl_phases``,
    ``LQ = REV``) for the configs in ``configs.MLP_SHIPPED_KL``, tagged ``,gd,kl`` / ``,momentum,kl``.
    The chunk-loop drivers: :func:`driver_specs`."""
    out = []
    seen = set()
    for d, e, c in (shipped or MLP_SHIPPED):
        bh = mlp_hidden_block(d, e, c)
        for bias, mom in (variants or VARIANTS):
            for kname, kern, rev in ([(n, k, False) for n, k in FWD_KERNELS] + [(n, k, True) for n, k in BWD_KERNELS]):
                key = (kname, d, e, c, mom, bias if kname in BIAS_KERNELS else None)
                if key in seen or (kname in MOMENTUM_ONLY and not mom):
                    continue
                seen.add(key)
                nw = mlp_phase_warps(kname, d, c)
                cx = {"H": 16, "D": d, "E": d * e, "BT": c, "BH": bh, "SW": max(d, c), "BIAS": BIAS_CODES[bias],
                      "MOMENTUM": mom, "REV": rev, "LQ": False, "DOT_PRECISION": TRAIN_DOT_PRECISION}
                tag = f"{bias},{'momentum' if mom else 'gd'} D{d} E{d * e} C{c} BH{bh} w{nw}"
                out.append((kern, _signature(kern), cx, f"{kname}[{tag}]"))
        for bias, qexp, mom in (LQ_VARIANTS if lq is None else lq):
            for kname, kern, rev in ([(n, k, False) for n, k in FWD_LQ_KERNELS] + [(n, k, True) for n, k in BWD_LQ_KERNELS]):
                if kname in MOMENTUM_ONLY and not mom:
                    continue
                nw = mlp_phase_warps(kname, d, c, lq=True)
                cx = {"H": 16, "D": d, "E": d * e, "BT": c, "BH": bh, "SW": max(d, c), "BIAS": BIAS_CODES[bias],
                      "MOMENTUM": mom, "REV": rev, "LQ": True, "DOT_PRECISION": TRAIN_DOT_PRECISION}
                if kern in LQ_ARG_KERNELS:
                    cx["LQQ"] = float(qexp)
                tag = f"{bias},{'momentum' if mom else 'gd'},lq D{d} E{d * e} C{c} BH{bh} w{nw}"
                out.append((kern, _signature(kern), cx, f"{kname}[{tag}]"))
        if (d, e, c) in MLP_SHIPPED_KL:
            for bias, mom in (KL_VARIANTS if kl is None else kl):
                for kname, kern, rev in ([(n, k, False) for n, k in kl_phases(False, mom)]
                                         + [(n, k, True) for n, k in kl_phases(True, mom)]):
                    nw = mlp_phase_warps(kname, d, c, lq=rev)
                    cx = {"H": 16, "D": d, "E": d * e, "BT": c, "BH": bh, "SW": max(d, c), "BIAS": BIAS_CODES[bias],
                          "MOMENTUM": mom, "REV": rev, "LQ": rev, "DOT_PRECISION": TRAIN_DOT_PRECISION}
                    tag = f"{bias},{'momentum' if mom else 'gd'},kl D{d} E{d * e} C{c} BH{bh} w{nw}"
                    out.append((kern, _signature(kern), cx, f"{kname}[{tag}]"))
    # decoding kernel: chunk semantics C = 1 (the exact rule) and the shipped training chunk sizes.
    # Retention code RET (common.codes.RETENTION_CODES): 0 none/decay for every (bias, learner)
    # variant; 1 lq for the lq variants (q = LQQ constexpr), tagged " lq<q>"; 2 kl for the kl
    # variants, tagged " kl" (not ",gd,kl": that tag counts the chunk kernels' kl phases). Every
    # shipped config (the decoding kernel is one kernel: no SHIPPED_KL restriction).
    rsig = dict(_signature(mlp_recurrent_kernel), RET="constexpr")
    dec = [(bias, mom, 0, 4.0, "") for bias, mom in (variants or VARIANTS)]
    dec += [(bias, mom, 1, float(qexp), f" lq{qexp:g}") for bias, qexp, mom in (LQ_VARIANTS if lq is None else lq)]
    dec += [(bias, mom, 2, 4.0, " kl") for bias, mom in (KL_VARIANTS if kl is None else kl)]
    for d, e, C in sorted({(d, e, C) for d, e, c in (shipped or MLP_SHIPPED) for C in (1, c)}):
        for bias, mom, ret, qexp, rtag in dec:
            cx = {"H": 16, "D": d, "E": d * e, "BH": mlp_recurrent_block(d, e, ret), "C": C,
                  "BIAS": BIAS_CODES[bias], "MOMENTUM": mom, "RET": ret, "LQQ": qexp}
            tag = f"{bias},{'momentum' if mom else 'gd'}{rtag} D{d} E{d * e} C{C} BH{cx['BH']} w4"
            out.append((mlp_recurrent_kernel, rsig, cx, f"mlp_recurrent[{tag}]"))
    return out


def compile_entry(entry: tuple, arch: int) -> dict:
    """Compile one ``aot_specs`` entry for ``sm_<arch>``; returns registers, spill bytes (stores
    + loads) and static shared memory in bytes. Needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, sig, cx, name = entry
    sig, ones, attrs = launch_specialization(kernel, sig, LAUNCH_INTS)
    src = ASTSource(fn=kernel, signature=sig, constexprs={**cx, **ones}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": aot_num_warps(name), "num_stages": MLP_NUM_STAGES})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ck.asm["ptx"])
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return {"config": name, "arch": f"sm_{arch}", "registers": regs, "spill_bytes": spill_st + spill_ld,
            "shared_bytes": int(ck.metadata.shared), "num_warps": aot_num_warps(name),
            "aligned_args": sorted(kernel.arg_names[i] for (i,) in attrs), "triton": triton.__version__,
            # the hints as the compiled module carries them (one per aligned pointer argument)
            "ttir_divisibility": next(line for line in ck.asm["ttir"].splitlines()
                                      if "tt.func" in line).count("tt.divisibility = 16")}


# Spill bytes allowed per (config name, arch): none. Every shipped configuration of every phase
# kernel compiles spill-free for sm_80 and sm_90 under both Triton 3.7.1 (the GPU install's) and
# Triton 3.8.0 (tools/kernel_report.py --family mlp run under each; docs/kernels_mlp.md, "AOT
# compile"); the dict is kept (empty) for tools that read it.
SPILL_BUDGET: dict[tuple[str, int], int] = {}


def spill_budget(config_name: str, arch: int) -> int:
    """Spill bytes allowed for a config on ``sm_<arch>``: 0."""
    return SPILL_BUDGET.get((config_name, arch), 0)
