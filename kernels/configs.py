"""The shipped kernel configurations: every (kernel, BT, BK, BV, num_warps, num_stages) that
dispatch can launch, per learner class. ``tools/kernel_report.py`` compiles exactly these for
sm_80 and sm_90 and fails on a compile error, a register spill or shared memory over the device
limit, so a config is listed here only once it compiles cleanly; a call with no listed config
falls back to the PyTorch path (``kernels.supports`` names why).

* ``BT`` is the chunk size (16, 32, 64); ``BK`` the key head dim padded to a power of two >= 32
  (masked loads cover dk in 1..BK); ``BV`` the value block one program owns (huber needs the
  whole value row in one block, so it runs only where ``BV`` covers the padded dv).
* ``learner``: ``gd`` or ``momentum`` (momentum keeps a second state tile, so it needs its own,
  often smaller, set). Each config is compiled in its class's heaviest code variant (huber bias).
* Kernels: ``chunk_fwd``, ``chunk_bwd_dstate``, ``chunk_bwd_dqg`` / ``chunk_bwd_dkv`` (the two
  launches of ``miras_linear_chunk_bwd_grads_kernel``, PART 0/1) (:mod:`kernels.miras_linear.chunk_kernels`); ``recurrent_fwd``
  (:mod:`kernels.miras_linear.fused_recurrent`, BT unused = 1, BV = whole padded dv).
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZES = (16, 32, 64)
CHUNK_KERNELS = ("chunk_fwd", "chunk_bwd_dstate", "chunk_bwd_dqg", "chunk_bwd_dkv")
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


# (kernel, learner, BT, BK) -> (BV, num_warps). Only entries whose heaviest variant compiled
# spill-free for sm_80 and sm_90 in tools/kernel_report.py are listed (tuned by hand from its
# table: more warps or a narrower value block where a first choice spilled).
_CHUNK_TABLE: dict[tuple[str, str, int, int], tuple[int, int]] = {
    # gd: C=16 with dk <= 64, C=32 with dk <= 32
    ("chunk_fwd", "gd", 16, 32): (32, 1), ("chunk_fwd", "gd", 16, 64): (32, 2), ("chunk_fwd", "gd", 32, 32): (32, 4),
    ("chunk_bwd_dstate", "gd", 16, 32): (32, 1), ("chunk_bwd_dstate", "gd", 16, 64): (32, 2),
    ("chunk_bwd_dstate", "gd", 32, 32): (32, 4),
    ("chunk_bwd_dqg", "gd", 16, 32): (32, 2), ("chunk_bwd_dqg", "gd", 16, 64): (32, 4), ("chunk_bwd_dqg", "gd", 32, 32): (32, 8),
    ("chunk_bwd_dkv", "gd", 16, 32): (32, 2), ("chunk_bwd_dkv", "gd", 16, 64): (32, 2), ("chunk_bwd_dkv", "gd", 32, 32): (32, 4),
    # momentum: C=16 with dk <= 32
    ("chunk_fwd", "momentum", 16, 32): (32, 2), ("chunk_bwd_dstate", "momentum", 16, 32): (32, 4),
    ("chunk_bwd_dqg", "momentum", 16, 32): (32, 4), ("chunk_bwd_dkv", "momentum", 16, 32): (32, 2),
}
# Tried and dropped (spills on sm_80 and/or sm_90 in the heaviest variant): every C=64 config,
# every dk=128 config, gd C=32 dk=64 (chunk_bwd_dqg), momentum C=32 (chunk_bwd_dqg/dstate).
_RECURRENT_TABLE: dict[tuple[int, int], int] = {(32, 32): 2, (32, 64): 4, (64, 32): 4, (64, 64): 4}


def _build() -> tuple[KernelConfig, ...]:
    out = [KernelConfig(kernel, BT, BK, BV, w, 1, learner)
           for (kernel, learner, BT, BK), (BV, w) in _CHUNK_TABLE.items()]
    out += [KernelConfig("recurrent_fwd", 1, BK, BV, w, 1, "any") for (BK, BV), w in _RECURRENT_TABLE.items()]
    return tuple(out)


SHIPPED: tuple[KernelConfig, ...] = _build()


def block_size(dim: int) -> int:
    """Power-of-two tile covering ``dim`` (at least 32: tl.dot needs dims >= 16, and one
    padded size for small heads keeps the shipped list short)."""
    b = MIN_BLOCK
    while b < dim:
        b *= 2
    return b


def pick_config(kernel: str, BT: int, BK: int, BV_full: int, full_v: bool, learner: str = "gd") -> KernelConfig | None:
    """The config dispatch launches, or ``None`` when none is shipped. ``full_v`` (huber; the
    recurrent kernel) needs one block covering the padded dv (``BV == BV_full``); otherwise the
    value dim is split into ``BV``-wide blocks run by separate programs."""
    for c in SHIPPED:
        if c.kernel != kernel or c.BT != BT or c.BK != BK:
            continue
        if kernel != "recurrent_fwd" and c.learner != learner:
            continue
        if (c.BV == BV_full) if full_v else (c.BV <= BV_full and BV_full % c.BV == 0):
            return c
    return None
