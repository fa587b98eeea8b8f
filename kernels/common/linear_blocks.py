"""``@triton.jit`` helpers of the linear family's chunk kernels (``miras_linear/chunk_kernels.py``,
``miras_linear/chunk_mat_kernels.py``): masked loads and stores of token tiles, gates and state
blocks, where a sequence or chunk lives in the flat buffers, the in-chunk coefficients of the
affine update, and the adjoint pieces both backward passes share. All math in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.tiles import bias_map_grad_n, chunk_cumsum, decay_matrix, dot32, pick

# Integer arguments never specialised on their value (Triton would otherwise compile separate
# binaries for ``== 1`` and ``% 16 == 0``): the launched binary is then exactly the one
# tools/kernel_report.py compiles and checks for spills, whatever the sequence length and head dims.
RUNTIME_INTS = ["T", "H", "K", "V", "NTOK"]


# ----------------------------------------------------------------------------- memory helpers
@triton.jit
def load_token_tile(base, t0, seq_len, stride, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    """Rows ``t0..t0+BT`` x cols ``c0..c0+BD`` of a token-major ``[seq_len, D]`` view (zero padded).
    ``base`` already points at the sequence's first token and the head's first column."""
    o_t = t0 + tl.arange(0, BT)
    o_d = c0 + tl.arange(0, BD)
    mask = (o_t < seq_len)[:, None] & (o_d < D)[None, :]
    return tl.load(base + o_t[:, None] * stride + o_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_token_tile(base, x, t0, seq_len, stride, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    o_d = c0 + tl.arange(0, BD)
    mask = (o_t < seq_len)[:, None] & (o_d < D)[None, :]
    tl.store(base + o_t[:, None] * stride + o_d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_gate(base, t0, seq_len, H, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    return tl.load(base + o_t * H, mask=o_t < seq_len, other=0.0)


@triton.jit
def store_gate(base, x, t0, seq_len, H, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    tl.store(base + o_t * H, x, mask=o_t < seq_len)


@triton.jit
def load_state_block(base, i_v, i_k, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Block ``(i_v, i_k)`` of a ``[V, K]`` fp32 state matrix at ``base`` (zero padded)."""
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = i_k * BK + tl.arange(0, BK)
    return tl.load(base + o_v[:, None] * K + o_k[None, :], mask=(o_v < V)[:, None] & (o_k < K)[None, :], other=0.0)


@triton.jit
def store_state_block(base, x, i_v, i_k, K, V, BK: tl.constexpr, BV: tl.constexpr):
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(base + o_v[:, None] * K + o_k[None, :], x, mask=(o_v < V)[:, None] & (o_k < K)[None, :])


@triton.jit
def sequence_bounds(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token row, length, first state slot) of sequence ``i_n``; a sequence of n chunks
    owns ``n + 1`` state slots (every chunk start, then the final state)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        slot0 = tl.load(chunk_offsets + i_n).to(tl.int64) + i_n
        seq_len = (eos - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        slot0 = i_n.to(tl.int64) * (tl.cdiv(T, BT) + 1)
    return bos, seq_len, slot0


@triton.jit
def chunk_of(cu_seqlens, chunk_indices, i_c, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, chunk within it, first token row, length, state slot of the chunk start) for a
    chunk-parallel program (``i_c``: flat chunk index with varlen, else chunk index)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        slot = i_c.to(tl.int64) + i_n
    else:
        i_t = i_c
        bos = i_n.to(tl.int64) * T
        seq_len = T
        slot = i_n.to(tl.int64) * (tl.cdiv(T, BT) + 1) + i_t
    return i_n, i_t, bos, seq_len, slot


@triton.jit
def chunk_log_gates(la, lmu, t0, seq_len, H, BT: tl.constexpr, HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr):
    """Chunk-local cumulative log gates ``L`` (alpha) and ``M`` (mu; zeros without momentum)."""
    if HAS_ALPHA:
        b_L = chunk_cumsum(load_gate(la, t0, seq_len, H, BT), BT)
    else:
        b_L = tl.zeros([BT], dtype=tl.float32)
    if MOMENTUM:
        b_M = chunk_cumsum(load_gate(lmu, t0, seq_len, H, BT), BT)
    else:
        b_M = tl.zeros([BT], dtype=tl.float32)
    return b_L, b_M


@triton.jit
def chunk_coefficients(b_L, b_M, BT: tl.constexpr, MOMENTUM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(D_L, G, c): decay matrix of alpha, coefficient matrix of g_i in X_t, coefficient of S0."""
    b_dl = decay_matrix(b_L, BT)
    if MOMENTUM:
        b_g = dot32(b_dl, decay_matrix(b_M, BT), DOT_PRECISION)
        b_c = tl.sum(b_dl * tl.exp(b_M)[None, :], axis=1)
    else:
        b_g = b_dl
        b_c = tl.zeros([BT], dtype=tl.float32)
    return b_dl, b_g, b_c


@triton.jit
def chunk_end_coefficients(b_L, b_M, b_eta, last, BT: tl.constexpr, MOMENTUM: tl.constexpr):
    """Vectors of the chunk-end update without any [BT, BT] product: ``b = eta * G[last]``,
    ``bm = eta * exp(M_last - M)`` (momentum), ``exp(L_last)``, ``exp(M_last)``, ``c_last``."""
    o = tl.arange(0, BT)
    L_last = pick(b_L, last, BT)
    rowL = tl.where(o <= last, tl.exp(L_last - b_L), 0.0)  # D_L[last, :]
    if MOMENTUM:
        M_last = pick(b_M, last, BT)
        gam = tl.sum(rowL[:, None] * decay_matrix(b_M, BT), axis=0)  # (D_L @ D_M)[last, :]
        bm = b_eta * tl.where(o <= last, tl.exp(M_last - b_M), 0.0)
        c_last = tl.sum(rowL * tl.exp(b_M), axis=0)
        eM_last = tl.exp(M_last)
    else:
        gam = rowL
        bm = b_eta * 0.0
        c_last = 0.0
        eM_last = 0.0
    return b_eta * gam, bm, tl.exp(L_last), eM_last, c_last


@triton.jit
def init_final_adjoint(dhs, dss, dht, dst, fin, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr,
                        USE_DHT: tl.constexpr, MOMENTUM: tl.constexpr):
    """Value-block row ``i_v`` of the adjoint at a sequence's final slot: the final-state
    cotangents, or zeros."""
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        if USE_DHT:
            store_state_block(dhs + fin, load_state_block(dht, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
            if MOMENTUM:
                store_state_block(dss + fin, load_state_block(dst, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
        else:
            store_state_block(dhs + fin, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
            if MOMENTUM:
                store_state_block(dss + fin, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)


@triton.jit
def residual_adjoint(dua, k, ebuf, nbuf, delta, dwn, dsn, b_b, b_bm, b_eta, t0, seq_len, H, p, i_v, K, V,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BIAS: tl.constexpr,
                      EPS: tl.constexpr, MOMENTUM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dL/dE of a chunk's value block ``[BT, BV]`` (l2/lp/huber): ``du = dua - b * (K dW^T)
    [- bm * (K dS^T)]`` with the chunk-end adjoints ``dwn``/``dsn``, through the bias map."""
    b_du = load_token_tile(dua, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_du -= b_b[:, None] * dot32(b_k, tl.trans(load_state_block(dwn, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
        if MOMENTUM:
            b_du -= b_bm[:, None] * dot32(b_k, tl.trans(load_state_block(dsn, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
    b_e = load_token_tile(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS == 3:
        b_delta = load_gate(delta, t0, seq_len, H, BT)
        b_nrm = load_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_de, b_dd = bias_map_grad_n(b_e, b_nrm, b_du, b_delta, p, BIAS, EPS)
    return b_de, b_e


@triton.jit
def row_softmax_stats(base, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Row max and softmax denominator ``[BV]`` of the rows ``i_v*BV ..`` of a ``[V, K]`` fp32
    matrix (kl: the chunk-start weights are ``c softmax_rows(X0)``), two passes over key blocks."""
    b_m = tl.zeros([BV], dtype=tl.float32) - float("inf")
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        o_k = i_k * BK + tl.arange(0, BK)
        z = tl.where((o_k < K)[None, :], load_state_block(base, i_v, i_k, K, V, BK, BV), float("-inf"))
        b_m = tl.maximum(b_m, tl.max(z, axis=1))
    b_l = tl.zeros([BV], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        o_k = i_k * BK + tl.arange(0, BK)
        z = tl.where((o_k < K)[None, :], load_state_block(base, i_v, i_k, K, V, BK, BV), float("-inf"))
        b_l += tl.sum(tl.exp(z - b_m[:, None]), axis=1)
    return b_m, b_l
