"""Ahead-of-time compile descriptions of the shipped MLP-memory kernel configurations.

``aot_specs()`` lists ``(kernel, signature, constexprs, config_name)`` tuples that
``triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
target=GPUTarget("cuda", 80|90, 32), options={"num_warps": aot_num_warps(config_name)})``
compiles without a GPU; ``compile_entry`` does exactly that and reads registers/spills from
``ptxas -v`` (platform notes, "Triton on CPU"). ``tools/kernel_report.py`` consumes the same list.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

from .api import NUM_STAGES, hidden_block, num_warps_for
from .chunk import BIAS_CODES, _mlp_bwd_kernel, _mlp_fwd_kernel
from .fused_recurrent import _mlp_recurrent_kernel, recurrent_block

# Shipped configurations: (head dim, expansion, chunk size). 340M: D=64, e=4, C=64.
SHIPPED = [(d, e, c) for d in (32, 64, 128) for e in (2, 4) for c in (16, 64)]
# Variant flags that change the generated code: (bias, momentum).
VARIANTS = [("l2", False), ("huber", False), ("lp", False), ("dot", False), ("l2", True)]

_PTR = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "y": "*bf16", "dy": "*bf16",
        "cu": "*i32", "coff": "*i32"}


def _signature(kernel) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in ("H", "D", "E", "BT", "BH", "SW", "C", "BIAS", "MOMENTUM"):
            sig[name] = "constexpr"
        elif name == "p":
            sig[name] = "fp32"
        elif name == "pos0":
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


def aot_specs(variants=None, shipped=None) -> list[tuple]:
    """Every kernel x shipped config x code variant, as ``(kernel, signature, constexprs, name)``.
    Inputs are bf16 (the training dtype), state and gates fp32, H = 16."""
    out = []
    for d, e, c in (shipped or SHIPPED):
        bh = hidden_block(d, e, c)
        nw = num_warps_for(d, c)
        for bias, mom in (variants or VARIANTS):
            cx = {"H": 16, "D": d, "E": d * e, "BT": c, "BH": bh, "SW": max(d, c), "BIAS": BIAS_CODES[bias], "MOMENTUM": mom}
            tag = f"{bias},{'momentum' if mom else 'gd'} D{d} E{d * e} C{c} BH{bh} w{nw}"
            for kern, kname in ((_mlp_fwd_kernel, "mlp_fwd"), (_mlp_bwd_kernel, "mlp_bwd")):
                out.append((kern, _signature(kern), dict(cx), f"{kname}[{tag}]"))
    # decoding kernel: chunk semantics C = 1 (the exact rule) and the shipped training chunk sizes
    for d, e, C in sorted({(d, e, C) for d, e, c in (shipped or SHIPPED) for C in (1, c)}):
        for bias, mom in (variants or VARIANTS):
            cx = {"H": 16, "D": d, "E": d * e, "BH": recurrent_block(d, e), "C": C,
                  "BIAS": BIAS_CODES[bias], "MOMENTUM": mom}
            tag = f"{bias},{'momentum' if mom else 'gd'} D{d} E{d * e} C{C} BH{cx['BH']} w4"
            out.append((_mlp_recurrent_kernel, _signature(_mlp_recurrent_kernel), cx, f"mlp_recurrent[{tag}]"))
    return out


def compile_entry(entry: tuple, arch: int) -> dict:
    """Compile one ``aot_specs`` entry for ``sm_<arch>``; returns registers, spill bytes (stores
    + loads) and static shared memory in bytes. Needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, sig, cx, name = entry
    src = ASTSource(fn=kernel, signature=sig, constexprs=cx)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": aot_num_warps(name), "num_stages": NUM_STAGES})
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
            "shared_bytes": int(ck.metadata.shared), "num_warps": aot_num_warps(name)}


# Measured spill bytes (ptxas -v: spill stores + loads) of the current kernels, per
# (config name, arch). Target is 0; the remaining pressure is the chunk-level [C, C] / [C, d]
# algebra of the backward (docs/kernels_mlp.md, "Known gaps"). tests/test_kernels_mlp.py fails
# when a change makes a recorded config spill more; unrecorded configs must not spill at all.
SPILL_BUDGET: dict[tuple[str, int], int] = {
    ("mlp_fwd[huber,gd D64 E256 C64 BH16 w8]", 90): 432,
    ("mlp_bwd[huber,gd D64 E256 C64 BH16 w8]", 90): 5276,
    ("mlp_fwd[l2,momentum D64 E256 C64 BH16 w8]", 90): 1120,
    ("mlp_bwd[l2,momentum D64 E256 C64 BH16 w8]", 90): 8996,
    ("mlp_fwd[huber,gd D64 E256 C64 BH16 w8]", 80): 1912,
    ("mlp_bwd[huber,gd D64 E256 C64 BH16 w8]", 80): 9892,
    # sm_80 + momentum: ptxas allocates only 32-128 registers and spills (6.9 KB stack frame);
    # an open problem, see docs/kernels_mlp.md
    ("mlp_fwd[l2,momentum D64 E256 C64 BH16 w8]", 80): 35930,
    ("mlp_bwd[l2,momentum D64 E256 C64 BH16 w8]", 80): 30078,
    ("mlp_recurrent[huber,gd D64 E256 C1 BH32 w4]", 90): 16,
}


def spill_budget(config_name: str, arch: int) -> int:
    """Recorded spill bytes allowed for a config on ``sm_<arch>`` (0 when unrecorded)."""
    return SPILL_BUDGET.get((config_name, arch), 0)
