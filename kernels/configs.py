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
* Kernels (:mod:`kernels.miras_linear.chunk_kernels`): ``chunk_state`` (sequential state pass),
  ``chunk_out`` (outputs), ``chunk_bwd_du`` (state-independent part of dU), ``chunk_bwd_dstate``
  (sequential adjoint pass), ``chunk_bwd_dqg`` / ``chunk_bwd_dkv`` / ``chunk_bwd_dgate`` /
  ``chunk_bwd_dmu`` (the launches of ``miras_linear_chunk_bwd_grads_kernel``, PART 0/1/2/3; dmu
  only for momentum); ``recurrent_fwd`` (:mod:`kernels.miras_linear.fused_recurrent`, BT unused
  = 1, the whole padded state in one program: BK = padded dk, BV = padded dv).
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZES = (16, 32, 64)
CHUNK_KERNELS = ("chunk_state", "chunk_out", "chunk_bwd_du", "chunk_bwd_dstate", "chunk_bwd_dqg", "chunk_bwd_dkv",
                 "chunk_bwd_dgate", "chunk_bwd_dmu")
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
}


def kernels_for(learner: str) -> tuple[str, ...]:
    """The chunk kernels a training call with this learner launches (d log mu only with momentum)."""
    return tuple(k for k in CHUNK_KERNELS if learner == "momentum" or k != "chunk_bwd_dmu")


def _chunk_entry(kernel: str, learner: str, BT: int) -> tuple[int, int, int]:
    return _OVERRIDES.get((kernel, learner, BT), _DEFAULT[BT])


def _build() -> tuple[KernelConfig, ...]:
    out = []
    for learner in ("gd", "momentum"):
        for kernel in kernels_for(learner):
            for BT in CHUNK_SIZES:
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
    keeps the whole state in one program: ``BK == K`` and ``BV == BV_full`` (``full_v``)."""
    for c in SHIPPED:
        if c.kernel != kernel or c.BT != BT:
            continue
        if kernel == "recurrent_fwd":
            if c.BK == K and (c.BV == BV_full if full_v else BV_full % c.BV == 0):
                return c
            continue
        if c.learner == learner and K <= MAX_HEAD_DIM:
            return c
    return None
