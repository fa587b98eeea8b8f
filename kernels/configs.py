"""The shipped launch configurations of both Triton kernel families, in one table per family.

``tools/kernel_report.py`` compiles exactly these for sm_80 and sm_90 and fails on a compile
error, a register spill or shared memory over the device limit, so a config is listed here only
once it compiles cleanly; a call with no listed config falls back to the PyTorch path
(``miras_kernels.supports`` names why). Plain Python: importing this module does not import triton.

Linear family (:mod:`miras_kernels.miras_linear`), ``LINEAR_*`` and :func:`linear_config`:

* ``BT`` is the chunk size (16, 32, 64); ``BK`` / ``BV`` the key / value block the chunk kernels
  loop over (dk and dv are runtime arguments, any value up to ``LINEAR_MAX_HEAD_DIM``, masked; dv
  is split into ``ceil(dv / BV)`` programs, or looped over by one program in the huber state pass).
  One compiled binary per entry therefore serves every head dim: registers depend on the
  blocks, not on how many there are.
* ``learner``: ``gd`` or ``momentum`` (momentum keeps a second state, so it gets its own entries).
  Each config is compiled in its class's heaviest code variant (huber bias).
* Kernels (:mod:`miras_kernels.miras_linear.chunk_kernels`): ``chunk_state`` (sequential state pass),
  ``chunk_out`` (outputs), ``chunk_bwd_du`` (state-independent part of dU), ``chunk_bwd_dstate``
  (sequential adjoint pass), ``chunk_bwd_dqg`` / ``chunk_bwd_dkv`` / ``chunk_bwd_dgate`` /
  ``chunk_bwd_dmu`` (the launches of ``miras_linear_chunk_bwd_grads_kernel``, PART 0/1/2/3; dmu
  only for momentum); the exact delta rule's ``delta_wy_fwd``, ``delta_state``, ``delta_bwd_dstate``,
  ``delta_wy_bwd_da``, ``delta_wy_bwd_dk`` (:mod:`miras_kernels.miras_linear.chunk_exact_kernels`, gd
  only, each compiled in both step_at orders where it differs); ``recurrent_fwd``
  (:mod:`miras_kernels.miras_linear.fused_recurrent`, BT unused
  = 1, the whole padded state in one program: BK = padded dk, BV = padded dv).

MLP family (:mod:`miras_kernels.miras_mlp`), ``MLP_*`` and the ``mlp_*`` functions: the shipped
(head dim, expansion, chunk size) triples, the hidden-block width and the warps of every phase
kernel, and which retentions are AOT-checked where (``miras_kernels.miras_mlp.aot`` lists the
compile entries from these tables).
"""

from __future__ import annotations

from dataclasses import dataclass

# =============================================================================== linear family

LINEAR_CHUNK_SIZES = (16, 32, 64)
LINEAR_CHUNK_KERNELS = ("chunk_state", "chunk_out", "chunk_bwd_du", "chunk_bwd_dstate", "chunk_bwd_dqg", "chunk_bwd_dkv",
                 "chunk_bwd_dgate", "chunk_bwd_dmu")
# lq/kl retention only (kernels/miras_linear/chunk_mat_kernels.py): the per-token sweeps keep a
# [BV, padded dk] state tile in registers, so their binaries depend on the padded key width: their
# configs have BK = that width (32, 64, 128), one entry each, like ``recurrent_fwd``.
LINEAR_MAT_KERNELS = ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk", "chunk_bwd_dstate_mat")
LINEAR_SCAN_KERNELS = ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk")
# the exact delta rule (chunk_rule "exact", learner gd only; kernels/miras_linear/chunk_exact_kernels.py):
# its own four kernels, plus the dot-bias launches it reuses for the reads and the state update
LINEAR_EXACT_KERNELS = ("delta_wy_fwd", "delta_state", "delta_bwd_dstate", "delta_wy_bwd_da", "delta_wy_bwd_dk")
LINEAR_EXACT_REUSED = ("chunk_out", "chunk_bwd_du", "chunk_bwd_dqg", "chunk_bwd_dkv", "chunk_bwd_dgate")
LINEAR_MAX_HEAD_DIM = 128
MIN_BLOCK = 32


@dataclass(frozen=True)
class KernelConfig:
    """One shipped launch of a linear-family kernel: its name, the chunk size ``BT``, the key and
    value blocks ``BK``/``BV``, warps, pipeline stages and the learner class it serves."""

    kernel: str
    BT: int
    BK: int
    BV: int
    num_warps: int
    num_stages: int
    learner: str = "gd"

    def label(self) -> str:
        return f"{self.learner} BT={self.BT} BK={self.BK} BV={self.BV} w={self.num_warps} s={self.num_stages}"


# (kernel, learner, BT) -> (BK, BV, num_warps), every entry spill-free on sm_80 and sm_90 in its
# heaviest variant (tools/kernel_report.py). Tuned by hand from the report: the first of
# (32, 32, 4), (32, 32, 8), (32, 16, 8), (16, 32, 8), (16, 16, 8) that compiled without spills.
# The kernels' live set is dominated by the [BT, BT] and [BT, BV] tiles, so larger chunks need
# 8 warps (never more: at 16 warps ptxas caps a thread at 128 registers) and narrower blocks.
_DEFAULT = {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 32, 8)}
# per-token sweeps: 16 value rows x the whole padded key width; warps per (kernel, learner, BT)
# with per-width exceptions, from the report (at 8 warps ptxas held the narrow momentum dk sweep
# to 128 registers on sm_80 and spilled; at 4 warps the 128-wide sweeps spilled)
_SCAN_WARPS = {16: 4, 32: 4, 64: 8}
_SCAN_WARP_OVERRIDES: dict[tuple[str, str, int, int], int] = {
    **{("chunk_scan_bwd", "momentum", bt, bkp): 8 for bt in (16, 32) for bkp in (32, 64, 128)},
    ("chunk_scan_bwd_dk", "momentum", 64, 32): 4, ("chunk_scan_bwd_dk", "momentum", 64, 64): 4,
    ("chunk_scan_bwd", "gd", 16, 128): 8, ("chunk_scan_bwd", "gd", 64, 32): 16,
    ("chunk_scan_fwd", "momentum", 16, 32): 8, ("chunk_scan_bwd", "gd", 32, 128): 8,
}
_OVERRIDES: dict[tuple[str, str, int], tuple[int, int, int]] = {
    # num_warps-only retunes (8-24 B spills under Triton 3.7.1): chunk_state momentum 16, chunk_bwd_dstate
    # gd 64, delta_wy_fwd 16, delta_wy_bwd_da 32; chunk_scan_fwd momentum (16, 32), chunk_scan_bwd gd (64, 32).
    # Block retunes (every warp count spilled 8-24 B under 3.7.1): chunk_bwd_dqg momentum 64 (32, 16, 8) ->
    # (16, 16, 8) (255 registers on sm_80, none spilled; 16 warps: 128-register cap, 228-756 B);
    # chunk_bwd_dstate_mat gd 32 and momentum 16 (32, 32, 8) -> (16, 32, 8) (<= 212 registers).
    # For the step_at="retained" variants (3.7.1): chunk_state gd 16 (32, 32, 4) -> (16, 32, 2) (lq-ret
    # spilled 24 B at 4 warps, 52 at 8, 16-44 with 16-wide blocks; <= 240 registers at 2 warps);
    # chunk_bwd_dkv momentum 32 (32, 32, 8) -> (32, 16, 8) (local-lq-ret spilled 4 B; <= 228 registers)
    ("chunk_state", "gd", 16): (16, 32, 2), ("chunk_state", "momentum", 16): (32, 32, 8),
    ("chunk_state", "momentum", 32): (32, 32, 8), ("chunk_state", "momentum", 64): (32, 16, 8),
    ("chunk_out", "momentum", 64): (32, 16, 8),
    ("chunk_bwd_dstate", "gd", 32): (32, 32, 8), ("chunk_bwd_dstate", "gd", 64): (16, 16, 4),
    ("chunk_bwd_dstate", "momentum", 32): (32, 16, 8), ("chunk_bwd_dstate", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dqg", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dkv", "gd", 64): (32, 16, 8), ("chunk_bwd_dkv", "momentum", 16): (32, 32, 8),
    ("chunk_bwd_dkv", "momentum", 32): (32, 16, 8), ("chunk_bwd_dkv", "momentum", 64): (32, 16, 8),
    ("chunk_bwd_dgate", "gd", 64): (32, 16, 8), ("chunk_bwd_dgate", "momentum", 16): (32, 32, 8),
    ("chunk_bwd_dgate", "momentum", 32): (32, 16, 8), ("chunk_bwd_dgate", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dmu", "momentum", 16): (32, 32, 8), ("chunk_bwd_dmu", "momentum", 32): (32, 16, 8),
    ("chunk_bwd_dmu", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dstate_mat", "gd", 16): (32, 32, 8), ("chunk_bwd_dstate_mat", "gd", 32): (16, 32, 8),
    ("chunk_bwd_dstate_mat", "gd", 64): (32, 16, 8), ("chunk_bwd_dstate_mat", "momentum", 16): (16, 32, 8),
    ("chunk_bwd_dstate_mat", "momentum", 32): (32, 16, 8), ("chunk_bwd_dstate_mat", "momentum", 64): (16, 16, 8),
    # exact delta rule: at BT = 64 the WY adjoints spilled 96-196 bytes on sm_80 with 32-wide blocks
    # at 8 warps (376-980 at 4 warps, 520-824 at 16); 16-wide blocks at 8 warps: none. BT = 16:
    # wy_bwd_dk spilled 4 bytes on sm_80 (ptxas held it to 128 registers at 4 and 8 warps); 16-wide: none
    ("delta_wy_bwd_da", "gd", 64): (16, 16, 8), ("delta_wy_bwd_dk", "gd", 64): (16, 16, 8),
    ("delta_wy_bwd_dk", "gd", 16): (16, 16, 4),
    ("delta_wy_fwd", "gd", 16): (32, 32, 8), ("delta_wy_bwd_da", "gd", 32): (32, 32, 8),
}


# step_at="retained" with mini-batch GD: (learner, chunk) whose RETAINED kernel variants are not
# shipped for GPUs (a call falls back to the PyTorch chunked path there; the interpreter still runs
# them). chunk_bwd_dkv momentum 64's retained variants spill 4-40 B on sm_80 under Triton 3.7.1 (the
# GPU install's) at every block (16/32 x 16/32), warp (4/8/16) and stage (1/2) setting tried.
LINEAR_RETAINED_UNSHIPPED: frozenset[tuple[str, int]] = frozenset({("momentum", 64)})


def linear_retained_shipped(learner: str, chunk: int) -> bool:
    """Whether the step_at="retained" mini-batch kernels of this learner and chunk size run on a GPU."""
    return (learner, chunk) not in LINEAR_RETAINED_UNSHIPPED


def linear_kernels_for(learner: str, retention: str = "decay", chunk_rule: str = "minibatch") -> tuple[str, ...]:
    """The chunk kernels a training call with this learner (and retention, chunk rule) launches
    (d log mu only with momentum; the per-token sweeps and the Jacobian-aware adjoint pass only for
    lq/kl; the exact delta rule: its own kernels and the dot-bias launches it reuses)."""
    if chunk_rule == "exact":
        return LINEAR_EXACT_KERNELS + LINEAR_EXACT_REUSED
    base = tuple(k for k in LINEAR_CHUNK_KERNELS if learner == "momentum" or k != "chunk_bwd_dmu")
    if retention in ("lq", "kl"):
        return base + LINEAR_MAT_KERNELS
    return base


def _chunk_entry(kernel: str, learner: str, BT: int) -> tuple[int, int, int]:
    return _OVERRIDES.get((kernel, learner, BT), _DEFAULT[BT])


def _build() -> tuple[KernelConfig, ...]:
    out = []
    for learner in ("gd", "momentum"):
        for kernel in linear_kernels_for(learner, "lq"):
            for BT in LINEAR_CHUNK_SIZES:
                if kernel in LINEAR_SCAN_KERNELS:
                    for bkp in (32, 64, LINEAR_MAX_HEAD_DIM):
                        w = _SCAN_WARP_OVERRIDES.get((kernel, learner, BT, bkp), _SCAN_WARPS[BT])
                        out.append(KernelConfig(kernel, BT, bkp, 16, w, 1, learner))
                    continue
                BK, BV, w = _chunk_entry(kernel, learner, BT)
                out.append(KernelConfig(kernel, BT, BK, BV, w, 1, learner))
    for kernel in LINEAR_EXACT_KERNELS:
        for BT in LINEAR_CHUNK_SIZES:
            BK, BV, w = _chunk_entry(kernel, "gd", BT)
            out.append(KernelConfig(kernel, BT, BK, BV, w, 1, "gd"))
    out += [KernelConfig("recurrent_fwd", 1, BK, BV, w, 1, "any") for (BK, BV), w in _LINEAR_RECURRENT_WARPS.items()]
    return tuple(out)


_LINEAR_RECURRENT_WARPS: dict[tuple[int, int], int] = {(32, 32): 2, (32, 64): 4, (64, 32): 4, (64, 64): 4}
LINEAR_SHIPPED: tuple[KernelConfig, ...] = _build()


def block_size(dim: int) -> int:
    """Power-of-two tile covering ``dim`` (at least 32: tl.dot needs dims >= 16, and one
    padded size for small heads keeps the shipped list short)."""
    b = MIN_BLOCK
    while b < dim:
        b *= 2
    return b


def linear_config(kernel: str, BT: int, K: int, BV_full: int, full_v: bool = False, learner: str = "gd") -> KernelConfig | None:
    """The config dispatch launches, or ``None`` when none is shipped.

    Chunk kernels: the head dims are runtime arguments (one binary per config serves every
    dk, dv <= ``LINEAR_MAX_HEAD_DIM``: the kernels loop over key and value blocks). ``recurrent_fwd``
    keeps the whole state in one program: ``BK == K`` and ``BV == BV_full`` (``full_v``); the
    lq/kl sweeps (``LINEAR_SCAN_KERNELS``) keep whole rows: ``BK == K`` (the padded key width)."""
    for c in LINEAR_SHIPPED:
        if c.kernel != kernel or c.BT != BT:
            continue
        if kernel == "recurrent_fwd":
            if c.BK == K and (c.BV == BV_full if full_v else BV_full % c.BV == 0):
                return c
            continue
        if kernel in LINEAR_SCAN_KERNELS and c.BK != K:
            continue
        if c.learner == learner and K <= LINEAR_MAX_HEAD_DIM:
            return c
    return None


# ================================================================================== MLP family

MLP_HEAD_DIMS = (16, 32, 64, 128)
MLP_EXPANSIONS = (1, 2, 4)
MLP_CHUNK_SIZES = (16, 32, 64)
MLP_RETENTIONS = ("none", "decay", "lq", "kl")
# Candidate GPU configurations (head dim, expansion, chunk size); 340M: D = 64, e = 4, C = 64.
MLP_CANDIDATES = [(d, e, c) for d in (32, 64, 128) for e in (2, 4) for c in (16, 64)]
MLP_ARCHS = (80, 90)
# Candidates the AOT report found spilling (on either arch, under Triton 3.7.1 or 3.8.0): not
# shipped, supports() falls back on a GPU naming the reason (dict value). Under Triton 3.8.0 alone
# this was empty: d = 128 with C = 64 had spilled 48-4820 bytes in
# fwd hidden and bwd readout2 / state_dk / mid / first / lq_adj1 ([64, 128] fp32 tiles, 32
# registers per thread each at 8 warps) until those phases were restructured (CTA-barrier splits,
# a second hidden-block loop for dk, see miras_mlp/chunk_kernels.py) and given per-phase warps
# (mlp_phase_warps). Not shipped now: d = 128 (C = 16 and 64, e = 2 and 4): under Triton 3.7.1
# (the GPU install's) bwd_read2 with
# momentum spills at every warp count (C = 16: 6.9-7.1 KB at 8 warps, 16-48 B at 4, 16-32 B at 2,
# 2.6-2.8 KB at 16; C = 64, sm_80: 84-88 B at 8, 160 B at 4, 7.7 KB at 16, 20 KB at 2) and at
# BH = 32 (64-324 B); BH = 16 is already the smallest hidden block. Triton 3.8.0 compiles them
# spill-free, so these return once the GPU install moves to 3.8.
_MLP_D128_WHY = ("head dim 128: phase mlp_bwd_read2 (momentum) spills registers under Triton 3.7.1 on "
                 "sm_80/sm_90 at every warp count (AOT report, bench_results/kernel_report_mlp_triton371.md)")
MLP_NOT_SHIPPED: dict[tuple[int, int, int], str] = {(128, e, c): _MLP_D128_WHY for e in (2, 4) for c in (16, 64)}
# Configurations compiled and checked ahead of time (miras_kernels.miras_mlp.aot,
# tools/kernel_report.py --family mlp): every phase kernel is spill-free with shared memory in
# bounds on sm_80 and sm_90 under both Triton 3.7.1 (the GPU install's) and 3.8.0.
MLP_SHIPPED = [c for c in MLP_CANDIDATES if c not in MLP_NOT_SHIPPED]
# No software pipelining: the hidden-block loops are compute bound and every pipeline stage would
# buffer weight tiles in shared memory and keep extra registers live (spills on sm_80/sm_90).
MLP_NUM_STAGES = 1
# exponents q of the lq retention compiled and checked ahead of time (aot.LQ_VARIANTS)
MLP_SHIPPED_LQ_Q = (4.0,)
# Configurations where the kl phases spill although the shared phases may ship (AOT report, checked
# with the kl entries of aot.aot_specs); kl falls back there on a GPU. Empty: d = 128 with C = 64
# spilled (kl_adj1 with momentum 128 bytes on sm_80 at 8 warps; kl_o1 2.1-2.3 KB and kl_adj2q
# 64-72 bytes at 4 warps) until kl_adj1's d(h_i) / d Gam part moved to kl_adj1h and kl_o1 /
# kl_adj2q got 8 warps there (mlp_phase_warps).
MLP_KL_NOT_SHIPPED: dict[tuple[int, int, int], str] = {}
# (head dim, expansion, chunk) where the kl (Memora) phases, gd and momentum, are compiled and
# checked ahead of time (aot.aot_specs, aot.KL_VARIANTS; 0 spills on sm_80/sm_90): every shipped
# config but MLP_KL_NOT_SHIPPED. (d = 128, C = 16 spilled 592-720 bytes in kl_adj2 until its dk part
# moved to kl_adj2k.)
MLP_SHIPPED_KL = tuple(c for c in MLP_SHIPPED if c not in MLP_KL_NOT_SHIPPED)


def mlp_hidden_block(d: int, e: int, chunk: int) -> int:
    """Tile of the hidden dimension ``e*d`` kept on chip at once. Smaller for wide heads and big
    chunks so the ``[C, BH]`` tiles of the backward fit in registers (checked by the AOT report)."""
    hidden = d * e
    bh = 16 if (d >= 64 or chunk >= 64) else 32
    return max(16, min(bh, hidden))


def mlp_num_warps(d: int, chunk: int) -> int:
    """Default warps of the phase kernels (see :func:`mlp_phase_warps`)."""
    return 8 if (d >= 64 or chunk >= 64) else 4


def mlp_phase_warps(name: str, d: int, chunk: int, lq: bool = False) -> int:
    """Warps of one phase kernel (``name`` as in ``chunk_kernels.FWD_KERNELS``/``BWD_KERNELS`` or
    ``chunk_lq_kernels.FWD_LQ_KERNELS``/``BWD_LQ_KERNELS``; ``lq``: compiled with ``LQ=True``);
    chosen with the AOT report so that no phase spills on sm_80/sm_90."""
    if name in ("mlp_bwd_read", "mlp_fwd_read"):
        # at 8 warps ptxas held this phase to 128 registers on sm_80 and spilled (d = 64, C = 64)
        return 4
    if name == "mlp_bwd_lq_adj2k":
        # at 8 warps ptxas spilled 40 bytes at 80 registers on sm_80 (d = 64, C = 64, gd); 4: none
        return 4
    if name == "mlp_fwd_out" and d == 64 and chunk >= 64:
        # Triton 3.7.1 (the GPU install's), compiled as launched: at 8 warps ptxas held it to 128
        # registers on sm_80 and spilled 16 bytes (e = 4); 4 warps (136-168 registers): none
        return 4
    if name == "mlp_bwd_kl_dw0" and d == 64:
        # compiled as launched (16-byte aligned pointers, tools/kernel_report.py): at 8 warps ptxas
        # spilled 16 bytes at 48 registers on sm_90 (d = 64, e = 4); 4 warps: none on sm_80/sm_90
        return 4
    if name == "mlp_bwd_readout" and lq and d == 64 and chunk >= 64:
        # lq (and kl's backward), compiled as launched: at 8 warps ptxas held it to 128 registers on
        # sm_80 and spilled 40 bytes (lp + gd); 4 warps (163-168 registers): none on sm_80/sm_90
        return 4
    if d == 32 and chunk >= 64 and name in ("mlp_fwd_coef", "mlp_bwd_coef", "mlp_bwd_readout", "mlp_bwd_state_mom",
                                            "mlp_bwd_read2"):
        # Triton 3.7.1, sm_80: at 8 warps ptxas held these to 64-128 registers and spilled 8-16
        # bytes (every variant of coef; readout/read2/state_mom in some); 4 warps: none (3.7.1, 3.8.0)
        return 4
    if d == 32 and chunk == 16 and name == "mlp_bwd_state":
        # Triton 3.7.1, sm_80: 4 warps spilled 8 bytes at 64 registers, 8 warps 16; 16 (and 2): none
        return 16
    if d == 32 and chunk == 16 and name == "mlp_bwd_state_dk":
        # Triton 3.7.1, sm_90, momentum (e = 4): 4 warps spilled 16 bytes at 128 registers; 8: none
        return 8
    if d == 32 and name == "mlp_bwd_kl_o1":
        # Triton 3.7.1, sm_90: 4 warps spilled 16 bytes (C = 16, e = 2; C = 64, e = 4), 8 warps
        # 8-16 (sm_80/sm_90, also 3.8.0), 2 warps 16-48; 16 warps: none (3.7.1, 3.8.0)
        return 16
    if name in ("mlp_fwd_kl_o1", "mlp_bwd_kl_o1", "mlp_bwd_kl_adj2q"):
        # kl token sweeps: at 8 warps ptxas held them to 64-128 registers and spilled 8-32 bytes
        # (d = 64: kl_o1 on sm_80/sm_90; d = 32, C = 64: kl_adj2q on sm_90); 4 warps: none. d = 128,
        # C = 64: at 4 warps kl_o1 spilled 2.1-2.3 KB (its three [C, D] online-softmax tiles) and
        # kl_adj2q 64-72 bytes (momentum, sm_80); 8 warps: none
        return 8 if (d >= 128 and chunk >= 64) else 4
    if name == "mlp_bwd_kl_adj2":
        # d = 64, C = 16, momentum: at 8 warps ptxas held it to 128 registers on sm_90 and spilled
        # 48 bytes; 4 warps: none for d = 64 (d = 128: 4 warps spilled 48 bytes, 8 none)
        return 4 if d == 64 else mlp_num_warps(d, chunk)
    if name == "mlp_bwd_kl_adj2k":
        # d = 64, C = 64: at 8 warps 72-88 bytes spilled at 80 registers on sm_80; d = 32 and
        # d = 128: at 4 warps 8-32 bytes spilled (64-205 registers); 8 warps: none
        return 4 if d == 64 else 8
    if d >= 128 and chunk >= 64:
        # d = 128, C = 64: [64, 128] fp32 tiles; measured per phase (AOT report, sm_80/sm_90)
        if name in ("mlp_fwd_hidden", "mlp_bwd_first"):
            # 8 warps spilled 128-200 (hidden, sm_90) / 56-288 bytes (first's dz loop); 4: none
            return 4
        if name == "mlp_bwd_mid":
            # lp/huber: 8 warps spilled 16-264 bytes even with the bias and LN parts split by
            # barriers; 16 warps (128 registers each): none
            return 16
    if name == "mlp_bwd_first" and d == 64 and chunk == 16:
        # with the dk loop split off, 8 warps held it to 128 registers on sm_80 and spilled 24
        # bytes (l2, gd and momentum); 4 warps: none (at d = 64, C = 64 4 warps spill with lq/kl)
        return 4
    if lq and name == "mlp_bwd_state_dk":
        # LQ (lq, and kl's backward): 8 warps everywhere since the momentum terms moved to their
        # own hidden-block loop (4 warps spilled 8 bytes on sm_90 at d = 32, C = 16 with momentum
        # and 104-140 bytes at d = 128, C = 64; before the split 8 warps spilled 24 bytes at
        # d = 64, C = 16 on sm_80)
        return 8
    return mlp_num_warps(d, chunk)


# Chunk-loop drivers (miras_mlp.chunk_drivers: a path's whole forward or backward chunk loop in one
# launch, every phase inlined): (arch, d, e, chunk, variant) where the forward AND backward driver
# of that code variant compiled spill-free under Triton 3.7.1 and 3.8.0 (AOT, compiled as launched;
# docs/kernels_mlp.md "AOT compile"). variant = "<bias>,<gd|momentum>[,lq|,kl]" as in the AOT
# names. Everywhere else on a GPU the host launches the phases one by one per chunk step (the
# AOT-checked per-phase path, chunk.py), so nothing unchecked runs. So far, sm_90 at the 340M
# config: Yaad's huber + gd (fwd 4 warps 220-222 registers, bwd 8 warps 250), Titans' l2 +
# momentum (fwd 254-255, bwd 246-251) and Memora's l2 + gd + kl (fwd 233-234, bwd 254-255); 0
# spills under both versions. Not shipped: Moneta's lp + gd + lq (its backward driver spills 8
# bytes under 3.7.1 at 8 warps; 0 under 3.8.0), sm_80 (the backward drivers spill 288-512 bytes at
# 4 and 8 warps under 3.8.0), and every variant not yet compiled under both versions.
MLP_DRIVER_SHIPPED: frozenset[tuple[int, int, int, int, str]] = frozenset({
    (90, 64, 4, 64, "huber,gd"), (90, 64, 4, 64, "l2,momentum"), (90, 64, 4, 64, "l2,gd,kl"),
})


def mlp_driver_variant(bias: str, momentum: bool, lq: bool = False, kl: bool = False) -> str:
    """The driver variant tag of ``MLP_DRIVER_SHIPPED`` (bias name, learner, retention path)."""
    return f"{bias},{'momentum' if momentum else 'gd'}{',lq' if lq else ''}{',kl' if kl else ''}"


def mlp_driver_shipped(arch: int | None, d: int, e: int, chunk: int, variant: str) -> bool:
    """Whether a launch on ``sm_<arch>`` runs the chunk-loop drivers (``arch`` None: the CPU
    interpreter, always) or the per-phase host loop (``variant``: :func:`mlp_driver_variant`)."""
    return arch is None or (arch, d, e, chunk, variant) in MLP_DRIVER_SHIPPED


def mlp_driver_warps(driver: str, d: int, chunk: int) -> int:
    """Warps of one chunk-loop driver kernel (``driver`` as in ``chunk_drivers.DRIVER_PHASES``); one
    count for all of its phases, chosen with the AOT report. d = 64, C = 64 (Triton 3.8.0): the
    forward drivers spilled 40-108 bytes on sm_80 at 8 warps (255 registers), 0 at 4 (sm_80 and
    sm_90); the backward drivers are spill-free at 8 warps on sm_90 (250-255 registers)."""
    if driver.startswith("mlp_fwd"):
        return 4
    return mlp_num_warps(d, chunk)


def mlp_config_shipped(d: int, e: int, chunk: int, arch: int, lq_q: float | None = None,
                       kl: bool = False) -> tuple[bool, str]:
    """Whether (head dim ``d``, expansion ``e``, ``chunk``) on ``sm_<arch>`` is a shipped
    (AOT-checked: zero register spills, shared memory in bounds) MLP configuration, else
    ``(False, reason)``. A GPU runs only these; the interpreter (CPU) runs every supported shape.
    ``lq_q``: the exponent of the lq retention (its phases are compiled with q as a constexpr),
    None otherwise; ``kl``: the kl (Memora) phases, AOT-checked for :data:`MLP_SHIPPED_KL` only."""
    if arch not in MLP_ARCHS:
        return False, (f"sm_{arch}: the MLP kernels are compiled and checked for "
                       f"{', '.join(f'sm_{a}' for a in MLP_ARCHS)} only")
    why = MLP_NOT_SHIPPED.get((d, e, chunk))
    if why:
        return False, f"not shipped: {why}"
    if (d, e, chunk) not in MLP_SHIPPED:
        return False, (f"head dim {d}, expansion {e}, chunk_size {chunk} is not a shipped (AOT-checked) "
                       f"configuration: see miras_kernels.configs.MLP_SHIPPED")
    if kl and (d, e, chunk) in MLP_KL_NOT_SHIPPED:
        return False, f"retention='kl' not shipped: {MLP_KL_NOT_SHIPPED[(d, e, chunk)]}"
    if kl and (d, e, chunk) not in MLP_SHIPPED_KL:
        return False, (f"retention='kl' is AOT-checked on a GPU for (head dim, expansion, chunk) in "
                       f"{list(MLP_SHIPPED_KL)} only (got {(d, e, chunk)})")
    if lq_q is not None and lq_q not in MLP_SHIPPED_LQ_Q:
        return False, (f"retention='lq' with q={lq_q:g} is not AOT-checked on a GPU "
                       f"(shipped q: {', '.join(f'{x:g}' for x in MLP_SHIPPED_LQ_Q)})")
    return True, ""


def mlp_recurrent_block(d: int, e: int, ret: int = 0) -> int:
    """Hidden rows per tile of the MLP decoding kernel (two [BH, d] weight tiles live at once). 32
    at d = 64 (BH = 16 spilled 8-36 bytes under Triton 3.7.1; an older kernel had spilled 16 bytes
    at BH = 32 on sm_90, Huber), 16 above. ``ret`` (``common.codes.RETENTION_CODES``): lq/kl at
    d = 128 take 8: with 16, kl + gd (C = 16) spilled 8 bytes on sm_80 and kl/lq + momentum used
    243-255 registers (the online softmax / q-norm temporaries add [d, BH] tiles); with 8 they
    compile to 96-127 registers, spill-free (AOT, sm_80/sm_90)."""
    if ret != 0 and d >= 128:
        return min(d * e, 8)
    if d == 64:
        # Triton 3.7.1: BH = 16 spilled 8-36 bytes (sm_80: l2/huber/lp + gd, C = 16/64; sm_90: dot)
        # at 64-80 registers, BH = 8 8-32 bytes (sm_90); BH = 32: none for every variant (3.7.1, 3.8.0)
        return min(d * e, 32)
    return min(d * e, 64 if d <= 32 else 16)
