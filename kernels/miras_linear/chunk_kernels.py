"""Chunk-parallel Triton kernels for the linear-memory Miras rule (none/decay retention, gd/momentum
learner, dot/l2/lp/huber bias). Semantics: ``docs/semantics.md`` (chunk semantics). Host side:
``chunk.py`` / ``chunk_launch.py``; shared jit helpers: ``miras_kernels.common``.

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

``step_at="retained"`` with mini-batch GD (``docs/semantics.md`` §6): token i takes its gradient at
``rho_i X0`` (decay: ``rho_i = exp(L_i)``; lq: times Moneta's scale of that state,
:func:`retained_scale`) -- a per-token scalar, so the ``RETAINED`` variants of ``state``,
``bwd_dstate`` and the dk launch of ``bwd_grads`` only rescale the residual's per-token rows and add
the gradient of ``rho`` w.r.t. log alpha (and lq's chunk-start norm).
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.linear_blocks import (
    RUNTIME_INTS,
    chunk_coefficients,
    chunk_end_coefficients,
    chunk_log_gates,
    chunk_of,
    init_final_adjoint,
    load_gate,
    load_state_block,
    load_token_tile,
    residual_adjoint,
    row_softmax_stats,
    sequence_bounds,
    store_gate,
    store_state_block,
    store_token_tile,
)
from miras_kernels.common.tiles import (
    bias_map_grad_n,
    bias_map_n,
    chunk_rev_cumsum,
    decay_matrix,
    dot32,
    pick,
    pick_row,
)

@triton.jit
def retained_scale(b_L, n0, qexp, lq_eps, LQ: tl.constexpr):
    """``step_at="retained"`` (mini-batch GD): token i takes its gradient at ``rho_i X0`` with
    ``g_i = exp(L_i)`` (L: chunk-local cumulative log alpha), ``rho_i = g_i`` (decay) or
    ``g_i (g_i n0 + eps)^(2-q)`` (lq: Moneta's scale of ``g_i X0``, ``n0 = ||X0||_q``). Returns
    ``(rho, f_L, f_n)`` ``[BT]``: ``rho``, ``(d rho / d L) / rho`` and ``(d rho / d n0) / rho`` --
    the backward multiplies them with ``<dE_i, E_i + v_i> = rho_i <dE_i, K_i X0^T>``, so no
    division by ``rho`` (which may be ~0) is ever taken."""
    b_g = tl.exp(b_L)
    if LQ:
        b_gn = b_g * n0 + lq_eps
        rho = b_g * tl.exp((2.0 - qexp) * tl.log(b_gn))
        f_n = (2.0 - qexp) * b_g / b_gn
        f_L = 1.0 + f_n * n0
    else:
        rho = b_g
        f_L = b_g * 0.0 + 1.0
        f_n = b_g * 0.0
    return rho, f_L, f_n


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
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    qexp=4.0, lq_eps=1e-6, c=1.0, MAT: tl.constexpr = 0, RETAINED: tl.constexpr = False,
):
    """One program per (value-block group of ``NVB`` blocks, sequence * head).

    ``MAT`` (``chunk_mat_kernels``): the residual uses the chunk-start *weights*
    ``W0 = materialize(X0)``: 1 lq (``s(X0) X0``; the q-norm spans every value block, so the host
    launches one program per head, ``NVB`` = all blocks), 2 kl (``c softmax_rows(X0)``).
    ``RETAINED`` (``step_at="retained"``, none/decay/lq): token i's residual is taken at
    ``rho_i X0`` (:func:`retained_scale`) instead of at the chunk-start weights."""
    NK = tl.cdiv(K, BK)
    i_vg = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = sequence_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
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
                store_state_block(hs, load_state_block(h0, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
                if MOMENTUM:
                    store_state_block(ss, load_state_block(s0, i_v, i_k, K, V, BK, BV), i_v, i_k, K, V, BK, BV)
            else:
                store_state_block(hs, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
                if MOMENTUM:
                    store_state_block(ss, tl.zeros([BV, BK], dtype=tl.float32), i_v, i_k, K, V, BK, BV)
    tl.debug_barrier()

    for i_t in tl.range(0, n_chunks, disable_licm=True):
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_eta = load_gate(eta, t0, seq_len, H, BT)
        if BIAS == 3:
            b_delta = load_gate(delta, t0, seq_len, H, BT)
        else:
            b_delta = b_eta
        if BIAS != 0:
            if MAT == 1:
                # lq: s0 = (||X0||_q + eps)^(2-q) over the whole state of the head
                b_nq = 0.0
                for jv in tl.range(0, NVB, disable_licm=True):
                    for i_k in tl.range(0, NK, disable_licm=True):
                        b_ax = tl.abs(load_state_block(hs + cur, i_vg * NVB + jv, i_k, K, V, BK, BV))
                        b_nq += tl.sum(tl.sum(tl.where(b_ax > 0.0, tl.exp(qexp * tl.log(tl.maximum(b_ax, 1e-36))), 0.0), axis=1), axis=0)
                b_n0 = tl.exp(tl.log(tl.maximum(b_nq, 1e-36)) / qexp)
                b_s0 = tl.exp((2.0 - qexp) * tl.log(b_n0 + lq_eps))
            else:
                b_n0 = 0.0
            if RETAINED:
                # the gates are needed after the residual anyway: computed once, live across it
                b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
            # residual E = K W0^T - V per value block (key dim accumulated block by block)
            b_n2 = tl.zeros([BT], dtype=tl.float32)
            for jv in tl.range(0, NVB, disable_licm=True):
                i_v = i_vg * NVB + jv
                if MAT == 1 and not RETAINED:
                    b_e = tl.zeros([BT, BV], dtype=tl.float32)
                else:
                    b_e = -load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if MAT == 2:
                    b_m, b_l = row_softmax_stats(hs + cur, i_v, K, V, BK, BV)
                for i_k in tl.range(0, NK, disable_licm=True):
                    b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                    if RETAINED:
                        # rho_i K_i X0^T: scaling the key rows (rho recomputed from L per block)
                        # keeps no extra [BT, BV] tile and no rho vector live across the loop
                        b_rho, b_fl, b_fn = retained_scale(b_L, b_n0, qexp, lq_eps, MAT == 1)
                        b_k = b_k * b_rho[:, None]
                    b_w0 = load_state_block(hs + cur, i_v, i_k, K, V, BK, BV)
                    if MAT == 2:
                        o_k = i_k * BK + tl.arange(0, BK)
                        b_w0 = tl.where((o_k < K)[None, :], tl.exp(b_w0 - b_m[:, None]), 0.0) * (c / b_l)[:, None]
                    b_e += dot32(b_k, tl.trans(b_w0), DOT_PRECISION)
                if MAT == 1 and not RETAINED:
                    b_e = b_e * b_s0 - load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                store_token_tile(ebuf, b_e, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if BIAS == 3:
                    b_n2 += tl.sum(b_e * b_e, axis=1)
            b_nrm = tl.sqrt(b_n2)
            if BIAS == 3:
                store_gate(nbuf, b_nrm, t0, seq_len, H, BT)
            tl.debug_barrier()
        else:
            b_nrm = b_eta
        if not (RETAINED and BIAS != 0):
            b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
        b_b, b_bm, eL_last, eM_last, c_last = chunk_end_coefficients(b_L, b_M, b_eta, last, BT, MOMENTUM)
        for jv in tl.range(0, NVB, disable_licm=True):
            i_v = i_vg * NVB + jv
            b_vv = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            if BIAS != 0:
                b_e = load_token_tile(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            else:
                b_e = b_vv
            b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
            for i_k in tl.range(0, NK, disable_licm=True):
                b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_w = load_state_block(hs + cur, i_v, i_k, K, V, BK, BV)
                b_wn = eL_last * b_w - dot32(tl.trans(b_u * b_b[:, None]), b_k, DOT_PRECISION)
                if MOMENTUM:
                    b_s = load_state_block(ss + cur, i_v, i_k, K, V, BK, BV)
                    b_wn += c_last * b_s
                    b_sn = eM_last * b_s - dot32(tl.trans(b_u * b_bm[:, None]), b_k, DOT_PRECISION)
                    store_state_block(ss + nxt, b_sn, i_v, i_k, K, V, BK, BV)
                store_state_block(hs + nxt, b_wn, i_v, i_k, K, V, BK, BV)
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
    DOT_PRECISION: tl.constexpr,
):
    """One program per (value block, chunk, sequence * head) (varlen: (value block, flat chunk, head))."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
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
        b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k), DOT_PRECISION)
        b_qw += dot32(b_q, tl.trans(load_state_block(hs, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
        if MOMENTUM:
            b_qs += dot32(b_q, tl.trans(load_state_block(ss, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
    b_eta = load_gate(eta, t0, seq_len, H, BT)
    b_vv = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS != 0:
        b_e = load_token_tile(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    else:
        b_e = b_vv
    if BIAS == 3:
        b_delta = load_gate(delta, t0, seq_len, H, BT)
        b_nrm = load_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
    b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_dl, b_g, b_c = chunk_coefficients(b_L, b_M, BT, MOMENTUM, DOT_PRECISION)
    b_y = tl.exp(b_L)[:, None] * b_qw - dot32(b_qk * b_g * b_eta[None, :], b_u, DOT_PRECISION)
    if MOMENTUM:
        b_y += b_c[:, None] * b_qs
    store_token_tile(y, b_y, t0, seq_len, H * V, i_v * BV, V, BT, BV)


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
    DOT_PRECISION: tl.constexpr,
):
    """The part of du that does not depend on the state adjoint, chunk-parallel (same grid as
    ``out``), so the sequential adjoint pass needs no [BT, BT] tile."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
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
        b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k), DOT_PRECISION)
    b_eta = load_gate(eta, t0, seq_len, H, BT)
    b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_dl, b_g, b_c = chunk_coefficients(b_L, b_M, BT, MOMENTUM, DOT_PRECISION)
    b_dy = load_token_tile(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    store_token_tile(dua, -dot32(tl.trans(b_qk * b_g * b_eta[None, :]), b_dy, DOT_PRECISION), t0, seq_len, H * V, i_v * BV, V, BT, BV)


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
    USE_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RETAINED: tl.constexpr = False,
):
    """One program per (value block, sequence * head); chunks in reverse. Value blocks are
    independent here (huber needs only the saved norm). ``RETAINED``: the residual of token i
    was taken at ``exp(L_i) X0``, so its adjoint reaches ``X0`` scaled by ``exp(L_i)``."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = sequence_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
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

    init_final_adjoint(dhs, dss, dht, dst, fin, i_v, K, V, BK, BV, USE_DHT, MOMENTUM)
    tl.debug_barrier()

    for i_r in tl.range(0, n_chunks, disable_licm=True):
        i_t = n_chunks - 1 - i_r
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_eta = load_gate(eta, t0, seq_len, H, BT)
        b_dy = load_token_tile(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
        b_b, b_bm, eL_last, eM_last, c_last = chunk_end_coefficients(b_L, b_M, b_eta, last, BT, MOMENTUM)
        if BIAS != 0:
            # du = -A^T dy - b * (K dW^T) [- bm * (K dS^T)],  A = (Q K^T) * G * eta; the first
            # term does not depend on the carried adjoint, so a chunk-parallel launch computed it
            # (this sequential kernel then holds no [BT, BT] tile)
            b_de, b_e = residual_adjoint(dua, k, ebuf, nbuf, delta, dhs + nxt, dss + nxt, b_b, b_bm, b_eta, t0,
                                          seq_len, H, p, i_v, K, V, BT, BK, BV, BIAS, EPS, MOMENTUM, DOT_PRECISION)
            if RETAINED:
                b_de = b_de * tl.exp(b_L)[:, None]
        else:
            b_de = b_dy
        if MOMENTUM:
            b_c = tl.sum(decay_matrix(b_L, BT) * tl.exp(b_M)[None, :], axis=1)
        b_ydy = tl.exp(b_L)[:, None] * b_dy
        for i_k in tl.range(0, NK, disable_licm=True):
            b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_dwn = load_state_block(dhs + nxt, i_v, i_k, K, V, BK, BV)
            b_dwp = eL_last * b_dwn + dot32(tl.trans(b_ydy), b_q, DOT_PRECISION)
            if BIAS != 0:
                b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_dwp += dot32(tl.trans(b_de), b_k, DOT_PRECISION)
            if MOMENTUM:
                b_dsp = c_last * b_dwn + eM_last * load_state_block(dss + nxt, i_v, i_k, K, V, BK, BV)
                b_dsp += dot32(tl.trans(b_c[:, None] * b_dy), b_q, DOT_PRECISION)
                store_state_block(dss + cur, b_dsp, i_v, i_k, K, V, BK, BV)
            store_state_block(dhs + cur, b_dwp, i_v, i_k, K, V, BK, BV)
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
    IS_VARLEN: tl.constexpr, PART: tl.constexpr, DOT_PRECISION: tl.constexpr,
    dul=None, LOCAL_DU: tl.constexpr = False,
    dlr=None, n0s=None, qexp=4.0, lq_eps=1e-6, RETAINED: tl.constexpr = False, LQ: tl.constexpr = False,
):
    """PART 0: dq, deta; PART 1: dk, dv, ddelta; PART 2: dla; PART 3: dlmu (separate launches,
    so none holds the whole backward live set).
    W0/S0 are the states at the chunk's slot, dW/dS the adjoints at the next slot (chunk end).
    ``LOCAL_DU`` (lq/kl, ``chunk_mat_kernels``): PART 1 adds the per-token reads' share of dL/du
    (``dul`` ``[B*T, H, V]``), and the host passes the chunk-start *weights* as ``hs`` (the only
    use of ``hs`` in PART 1 is the residual's ``dk += dE W0``).
    ``RETAINED`` (``step_at="retained"``, PART 1): the residual of token i was taken at
    ``rho_i X0`` (:func:`retained_scale`; ``LQ``: lq, ``n0s`` ``[NS, H]`` the chunk-start q-norms,
    ``hs`` is then ``X0``), so ``dk_i += rho_i dE_i X0`` and PART 1 also writes the share of
    d log alpha that goes through ``rho`` into ``dlr`` ``[NV, B*T, H]``."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
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
    b_eta = load_gate(eta, t0, seq_len, H, BT)
    b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    b_b, b_bm, eL_last, eM_last, c_last = chunk_end_coefficients(b_L, b_M, b_eta, last, BT, MOMENTUM)

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
        b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_qk += dot32(b_q, tl.trans(b_k), DOT_PRECISION)
        b_dw = load_state_block(dhs, i_v, i_k, K, V, BK, BV)
        b_kdw += dot32(b_k, tl.trans(b_dw), DOT_PRECISION)
        if MOMENTUM:
            b_ds = load_state_block(dss, i_v, i_k, K, V, BK, BV)
            b_kds += dot32(b_k, tl.trans(b_ds), DOT_PRECISION)
        if PART == 2:
            b_w = load_state_block(hs, i_v, i_k, K, V, BK, BV)
            b_qw += dot32(b_q, tl.trans(b_w), DOT_PRECISION)
            b_sww += tl.sum(b_dw * b_w, axis=1)
        if PART >= 2 and MOMENTUM:
            b_s = load_state_block(ss, i_v, i_k, K, V, BK, BV)
            b_qs += dot32(b_q, tl.trans(b_s), DOT_PRECISION)
            b_sws += tl.sum(b_dw * b_s, axis=1)
            if PART == 3:
                b_sss += tl.sum(b_ds * b_s, axis=1)

    b_dy = load_token_tile(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    b_vv = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS != 0:
        b_e = load_token_tile(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    else:
        b_e = b_vv
    if BIAS == 3:
        b_delta = load_gate(delta, t0, seq_len, H, BT)
        b_nrm = load_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = b_eta
        b_nrm = b_eta
    b_u = bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)
    b_dl, b_g, b_c = chunk_coefficients(b_L, b_M, BT, MOMENTUM, DOT_PRECISION)
    b_da = -dot32(b_dy, tl.trans(b_u), DOT_PRECISION)  # dLoss/d(A), A = (Q K^T) * G * eta  [BT, BT]
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
            store_gate(deta, b_deta, t0, seq_len, H, BT)
            for i_k in tl.range(0, NK, disable_licm=True):
                b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                b_dq = dot32(b_eL[:, None] * b_dy, load_state_block(hs, i_v, i_k, K, V, BK, BV), DOT_PRECISION) + dot32(b_dag, b_k, DOT_PRECISION)
                if MOMENTUM:
                    b_dq += dot32(b_c[:, None] * b_dy, load_state_block(ss, i_v, i_k, K, V, BK, BV), DOT_PRECISION)
                store_token_tile(dq, b_dq, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        else:
            b_dg = b_da * b_qk * b_eta[None, :] + tl.where(is_last[:, None], (b_db * b_eta)[None, :], 0.0)
            # through the decay matrices to the cumulative log gates (then reverse cumsum in the chunk)
            if MOMENTUM:
                b_dc = tl.sum(b_dy * b_qs, axis=1)
                b_dc += tl.where(is_last, tl.sum(b_sws, axis=0), 0.0)
                b_eM = tl.exp(b_M)
            if PART == 2:
                if MOMENTUM:
                    b_ddl = dot32(b_dg, tl.trans(decay_matrix(b_M, BT)), DOT_PRECISION) + b_dc[:, None] * b_eM[None, :]
                else:
                    b_ddl = b_dg
                b_hl = b_ddl * b_dl
                b_dL = tl.sum(b_hl, axis=1) - tl.sum(b_hl, axis=0)
                b_dL += b_eL * tl.sum(b_dy * b_qw, axis=1)
                b_dL += tl.where(is_last, tl.sum(b_sww, axis=0) * eL_last, 0.0)
                store_gate(dla, chunk_rev_cumsum(b_dL, BT), t0, seq_len, H, BT)
            if PART == 3:
                b_dmm = b_dbm * b_eta
                deM_last = tl.sum(b_sss, axis=0)
                b_hm = dot32(tl.trans(b_dl), b_dg, DOT_PRECISION) * decay_matrix(b_M, BT)
                b_dM = tl.sum(b_hm, axis=1) - tl.sum(b_hm, axis=0)
                b_dM += b_eM * tl.sum(b_dc[:, None] * b_dl, axis=0)
                b_dM -= b_dmm * b_mm
                b_dM += tl.where(is_last, tl.sum(b_dmm * b_mm, axis=0) + deM_last * eM_last, 0.0)
                store_gate(dlmu, chunk_rev_cumsum(b_dM, BT), t0, seq_len, H, BT)
    else:
        # ---- dk, dv, ddelta
        b_du = -dot32(tl.trans(b_qk * b_g * b_eta[None, :]), b_dy, DOT_PRECISION) - b_b[:, None] * b_kdw
        if MOMENTUM:
            b_du -= b_bm[:, None] * b_kds
        if LOCAL_DU:
            b_du += load_token_tile(dul + (bos * H + i_h) * V, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        if BIAS == 0:
            b_de = b_du
            store_token_tile(dv, -b_du, t0, seq_len, H * V, i_v * BV, V, BT, BV)  # u = -v
        else:
            b_de, b_dd = bias_map_grad_n(b_e, b_nrm, b_du, b_delta, p, BIAS, EPS)
            store_token_tile(dv, -b_de, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            if BIAS == 3:
                store_gate(ddelta, b_dd, t0, seq_len, H, BT)
            if RETAINED:
                # d rho_i / d L_i <dE_i, K_i X0^T> = f_L <dE_i, E_i + v_i>, then into the gates
                if LQ:
                    b_n0 = tl.load(n0s + slot * H + i_h)
                else:
                    b_n0 = 0.0
                b_rho, b_fl, b_fn = retained_scale(b_L, b_n0, qexp, lq_eps, LQ)
                b_dLr = b_fl * tl.sum(b_de * (b_e + b_vv), axis=1)  # stored after the dk loop (its [BT, BT]
                b_de = b_de * b_rho[:, None]                         # reverse cumsum then has the registers)
        for i_k in tl.range(0, NK, disable_licm=True):
            b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_dk = dot32(tl.trans(b_dag), b_q, DOT_PRECISION) - b_b[:, None] * dot32(b_u, load_state_block(dhs, i_v, i_k, K, V, BK, BV), DOT_PRECISION)
            if MOMENTUM:
                b_dk -= b_bm[:, None] * dot32(b_u, load_state_block(dss, i_v, i_k, K, V, BK, BV), DOT_PRECISION)
            if BIAS != 0:
                b_dk += dot32(b_de, load_state_block(hs, i_v, i_k, K, V, BK, BV), DOT_PRECISION)
            store_token_tile(dk, b_dk, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        if RETAINED and BIAS != 0:
            store_gate(dlr + (part + bos) * H + i_h, chunk_rev_cumsum(b_dLr, BT), t0, seq_len, H, BT)
