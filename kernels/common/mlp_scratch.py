"""The MLP chunk kernels' per-program fp32 scratch: its layout and the ``@triton.jit`` helpers that
address it, shared by every phase kernel (``miras_mlp/chunk_kernels.py``, ``chunk_lq_kernels.py``,
``chunk_kl_kernels.py``). A phase hands what later phases of the same chunk need through this
region (L2 resident), so no value stays live in registers across phases.

Also here: the chunk prologue every phase starts with (which chunk of which sequence this
program works on, given the launch step) and the token/gate tile loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- scratch layout
# Per program (sequence, head) one fp32 scratch region, reused chunk after chunk:
#   NSLOT tiles [BT, SW] | NE_REG tiles [BT, E] | NVEC vectors [BT] | NSCA scalars.
# Every phase kernel reads what earlier phases of the same chunk wrote; a kernel never writes a
# location it also reads (threads of one program are not ordered without a barrier), except the
# read-modify-write of d(state) tiles through the same pointer tensor, and tiles handed from one
# part of a kernel to the next across a CTA barrier (``tl.debug_barrier()``: mid parks dU / dV,
# first parks dz_i; splits that keep the parts' [BT, D] tiles from being live at once).
NSLOT = tl.constexpr(22)
NE_REG = tl.constexpr(6)
NVEC = tl.constexpr(24)
NSCA = tl.constexpr(16)
# tile slots
S_DO = tl.constexpr(0)      # do_i = LN backward of the inner loss at the keys   [BT, D]
S_A2 = tl.constexpr(1)      # Gam * (Q K^T)                                      [BT, BT]
S_XH = tl.constexpr(2)      # LN(o) at the keys                                  [BT, D]
S_U = tl.constexpr(3)       # u = dl/dM                                          [BT, D]
S_DOQ = tl.constexpr(4)     # d(o') of the read                                  [BT, D]
S_DS1 = tl.constexpr(5)     # dA1 * Gam                                          [BT, BT]
S_DGR = tl.constexpr(6)     # d(Gam) from the read's output layer                [BT, BT]
S_GDR = tl.constexpr(7)     # d(do) from the read's output layer                 [BT, D]
S_OC = tl.constexpr(8)      # sum_blocks Hq W1^T (fwd: the read's o' before the Gram term)
S_OS = tl.constexpr(9)      # sum_blocks Hq S1^T                                 [BT, D]
S_SHH = tl.constexpr(10)    # Hq Hh^T                                            [BT, BT]
S_DQ = tl.constexpr(11)     # dq (partial)                                       [BT, D]
S_DK = tl.constexpr(12)     # dk (partial, after B1b)                            [BT, D]
S_DA2 = tl.constexpr(13)    # d(A2)                                              [BT, BT]
S_GDN = tl.constexpr(14)    # d(do) total                                        [BT, D]
S_DGAM = tl.constexpr(15)   # d(Gam) total                                       [BT, BT]
S_DOIN = tl.constexpr(16)   # d(o) at the keys (first layer)                     [BT, D]
S_DKM = tl.constexpr(17)    # dk after the A2 term                               [BT, D]
S_KT = tl.constexpr(18)     # K^T, fp32 (weight-gradient dots want M = D, not BH) [D, BT]
S_QT = tl.constexpr(19)     # Q^T, fp32                                          [D, BT]
S_GAMM = tl.constexpr(20)   # Gam, the in-chunk coefficient matrix               [BT, BT]
S_LQDK = tl.constexpr(21)   # lq: dk from the norms' adjoint (chunk_lq)           [BT, D]
# [BT, E] regions
R_GDZ = tl.constexpr(0)     # d(dz_i) from the read
R_GH = tl.constexpr(1)      # d(h_i) from the read
R_DZ = tl.constexpr(2)      # momentum: Q S2^T (read) | later d(z_i) partial (all but the LN-of-o path)
# R_GDZ also holds Q W2^T from phase qw until the backward's readgrad2 overwrites it
R_A = tl.constexpr(3)       # phase temporaries: fwd Hq | readgrad dZq | state d(dh) = d(dz) gelu'(z)
R_B = tl.constexpr(4)       # fwd Hh | readgrad Hq
R_C = tl.constexpr(5)       # dz_i
# backward before B2b: R_GDZ holds Q W2^T and R_GH holds h_i = gelu(z_i) (from the read phase)
# vectors
V_C = tl.constexpr(0)
V_GAM = tl.constexpr(1)
V_B = tl.constexpr(2)
V_PI = tl.constexpr(3)
V_RSTD = tl.constexpr(4)
V_DC0 = tl.constexpr(5)     # dc, db after the read's output layer
V_DB0 = tl.constexpr(6)
V_DGAM = tl.constexpr(7)
V_DPI = tl.constexpr(8)
V_DC = tl.constexpr(9)      # dc, db complete
V_DB = tl.constexpr(10)
V_GAR = tl.constexpr(11)    # row / column sums of dA * Dm (momentum gates)
V_GAC = tl.constexpr(12)
V_DETA = tl.constexpr(13)   # d(eta) through E = Dm Bm (momentum gates)
# retention lq (Moneta, chunk_lq): per-token q-norms n_t and scales s_t of X1, X2, their
# cotangents d s_t, and dc after the W2 norms' adjoint
V_N1 = tl.constexpr(14)
V_N2 = tl.constexpr(15)
V_S1 = tl.constexpr(16)
V_S2 = tl.constexpr(17)
V_DS1 = tl.constexpr(18)
V_DS2 = tl.constexpr(19)
V_LQDC = tl.constexpr(20)
V_LQDB = tl.constexpr(21)    # lq + momentum: db after the W2 norms' adjoint
# scalars
C_CC = tl.constexpr(0)
C_BC = tl.constexpr(1)
C_PC = tl.constexpr(2)
C_DCC = tl.constexpr(3)
C_DBC = tl.constexpr(4)
C_DPC = tl.constexpr(5)
C_N01 = tl.constexpr(6)     # lq: q-norm and scale s_0 of the chunk-start X1, X2 (inner gradients at s_0 X_0)
C_N02 = tl.constexpr(7)
C_S01 = tl.constexpr(8)
C_S02 = tl.constexpr(9)


@triton.jit
def token_offsets(H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """int32 offsets of a [BT, D] token tile from the chunk's base pointer (rematerialised at
    every use: a live [BT, D] int64 offset tile would cost two registers per element)."""
    return tl.arange(0, BT)[:, None] * (H * D) + tl.arange(0, D)[None, :]


@triton.jit
def load_tokens(base, tm, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """A [BT, D] token tile (masked rows -> 0), upcast to fp32."""
    return tl.load(base + token_offsets(H, D, BT), mask=tm[:, None], other=0.0).to(tl.float32)


@triton.jit
def load_gates(la, eta, dlt, lmu, go, tm):
    la_c = tl.load(la + go, mask=tm, other=0.0)
    et_c = tl.load(eta + go, mask=tm, other=0.0)
    dl_c = tl.load(dlt + go, mask=tm, other=1.0)
    lm_c = tl.load(lmu + go, mask=tm, other=0.0)
    return la_c, et_c, dl_c, lm_c


@triton.jit
def slot_ptrs(scr_p, SLOT: tl.constexpr, R: tl.constexpr, Cc: tl.constexpr, SW: tl.constexpr, BT: tl.constexpr):
    """Pointers of an [R, Cc] tile in scratch slot SLOT (slots are [BT, SW])."""
    return scr_p + SLOT * BT * SW + tl.arange(0, R)[:, None] * SW + tl.arange(0, Cc)[None, :]


@triton.jit
def slot_ptrs_t(scr_p, SLOT: tl.constexpr, D: tl.constexpr, SW: tl.constexpr, BT: tl.constexpr):
    """Pointers of a transposed [D, BT] tile in slot SLOT."""
    return scr_p + SLOT * BT * SW + tl.arange(0, D)[:, None] * BT + tl.arange(0, BT)[None, :]


@triton.jit
def slot_offsets(R: tl.constexpr, Cc: tl.constexpr, SW: tl.constexpr):
    """Offsets of an [R, Cc] tile inside a scratch slot of row width SW."""
    return tl.arange(0, R)[:, None] * SW + tl.arange(0, Cc)[None, :]


def scratch_floats(BT: int, SW: int, E: int) -> int:
    """fp32 scratch elements per program (see the layout above)."""
    return 22 * BT * SW + 6 * BT * E + 24 * BT + 16


@triton.jit
def scratch_base(i_nh, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    return i_nh.to(tl.int64) * (NSLOT * BT * SW + NE_REG * BT * E + NVEC * BT + NSCA)


@triton.jit
def chunk_prologue(cu, coff, step, H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr,
         SW: tl.constexpr, REV: tl.constexpr):
    """This program's chunk for launch ``step`` (chunks of each sequence in order, or in reverse
    for the backward): returns (valid, tm, tb, go, b_in, b_out, scratch base)."""
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    NTn = tl.cdiv(eos - bos, BT)
    if REV:
        c = NTn - 1 - step
    else:
        c = step + 0 * NTn
    t = bos + c * BT + tl.arange(0, BT)
    tm = t < eos
    tb = (bos + c * BT).to(tl.int64) * (H * D) + h * D
    go = t.to(tl.int64) * H + h
    j = (tl.load(coff + n) + n + c).to(tl.int64)
    b_in = (j * H + h) * (D * E)
    b_out = b_in + H * D * E
    scr_p = scratch_base(i_nh, BT, SW, E)
    return step < NTn, tm, tb, go, b_in, b_out, scr_p


@triton.jit
def region_ptrs(scr_p, R: tl.constexpr, hh, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """Pointers of the [BT, BH] block ``hh`` of [BT, E] region R."""
    return scr_p + NSLOT * BT * SW + R * BT * E + tl.arange(0, BT)[:, None] * E + hh[None, :]


@triton.jit
def vector_ptrs(scr_p, IDX: tl.constexpr, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """Pointers of vector IDX ([BT])."""
    return scr_p + NSLOT * BT * SW + NE_REG * BT * E + IDX * BT + tl.arange(0, BT)


@triton.jit
def scalar_ptr(scr_p, IDX: tl.constexpr, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """Pointer of scalar IDX."""
    return scr_p + NSLOT * BT * SW + NE_REG * BT * E + NVEC * BT + IDX


@triton.jit
def w0_offset(D: tl.constexpr, E: tl.constexpr):
    """lq: offset of this program's [D, E] / [E, D] block in the per-program d(W_0) buffers dw1,
    dw2 (the inner-gradient weights' cotangent, kept apart from d(X_0) until chunk_lq's dw0
    phase)."""
    return tl.program_id(0).to(tl.int64) * (D * E)


@triton.jit
def vector_entry_ptr(scr_p, IDX: tl.constexpr, t, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """Pointer of entry t of scratch vector IDX (a scalar load: no [BT] vector stays live in the
    token loops: on sm_80 those cost registers the tiles could not spare)."""
    return scr_p + NSLOT * BT * SW + NE_REG * BT * E + IDX * BT + t


@triton.jit
def chunk_origin(go, tm, BT: tl.constexpr):
    """(gate offset of the chunk's first token, number of valid tokens) as scalars."""
    g0 = tl.sum(tl.where(tl.arange(0, BT) == 0, go, 0), axis=0)
    return g0, tl.sum(tm.to(tl.int32), axis=0)


@triton.jit
def token_gate(x, g0, nv, t, H: tl.constexpr, other):
    """Gate of token t of the chunk as a scalar (``other`` past the sequence end)."""
    return tl.load(x + g0 + t * H, mask=t < nv, other=other)
