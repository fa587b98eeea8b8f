"""The shipped kernel configurations: every (kernel, BT, BK, BV, num_warps, num_stages) that
dispatch can launch. ``tools/kernel_report.py`` compiles exactly these for sm_80 and sm_90 and
fails on a compile error, a register spill or shared memory over the device limit, so a config
enters this table only once it compiles cleanly.

* ``BT`` is the chunk size (16, 32, 64); ``BK`` the key head dim padded to a power of two >= 16
  (masked loads cover dk in 16..128); ``BV`` the value block one program owns.
* The chunk kernels keep the state tile ``[BV, BK]`` (two for momentum) in registers, so larger
  tiles use more warps. Huber needs the whole value row in one program (``BV >= dv``).
* ``chunk_fwd``/``chunk_bwd_dstate``/``chunk_bwd_grads``: :mod:`kernels.miras_linear.chunk_kernels`;
  ``recurrent_fwd``: :mod:`kernels.miras_linear.fused_recurrent` (BT unused, set to 1).
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_SIZES = (16, 32, 64)
HEAD_BLOCKS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KernelConfig:
    kernel: str
    BT: int
    BK: int
    BV: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"BT={self.BT} BK={self.BK} BV={self.BV} w={self.num_warps} s={self.num_stages}"


def _chunk_warps(kernel: str, BT: int, BK: int, BV: int) -> int:
    # register pressure grows with the state tile and the [BT, BK] q/k tiles
    work = BV * BK + 2 * BT * BK + BT * BT
    if kernel == "chunk_bwd_grads":
        work *= 2
    if work <= 4096:
        return 2
    if work <= 16384:
        return 4
    return 8


def _build() -> tuple[KernelConfig, ...]:
    out: list[KernelConfig] = []
    for kernel in ("chunk_fwd", "chunk_bwd_dstate", "chunk_bwd_grads"):
        for BT in CHUNK_SIZES:
            for BK in HEAD_BLOCKS:
                for BV in HEAD_BLOCKS:
                    out.append(KernelConfig(kernel, BT, BK, BV, _chunk_warps(kernel, BT, BK, BV), 1))
    for BK in HEAD_BLOCKS:
        for BV in HEAD_BLOCKS:
            out.append(KernelConfig("recurrent_fwd", 1, BK, BV, 4 if BV * BK <= 4096 else 8, 1))
    return tuple(out)


SHIPPED: tuple[KernelConfig, ...] = _build()


def block_size(dim: int) -> int:
    """Power-of-two tile covering ``dim`` (at least 16: tl.dot needs dims >= 16)."""
    b = 16
    while b < dim:
        b *= 2
    return b


def pick_config(kernel: str, BT: int, BK: int, BV_full: int, full_v: bool) -> KernelConfig | None:
    """The config dispatch launches: the value block is the whole padded dv when ``full_v``
    (huber, lq), else the largest shipped block <= 64 that divides it (more programs, fewer
    registers). ``None`` when no shipped config fits."""
    cands = [c for c in SHIPPED if c.kernel == kernel and c.BT == BT and c.BK == BK]
    if full_v:
        cands = [c for c in cands if c.BV == BV_full]
    else:
        cands = [c for c in cands if c.BV <= min(BV_full, 64) and BV_full % c.BV == 0]
        cands.sort(key=lambda c: -c.BV)
    return cands[0] if cands else None
