"""Chunk-parallel Triton kernels for the linear-memory Miras rule (none/decay retention, gd/momentum
learner, dot/l2/lp/huber bias). Semantics: ``/work/shared/miras-notes.md`` section 3.

Inside a chunk of ``BT`` tokens with chunk-start state ``W0`` (and momentum ``S0``) every product
is a small matmul:

    E = K W0^T - V,  U = f(E)                                       ([BT, dv])
    Y = exp(L) * (Q W0^T) [+ c * (Q S0^T)] - ((Q K^T) * G * eta) U
    W_end = exp(L_last) W0 [+ c_last S0] - (U * eta * G[last])^T K
    S_end = exp(M_last) S0 - (U * eta * exp(M_last - M))^T K        (momentum)

``L``/``M`` are the chunk-local cumulative log(alpha)/log(mu), ``G = D_L`` (gd) or ``D_L @ D_M``
(momentum: the coefficient of g_i in X_t is sum_{s=i..t} exp(L_t-L_s+M_s-M_i)), ``c_t =
sum_s D_L[t, s] exp(M_s)``.

Blocking (why no kernel spills at head dims up to 128): the state never lives in registers as a
whole. It lives in global memory (the per-chunk state buffer the backward needs anyway, L2
resident while a program walks its chunks) and every kernel loops over ``[BV, BK]`` blocks of it:
products that contract the key dim (``K W0^T``, ``Q K^T``, ``Q W0^T``) accumulate over the key
blocks, updates are written block by block. Loops use ``tl.range(..., disable_licm=True)`` so the
compiler does not hoist block loads (and their address tiles) out of the loops and keep them live.
Value rows are independent except through the huber row norm ``||e||_2`` over the whole dv: the
state kernel of a huber call runs one program per (sequence, head) that first reduces the norm
over every value block (staging ``E`` in global memory), then applies the bias map block by
block; every other kernel splits dv into ``BV``-wide programs (huber's backward needs only the
saved norm).

Kernels:

* ``state`` (sequential): per (sequence, head, value-block group) walks the chunks in order,
  computes ``E`` (saved, fp32 ``[B*T, H, dv]``; plus the huber row norm ``[B*T, H]``) and writes the
  state at every chunk start and the final state into ``hs`` (``[NS, H, dv, dk]``, ``NS = sum over
  sequences of n_chunks + 1``).
* ``out`` (parallel over chunks): y from the saved chunk-start state and ``E``.
* ``bwd_du`` (parallel over chunks): ``-(A^T dy)``, the part of the residual's adjoint that does
  not depend on the carried state adjoint (so the sequential pass below holds no [BT, BT] tile).
* ``bwd_dstate`` (sequential, chunks in reverse): the adjoint of the state at every slot of ``hs``.
* ``bwd_grads`` (parallel over chunks, four launches ``PART`` 0: dq and d eta, 1: dk, dv,
  d delta, 2: d log alpha (if alpha), 3: d log mu (if momentum)): every input gradient of its
  chunk from the saved state and state adjoint, recomputing the intra-chunk products (Q K^T,
  decay matrices, U) instead of storing them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.tiles import (
    bias_map_grad_n,
    bias_map_n,
    chunk_cumsum,
    chunk_rev_cumsum,
    decay_matrix,
    dot32,
    pick,
    pick_row,
)


# Integer arguments never specialised on their value (Triton would otherwise compile separate
# binaries for ``== 1`` and ``% 16 == 0``): the launched binary is then exactly the one
# tools/kernel_report.py compiles and checks for spills, whatever the sequence length and head dims.
RUNTIME_INTS = ["T", "H", "K", "V", "NTOK"]


# ----------------------------------------------------------------------------- memory helpers
@triton.jit
def _ld_tok(base, t0, seq_len, stride, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    """Rows ``t0..t0+BT`` x cols ``c0..c0+BD`` of a token-major ``[seq_len, D]`` view (zero padded).
    ``base`` already points at the sequence's first token and the head's first column."""
    o_t = t0 + tl.arange(0, BT)
    o_d = c0 + tl.arange(0, BD)
    mask = (o_t < seq_len)[:, None] & (o_d < D)[None, :]
    return tl.load(base + o_t[:, None] * stride + o_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _st_tok(base, x, t0, seq_len, stride, c0, D, BT: tl.constexpr, BD: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    o_d = c0 + tl.arange(0, BD)
    mask = (o_t < seq_len)[:, None] & (o_d < D)[None, :]
    tl.store(base + o_t[:, None] * stride + o_d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _ld_gate(base, t0, seq_len, H, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    return tl.load(base + o_t * H, mask=o_t < seq_len, other=0.0)


@triton.jit
def _st_gate(base, x, t0, seq_len, H, BT: tl.constexpr):
    o_t = t0 + tl.arange(0, BT)
    tl.store(base + o_t * H, x, mask=o_t < seq_len)


@triton.jit
def _ld_blk(base, i_v, i_k, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Block ``(i_v, i_k)`` of a ``[V, K]`` fp32 state matrix at ``base`` (zero padded)."""
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = i_k * BK + tl.arange(0, BK)
    return tl.load(base + o_v[:, None] * K + o_k[None, :], mask=(o_v < V)[:, None] & (o_k < K)[None, :], other=0.0)


@triton.jit
def _st_blk(base, x, i_v, i_k, K, V, BK: tl.constexpr, BV: tl.constexpr):
    o_v = i_v * BV + tl.arange(0, BV)
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(base + o_v[:, None] * K + o_k[None, :], x, mask=(o_v < V)[:, None] & (o_k < K)[None, :])


@triton.jit
def _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
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
def _chunk_of(cu_seqlens, chunk_indices, i_c, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
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
def _gates(la, lmu, t0, seq_len, H, BT: tl.constexpr, HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr):
    """Chunk-local cumulative log gates ``L`` (alpha) and ``M`` (mu; zeros without momentum)."""
    if HAS_ALPHA:
        b_L = chunk_cumsum(_ld_gate(la, t0, seq_len, H, BT), BT)
    else:
        b_L = tl.zeros([BT], dtype=tl.float32)
    if MOMENTUM:
        b_M = chunk_cumsum(_ld_gate(lmu, t0, seq_len, H, BT), BT)
    else:
        b_M = tl.zeros([BT], dtype=tl.float32)
    return b_L, b_M


@triton.jit
def _coef(b_L, b_M, BT: tl.constexpr, MOMENTUM: tl.constexpr):
    """(D_L, G, c): decay matrix of alpha, coefficient matrix of g_i in X_t, coefficient of S0."""
    b_dl = decay_matrix(b_L, BT)
    if MOMENTUM:
        b_g = dot32(b_dl, decay_matrix(b_M, BT))
        b_c = tl.sum(b_dl * tl.exp(b_M)[None, :], axis=1)
    else:
        b_g = b_dl
        b_c = tl.zeros([BT], dtype=tl.float32)
    return b_dl, b_g, b_c


@triton.jit
def _end_coef(b_L, b_M, b_eta, last, BT: tl.constexpr, MOMENTUM: tl.constexpr):
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
def _init_final_adjoint(dhs, dss, dht, dst, fin, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr,
                        USE_DHT: tl.constexpr, MOMENTUM: tl.constexpr):
    """Value-block row ``i_v`` of the adjoint at a sequence's final slot: the final-state
    cotangents, or zeros."""
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        if USE_DHT:
            _st_blk(dhs + fin, _ld_blk(dht, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
            if MOMENTUM:
                _st_blk(dss + fin, _ld_blk(dst, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
        else:
            _st_blk(dhs + fin, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
            if MOMENTUM:
                _st_blk(dss + fin, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)


@triton.jit
def _residual_adjoint(dua, k, ebuf, nbuf, delta, dwn, dsn, b_b, b_bm, b_eta, t0, seq_len, H, p, i_v, K, V,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BIAS: tl.constexpr,
                      EPS: tl.constexpr, MOMENTUM: tl.constexpr):
    """dL/dE of a chunk's value block ``[BT, BV]`` (l2/lp/huber): ``du = dua - b * (K dW^T)
    [- bm * (K dS^T)]`` with the chunk-end adjoints ``dwn``/``dsn``, through the bias map."""
    b_du = _ld_tok(dua, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_du -= b_b[:, None] * dot32(b_k, tl.trans(_ld_blk(dwn, i_v, i_k, K, V, BK, BV)))
        if MOMENTUM:
            b_du -= b_bm[:, None] * dot32(b_k, tl.trans(_ld_blk(dsn, i_v, i_k, K, V, BK, BV)))
    b_e = _ld_tok(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS == 3:
        b_delta = _ld_gate(delta, t0, seq_len, H, BT)
        b_nrm = _ld_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_de, b_dd = bias_map_grad_n(b_e, b_nrm, b_du, b_delta, p, BIAS, EPS)
    return b_de, b_e


@triton.jit
def _row_softmax_stats(base, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Row max and softmax denominator ``[BV]`` of the rows ``i_v*BV ..`` of a ``[V, K]`` fp32
    matrix (kl: the chunk-start weights are ``c softmax_rows(X0)``), two passes over key blocks."""
    b_m = tl.zeros([BV], dtype=tl.float32) - float("inf")
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        o_k = i_k * BK + tl.arange(0, BK)
        z = tl.where((o_k < K)[None, :], _ld_blk(base, i_v, i_k, K, V, BK, BV), float("-inf"))
        b_m = tl.maximum(b_m, tl.max(z, axis=1))
    b_l = tl.zeros([BV], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        o_k = i_k * BK + tl.arange(0, BK)
        z = tl.where((o_k < K)[None, :], _ld_blk(base, i_v, i_k, K, V, BK, BV), float("-inf"))
        b_l += tl.sum(tl.exp(z - b_m[:, None]), axis=1)
    return b_m, b_l


# ----------------------------------------------------------------------------- forward: state pass
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_state_kernel(
    k, v, la, lmu, eta, delta,  # k [B*T,H,K]; v [B*T,H,V]; gates fp32 [B*T,H] (log alpha/mu)
    h0, s0,  # initial states [N, H, V, K] fp32
    hs, ss,  # out: states at every chunk start + final [NS, H, V, K] fp32
    ebuf, nbuf,  # out: residual E [B*T, H, V] fp32; huber row norm [B*T, H] fp32
    cu_seqlens, chunk_offsets,
    T, H, p,
    K, V,  # head dims (runtime: one binary per config serves every dk, dv <= 128)
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    qexp=4.0, lq_eps=1e-6, c=1.0, MAT: tl.constexpr = 0,
):
    """One program per (value-block group of ``NVB`` blocks, sequence * head).

    ``MAT`` (``chunk_mat_kernels``): the residual uses the chunk-start *weights*
    ``W0 = materialize(X0)``: 1 lq (``s(X0) X0``; the q-norm spans every value block, so the host
    launches one program per head, ``NVB`` = all blocks), 2 kl (``c softmax_rows(X0)``)."""
    NK = tl.cdiv(K, BK)
    i_vg = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    hs += (slot0 * H + i_h) * V * K
    ss += (slot0 * H + i_h) * V * K
    h0 += i_nh.to(tl.int64) * V * K
    s0 += i_nh.to(tl.int64) * V * K
    slot_stride = H * V * K

    for jv in tl.range(0, NVB, disable_licm=True):
        i_v = i_vg * NVB + jv
        for i_k in tl.range(0, NK, disable_licm=True):
            if USE_H0:
                _st_blk(hs, _ld_blk(h0, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
                if MOMENTUM:
                    _st_blk(ss, _ld_blk(s0, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
            else:
                _st_blk(hs, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
                if MOMENTUM:
                    _st_blk(ss, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
    tl.debug_barrier()

    for i_t in tl.range(0, n_chunks, disable_licm=True):
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_eta = _ld_gate(eta, t0, seq_len, H, BT)
        if BIAS == 3:
            b_delta = _ld_gate(delta, t0, seq_len, H, BT)
        else:
            b_delta = b_eta
        if BIAS != 0:
            if MAT == 1:
                # lq: s0 = (||X0||_q + eps)^(2-q) over the whole state of the head
                b_nq = 0.0
                for jv in tl.range(0, NVB, disable_licm=True):
                    for i_k in tl.range(0, NK, disable_licm=True):
                        b_ax = tl.abs(_ld_blk(hs + cur, i_vg * NVB + jv, i_k, K, V, BK, BV))
                        b_nq += tl.sum(tl.sum(tl.where(b_ax > 0.0, tl.exp(qexp * tl.log(tl.maximum(b_ax, 1e-36))), 0.0), axis=1), axis=0)
                b_s0 = tl.exp((2.0 - qexp) * tl.log(tl.exp(tl.log(tl.maximum(b_nq, 1e-36)) / qexp) + lq_eps))
            # residual E = K W0^T - V per value block (key dim accumulated block by block)
            b_n2 = tl.zeros([BT], dtype=tl.float32)
            for jv in tl.range(0, NVB, disable_licm=True):
                i_v = i_vg * NVB + jv
                if MAT == 1:
                    b_e = tl.zeros([BT, BV], dtype=tl.float32)
                else:
                    b_e = -_ld_tok(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if MAT == 2:
                    b_m, b_l = _row_softmax_stats(hs + cur, i_v, K, V, BK, BV)
                for i_k in tl.range(0, NK, disable_licm=True):
                    b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                    b_w0 = _ld_blk(hs + cur, i_v, i_k, K, V, BK, BV)
                    if MAT == 2:
                        o_k = i_k * BK + tl.arange(0, BK)
                        b_w0 = tl.where((o_k < K)[None, :], tl.exp(b_w0 - b_m[:, None]), 0.0) * (c / b_l)[:, None]
                    b_e += dot32(b_k, tl.trans(b_w0))
                if MAT == 1:
                    b_e = b_e * b_s0 - _ld_tok(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                _st_tok(ebuf, b_e, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if BIAS == 3:
                    b_n2 += tl.sum(b_e * b_e, axis=1)
            b_nrm = tl.sqrt(b_n2)
            if BIAS == 3:
                _st_gate(nbuf, b_nrm, t0, seq_len, H, BT)
            tl.debug_barrier()
        else:
            b_nrm = b_eta
        b_L, b_M = _gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
        b_b, b_bm, eL_last, eM_last, c_last = _end_coef(b_L, b_M, b_eta, last, BT, MOMENTUM)
        for jv in tl.range(0, NVB, disable_licm=True):
            i_v = i_vg * NVB + jv
            b_vv = _ld_tok(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            if BIAS != 0:
                b_e = _ld_tok(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            else:
                b_e = b_vv
            b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
            for i_k in tl.range(0, NK, disable_licm=True):
                b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_w = _ld_blk(hs + cur, i_v, i_k, K, V, BK, BV)
                b_wn = eL_last * b_w - dot32(tl.trans(b_u * b_b[:, None]), b_k)
                if MOMENTUM:
                    b_s = _ld_blk(ss + cur, i_v, i_k, K, V, BK, BV)
                    b_wn += c_last * b_s
                    b_sn = eM_last * b_s - dot32(tl.trans(b_u * b_bm[:, None]), b_k)
                    _st_blk(ss + nxt, b_sn, i_v, i_k, K, V, BK, BV)
                _st_blk(hs + nxt, b_wn, i_v, i_k, K, V, BK, BV)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- forward: output
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_out_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ss, ebuf, nbuf,
    y,  # out [B*T, H, V] (q's dtype)
    cu_seqlens, chunk_indices,
    T, H, p,
    K, V,  # head dims (runtime: one binary per config serves every dk, dv <= 128)
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One program per (value block, chunk, sequence * head) (varlen: (value block, flat chunk, head))."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = _chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    y += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    hs += (slot * H + i_h) * V * K
    ss += (slot * H + i_h) * V * K
    t0 = i_t * BT

    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_qw = tl.zeros([BT, BV], dtype=tl.float32)
    b_qs = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in tl.range(0, NK, disable_licm=True):
        b_q = _ld_tok(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k))
        b_qw += dot32(b_q, tl.trans(_ld_blk(hs, i_v, i_k, K, V, BK, BV)))
        if MOMENTUM:
            b_qs += dot32(b_q, tl.trans(_ld_blk(ss, i_v, i_k, K, V, BK, BV)))
    b_eta = _ld_gate(eta, t0, seq_len, H, BT)
    b_vv = _ld_tok(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS != 0:
        b_e = _ld_tok(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    else:
        b_e = b_vv
    if BIAS == 3:
        b_delta = _ld_gate(delta, t0, seq_len, H, BT)
        b_nrm = _ld_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
    b_L, b_M = _gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_dl, b_g, b_c = _coef(b_L, b_M, BT, MOMENTUM)
    b_y = tl.exp(b_L)[:, None] * b_qw - dot32(b_qk * b_g * b_eta[None, :], b_u)
    if MOMENTUM:
        b_y += b_c[:, None] * b_qs
    _st_tok(y, b_y, t0, seq_len, H * V, i_v * BV, V, BT, BV)


# ----------------------------------------------------------------------------- backward: -(A^T dy)
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_bwd_du_kernel(
    q, k, la, lmu, eta,
    dy,
    dua,  # out: -(A^T dy) [B*T, H, V] fp32, A = (Q K^T) * G * eta
    cu_seqlens, chunk_indices,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """The part of du that does not depend on the state adjoint, chunk-parallel (same grid as
    ``out``), so the sequential adjoint pass needs no [BT, BT] tile."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = _chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    dy += (bos * H + i_h) * V
    dua += (bos * H + i_h) * V
    eta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    t0 = i_t * BT
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in tl.range(0, NK, disable_licm=True):
        b_q = _ld_tok(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k))
    b_eta = _ld_gate(eta, t0, seq_len, H, BT)
    b_L, b_M = _gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_dl, b_g, b_c = _coef(b_L, b_M, BT, MOMENTUM)
    b_dy = _ld_tok(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    _st_tok(dua, -dot32(tl.trans(b_qk * b_g * b_eta[None, :]), b_dy), t0, seq_len, H * V, i_v * BV, V, BT, BV)


# ----------------------------------------------------------------------------- backward: state adjoints
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_bwd_dstate_kernel(
    q, k, v, la, lmu, eta, delta,
    ebuf, nbuf,  # saved residual and huber row norm
    dua,  # -(A^T dy) [B*T, H, V] fp32 from miras_linear_chunk_bwd_du_kernel (unused for dot)
    dy, dht, dst,  # dy [B*T, H, V]; d final states [N, H, V, K] fp32
    dhs, dss,  # out: adjoint of the state at every slot [NS, H, V, K] fp32
    cu_seqlens, chunk_offsets,
    T, H, p,
    K, V,  # head dims (runtime: one binary per config serves every dk, dv <= 128)
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    USE_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One program per (value block, sequence * head); chunks in reverse. Value blocks are
    independent here (huber needs only the saved norm)."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    dy += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    dua += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    dhs += (slot0 * H + i_h) * V * K
    dss += (slot0 * H + i_h) * V * K
    dht += i_nh.to(tl.int64) * V * K
    dst += i_nh.to(tl.int64) * V * K
    slot_stride = H * V * K
    fin = (slot0 * 0 + n_chunks) * slot_stride

    _init_final_adjoint(dhs, dss, dht, dst, fin, i_v, K, V, BK, BV, USE_DHT, MOMENTUM)
    tl.debug_barrier()

    for i_r in tl.range(0, n_chunks, disable_licm=True):
        i_t = n_chunks - 1 - i_r
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_eta = _ld_gate(eta, t0, seq_len, H, BT)
        b_dy = _ld_tok(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_L, b_M = _gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
        b_b, b_bm, eL_last, eM_last, c_last = _end_coef(b_L, b_M, b_eta, last, BT, MOMENTUM)
        if BIAS != 0:
            # du = -A^T dy - b * (K dW^T) [- bm * (K dS^T)],  A = (Q K^T) * G * eta; the first
            # term does not depend on the carried adjoint, so a chunk-parallel launch computed it
            # (this sequential kernel then holds no [BT, BT] tile)
            b_de, b_e = _residual_adjoint(dua, k, ebuf, nbuf, delta, dhs + nxt, dss + nxt, b_b, b_bm, b_eta, t0,
                                          seq_len, H, p, i_v, K, V, BT, BK, BV, BIAS, EPS, MOMENTUM)
        else:
            b_de = b_dy
        if MOMENTUM:
            b_c = tl.sum(decay_matrix(b_L, BT) * tl.exp(b_M)[None, :], axis=1)
        b_ydy = tl.exp(b_L)[:, None] * b_dy
        for i_k in tl.range(0, NK, disable_licm=True):
            b_q = _ld_tok(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_dwn = _ld_blk(dhs + nxt, i_v, i_k, K, V, BK, BV)
            b_dwp = eL_last * b_dwn + dot32(tl.trans(b_ydy), b_q)
            if BIAS != 0:
                b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_dwp += dot32(tl.trans(b_de), b_k)
            if MOMENTUM:
                b_dsp = c_last * b_dwn + eM_last * _ld_blk(dss + nxt, i_v, i_k, K, V, BK, BV)
                b_dsp += dot32(tl.trans(b_c[:, None] * b_dy), b_q)
                _st_blk(dss + cur, b_dsp, i_v, i_k, K, V, BK, BV)
            _st_blk(dhs + cur, b_dwp, i_v, i_k, K, V, BK, BV)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- backward: input grads
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_bwd_grads_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ss, dhs, dss,  # states and state adjoints per slot [NS, H, V, K] fp32
    ebuf, nbuf,
    dy,
    dq, dk, dv, dla, dlmu, deta, ddelta,  # dq/dk [NV, B*T, H, K] fp32; dv [B*T, H, V]; gates [NV, B*T, H]
    cu_seqlens, chunk_indices,  # chunk_indices [NT_total, 2] int32: (sequence, chunk) for varlen
    T, H, NTOK, p,
    K, V,  # head dims (runtime: one binary per config serves every dk, dv <= 128)
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    IS_VARLEN: tl.constexpr, PART: tl.constexpr,
    dul=None, LOCAL_DU: tl.constexpr = False,
):
    """PART 0: dq, deta; PART 1: dk, dv, ddelta; PART 2: dla; PART 3: dlmu (separate launches,
    so none holds the whole backward live set).
    W0/S0 are the states at the chunk's slot, dW/dS the adjoints at the next slot (chunk end).
    ``LOCAL_DU`` (lq/kl, ``chunk_mat_kernels``): PART 1 adds the per-token reads' share of dL/du
    (``dul`` ``[B*T, H, V]``), and the host passes the chunk-start *weights* as ``hs`` (the only
    use of ``hs`` in PART 1 is the residual's ``dk += dE W0``)."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = _chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    part = i_v.to(tl.int64) * NTOK  # per-value-block partial gradients
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    dy += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    dq += ((part + bos) * H + i_h) * K
    dk += ((part + bos) * H + i_h) * K
    dv += (bos * H + i_h) * V
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    deta += (part + bos) * H + i_h
    ddelta += (part + bos) * H + i_h
    dla += (part + bos) * H + i_h
    dlmu += (part + bos) * H + i_h
    hs += (slot * H + i_h) * V * K
    ss += (slot * H + i_h) * V * K
    nxt = H * V * K
    dhs += (slot * H + i_h) * V * K + nxt
    dss += (slot * H + i_h) * V * K + nxt

    t0 = i_t * BT
    last = tl.minimum(seq_len - t0, BT) - 1
    is_last = tl.arange(0, BT) == last
    b_eta = _ld_gate(eta, t0, seq_len, H, BT)
    b_L, b_M = _gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_b, b_bm, eL_last, eM_last, c_last = _end_coef(b_L, b_M, b_eta, last, BT, MOMENTUM)

    # pass over key blocks: Q K^T, K dW^T, K dS^T (and for PART 2 Q W0^T, Q S0^T, <dW, W0> ...)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    b_kdw = tl.zeros([BT, BV], dtype=tl.float32)
    b_kds = tl.zeros([BT, BV], dtype=tl.float32)
    b_qw = tl.zeros([BT, BV], dtype=tl.float32)
    b_qs = tl.zeros([BT, BV], dtype=tl.float32)
    b_sww = tl.zeros([BV], dtype=tl.float32)
    b_sws = tl.zeros([BV], dtype=tl.float32)
    b_sss = tl.zeros([BV], dtype=tl.float32)
    for i_k in tl.range(0, NK, disable_licm=True):
        b_q = _ld_tok(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k))
        b_dw = _ld_blk(dhs, i_v, i_k, K, V, BK, BV)
        b_kdw += dot32(b_k, tl.trans(b_dw))
        if MOMENTUM:
            b_ds = _ld_blk(dss, i_v, i_k, K, V, BK, BV)
            b_kds += dot32(b_k, tl.trans(b_ds))
        if PART == 2:
            b_w = _ld_blk(hs, i_v, i_k, K, V, BK, BV)
            b_qw += dot32(b_q, tl.trans(b_w))
            b_sww += tl.sum(b_dw * b_w, axis=1)
        if PART >= 2 and MOMENTUM:
            b_s = _ld_blk(ss, i_v, i_k, K, V, BK, BV)
            b_qs += dot32(b_q, tl.trans(b_s))
            b_sws += tl.sum(b_dw * b_s, axis=1)
            if PART == 3:
                b_sss += tl.sum(b_ds * b_s, axis=1)

    b_dy = _ld_tok(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    b_vv = _ld_tok(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS != 0:
        b_e = _ld_tok(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    else:
        b_e = b_vv
    if BIAS == 3:
        b_delta = _ld_gate(delta, t0, seq_len, H, BT)
        b_nrm = _ld_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
    b_dl, b_g, b_c = _coef(b_L, b_M, BT, MOMENTUM)
    b_da = -dot32(b_dy, tl.trans(b_u))  # dLoss/d(A), A = (Q K^T) * G * eta  [BT, BT]
    b_dag = b_da * b_g * b_eta[None, :]

    if PART != 1:
        # ---- PART 0: dq, deta; PART 2 / 3: the alpha / mu gate gradients (separate launches: the
        #      gate algebra is where the [BT, BT] tiles pile up)
        b_eL = tl.exp(b_L)
        b_db = -tl.sum(b_u * b_kdw, axis=1)
        if MOMENTUM:
            M_last = pick(b_M, last, BT)
            b_mm = tl.where(tl.arange(0, BT) <= last, tl.exp(M_last - b_M), 0.0)
            b_dbm = -tl.sum(b_u * b_kds, axis=1)
        if PART == 0:
            b_gam = pick_row(b_g, last, BT)
            b_deta = tl.sum(b_da * b_qk * b_g, axis=0) + b_db * b_gam
            if MOMENTUM:
                b_deta += b_dbm * b_mm
            _st_gate(deta, b_deta, t0, seq_len, H, BT)
            for i_k in tl.range(0, NK, disable_licm=True):
                b_k = _ld_tok(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_dq = dot32(b_eL[:, None] * b_dy, _ld_blk(hs, i_v, i_k, K, V, BK, BV)) + dot32(b_dag, b_k)
                if MOMENTUM:
                    b_dq += dot32(b_c[:, None] * b_dy, _ld_blk(ss, i_v, i_k, K, V, BK, BV))
                _st_tok(dq, b_dq, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        else:
            b_dg = b_da * b_qk * b_eta[None, :] + tl.where(is_last[:, None], (b_db * b_eta)[None, :], 0.0)
            # through the decay matrices to the cumulative log gates (then reverse cumsum in the chunk)
            if MOMENTUM:
                b_dc = tl.sum(b_dy * b_qs, axis=1)
                b_dc += tl.where(is_last, tl.sum(b_sws, axis=0), 0.0)
                b_eM = tl.exp(b_M)
            if PART == 2:
                if MOMENTUM:
                    b_ddl = dot32(b_dg, tl.trans(decay_matrix(b_M, BT))) + b_dc[:, None] * b_eM[None, :]
                else:
                    b_ddl = b_dg
                b_hl = b_ddl * b_dl
                b_dL = tl.sum(b_hl, axis=1) - tl.sum(b_hl, axis=0)
                b_dL += b_eL * tl.sum(b_dy * b_qw, axis=1)
                b_dL += tl.where(is_last, tl.sum(b_sww, axis=0) * eL_last, 0.0)
                _st_gate(dla, chunk_rev_cumsum(b_dL, BT), t0, seq_len, H, BT)
            if PART == 3:
                b_dmm = b_dbm * b_eta
                deM_last = tl.sum(b_sss, axis=0)
                b_hm = dot32(tl.trans(b_dl), b_dg) * decay_matrix(b_M, BT)
                b_dM = tl.sum(b_hm, axis=1) - tl.sum(b_hm, axis=0)
                b_dM += b_eM * tl.sum(b_dc[:, None] * b_dl, axis=0)
                b_dM -= b_dmm * b_mm
                b_dM += tl.where(is_last, tl.sum(b_dmm * b_mm, axis=0) + deM_last * eM_last, 0.0)
                _st_gate(dlmu, chunk_rev_cumsum(b_dM, BT), t0, seq_len, H, BT)
    else:
        # ---- dk, dv, ddelta
        b_du = -dot32(tl.trans(b_qk * b_g * b_eta[None, :]), b_dy) - b_b[:, None] * b_kdw
        if MOMENTUM:
            b_du -= b_bm[:, None] * b_kds
        if LOCAL_DU:
            b_du += _ld_tok(dul + (bos * H + i_h) * V, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        if BIAS == 0:
            b_de = b_du
            _st_tok(dv, -b_du, t0, seq_len, H * V, i_v * BV, V, BT, BV)  # u = -v
        else:
            b_de, b_dd = bias_map_grad_n(b_e, b_nrm, b_du, b_delta, p, BIAS, EPS)
            _st_tok(dv, -b_de, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            if BIAS == 3:
                _st_gate(ddelta, b_dd, t0, seq_len, H, BT)
        for i_k in tl.range(0, NK, disable_licm=True):
            b_q = _ld_tok(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_dk = dot32(tl.trans(b_dag), b_q) - b_b[:, None] * dot32(b_u, _ld_blk(dhs, i_v, i_k, K, V, BK, BV))
            if MOMENTUM:
                b_dk -= b_bm[:, None] * dot32(b_u, _ld_blk(dss, i_v, i_k, K, V, BK, BV))
            if BIAS != 0:
                b_dk += dot32(b_de, _ld_blk(hs, i_v, i_k, K, V, BK, BV))
            _st_tok(dk, b_dk, t0, seq_len, H * K, i_k * BK, K, BT, BK)
