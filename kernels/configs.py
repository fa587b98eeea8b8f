"""The shipped kernel configurations: every (kernel, BT, BK, BV, num_warps, num_stages, learner)
that dispatch can launch. ``tools/kernel_report.py`` compiles exactly these for sm_80 and sm_90
and fails on a compile error, a register spill or shared memory over the device limit, so a
config is listed here only once it compiles cleanly; a call with no listed config falls back to
the PyTorch path (``kernels.supports`` names why).

* ``BT`` is the chunk size (16, 32, 64); ``BK`` / ``BV`` the key / value block the chunk kernels
  loop over (dk and dv are runtime arguments, any value up to ``MAX_HEAD_DIM``, masked; dv is
  split into ``ceil(dv / BV)`` programs, or looped over by one program in the huber state pass).
  One compiled binary per entry therefore serves every head dim: registers depend on the
  blocks, not on how many there are.
* ``learner``: ``gd`` or ``momentum`` (momentum keeps a second state, so it gets its own entries).
  Each config is compiled in its class's heaviest code variant (huber bias).
* Kernels (:mod:`miras_kernels.miras_linear.chunk_kernels`): ``chunk_state`` (sequential state pass),
  ``chunk_out`` (outputs), ``chunk_bwd_du`` (state-independent part of dU), ``chunk_bwd_dstate``
  (sequential adjoint pass), ``chunk_bwd_dqg`` / ``chunk_bwd_dkv`` / ``chunk_bwd_dgate`` /
  ``chunk_bwd_dmu`` (the launches of ``miras_linear_chunk_bwd_grads_kernel``, PART 0/1/2/3; dmu
  only for momentum); ``recurrent_fwd`` (:mod:`miras_kernels.miras_linear.fused_recurrent`, BT unused
  = 1, the whole padded state in one program: BK = padded dk, BV = padded dv).
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZES = (16, 32, 64)
CHUNK_KERNELS = ("chunk_state", "chunk_out", "chunk_bwd_du", "chunk_bwd_dstate", "chunk_bwd_dqg", "chunk_bwd_dkv",
                 "chunk_bwd_dgate", "chunk_bwd_dmu")
# lq/kl retention only (kernels/miras_linear/chunk_mat_kernels.py): the per-token sweeps keep a
# [BV, padded dk] state tile in registers, so their binaries depend on the padded key width: their
# configs have BK = that width (32, 64, 128), one entry each, like ``recurrent_fwd``.
MAT_KERNELS = ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk", "chunk_bwd_dstate_mat")
SCAN_KERNELS = ("chunk_scan_fwd", "chunk_scan_bwd", "chunk_scan_bwd_dk")
MAX_HEAD_DIM = 128
MIN_BLOCK = 32


@dataclass(frozen=True)
class KernelConfig:
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
    ("chunk_scan_bwd", "gd", 16, 128): 8, ("chunk_scan_bwd", "gd", 32, 128): 8,
}
_OVERRIDES: dict[tuple[str, str, int], tuple[int, int, int]] = {
    ("chunk_state", "momentum", 32): (32, 32, 8), ("chunk_state", "momentum", 64): (32, 16, 8),
    ("chunk_out", "momentum", 64): (32, 16, 8),
    ("chunk_bwd_dstate", "gd", 32): (32, 32, 8), ("chunk_bwd_dstate", "gd", 64): (16, 16, 8),
    ("chunk_bwd_dstate", "momentum", 32): (32, 16, 8), ("chunk_bwd_dstate", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dqg", "momentum", 64): (32, 16, 8),
    ("chunk_bwd_dkv", "gd", 64): (32, 16, 8), ("chunk_bwd_dkv", "momentum", 16): (32, 32, 8),
    ("chunk_bwd_dkv", "momentum", 32): (32, 32, 8), ("chunk_bwd_dkv", "momentum", 64): (32, 16, 8),
    ("chunk_bwd_dgate", "gd", 64): (32, 16, 8), ("chunk_bwd_dgate", "momentum", 16): (32, 32, 8),
    ("chunk_bwd_dgate", "momentum", 32): (32, 16, 8), ("chunk_bwd_dgate", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dmu", "momentum", 16): (32, 32, 8), ("chunk_bwd_dmu", "momentum", 32): (32, 16, 8),
    ("chunk_bwd_dmu", "momentum", 64): (16, 16, 8),
    ("chunk_bwd_dstate_mat", "gd", 16): (32, 32, 8), ("chunk_bwd_dstate_mat", "gd", 32): (32, 32, 8),
    ("chunk_bwd_dstate_mat", "gd", 64): (32, 16, 8), ("chunk_bwd_dstate_mat", "momentum", 16): (32, 32, 8),
    ("chunk_bwd_dstate_mat", "momentum", 32): (32, 16, 8), ("chunk_bwd_dstate_mat", "momentum", 64): (16, 16, 8),
}


def kernels_for(learner: str, retention: str = "decay") -> tuple[str, ...]:
    """The chunk kernels a training call with this learner (and retention) launches (d log mu only
    with momentum; the per-token sweeps and the Jacobian-aware adjoint pass only for lq/kl)."""
    base = tuple(k for k in CHUNK_KERNELS if learner == "momentum" or k != "chunk_bwd_dmu")
    if retention in ("lq", "kl"):
        return base + MAT_KERNELS
    return base


def _chunk_entry(kernel: str, learner: str, BT: int) -> tuple[int, int, int]:
    return _OVERRIDES.get((kernel, learner, BT), _DEFAULT[BT])


def _build() -> tuple[KernelConfig, ...]:
    out = []
    for learner in ("gd", "momentum"):
        for kernel in kernels_for(learner, "lq"):
            for BT in CHUNK_SIZES:
                if kernel in SCAN_KERNELS:
                    for bkp in (32, 64, MAX_HEAD_DIM):
                        w = _SCAN_WARP_OVERRIDES.get((kernel, learner, BT, bkp), _SCAN_WARPS[BT])
                        out.append(KernelConfig(kernel, BT, bkp, 16, w, 1, learner))
                    continue
                BK, BV, w = _chunk_entry(kernel, learner, BT)
                out.append(KernelConfig(kernel, BT, BK, BV, w, 1, learner))
    out += [KernelConfig("recurrent_fwd", 1, BK, BV, w, 1, "any") for (BK, BV), w in _RECURRENT_TABLE.items()]
    return tuple(out)


_RECURRENT_TABLE: dict[tuple[int, int], int] = {(32, 32): 2, (32, 64): 4, (64, 32): 4, (64, 64): 4}
SHIPPED: tuple[KernelConfig, ...] = _build()


def block_size(dim: int) -> int:
    """Power-of-two tile covering ``dim`` (at least 32: tl.dot needs dims >= 16, and one
    padded size for small heads keeps the shipped list short)."""
    b = MIN_BLOCK
    while b < dim:
        b *= 2
    return b


def pick_config(kernel: str, BT: int, K: int, BV_full: int, full_v: bool = False, learner: str = "gd") -> KernelConfig | None:
    """The config dispatch launches, or ``None`` when none is shipped.

    Chunk kernels: the head dims are runtime arguments (one binary per config serves every
    dk, dv <= ``MAX_HEAD_DIM``: the kernels loop over key and value blocks). ``recurrent_fwd``
    keeps the whole state in one program: ``BK == K`` and ``BV == BV_full`` (``full_v``); the
    lq/kl sweeps (``SCAN_KERNELS``) keep whole rows: ``BK == K`` (the padded key width)."""
    for c in SHIPPED:
        if c.kernel != kernel or c.BT != BT:
            continue
        if kernel == "recurrent_fwd":
            if c.BK == K and (c.BV == BV_full if full_v else BV_full % c.BV == 0):
                return c
            continue
        if kernel in SCAN_KERNELS and c.BK != K:
            continue
        if c.learner == learner and K <= MAX_HEAD_DIM:
            return c
    return None
