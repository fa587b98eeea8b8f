"""Triton kernels of the exact delta rule (``MirasSpec.chunk_rule="exact"``: DeltaNet, Gated
DeltaNet), chunk-parallel with the WY / UT transform. Host side: ``chunk_exact.py``.

Per token (``docs/semantics.md``; ``a = alpha``, ``b = eta``, state ``S [dv, dk]``):

    step_at "previous":  S_t = a_t S_{t-1} + b_t (v_t - S_{t-1} k_t) k_t^T
    step_at "retained":  S_t = a_t S_{t-1} + b_t (v_t - a_t S_{t-1} k_t) k_t^T   (Gated DeltaNet)

Inside a chunk with start state ``S0``, ``L`` = chunk-local cumulative log alpha and ``Lr`` the
log decay of the state the gradient is taken at (``Lr = L`` retained, ``L - log a`` previous),
every state is ``S_t = e^{L_t} S0 + sum_{i<=t} e^{L_t - L_i} u_i k_i^T`` with the new values

    u = U - W S0^T,   U = T diag(b) V,   W = T diag(b e^{Lr}) K,   T = (I + A)^{-1},
    A[i, j] = b_i e^{Lr_i - L_j} <k_i, k_j>   (j < i, else 0)

(``u_i = b_i (v_i - S'_i k_i)``, ``S'_i`` the state the step is taken at). ``T``, ``W`` and ``U``
do not depend on the state (chunk-parallel, ``wy_fwd``); the sequential pass (``state``) forms
``u`` and the chunk-start states; the outputs are gated linear attention with values ``u``
(``chunk_kernels.miras_linear_chunk_out_kernel`` with the dot bias and eta = 1). Every exponent
is a difference of cumulative log gates with the later index first, so it is <= 0.

Backward: the gated-linear-attention part (q, k, log alpha through the reads and the state
update, ``dS`` at every chunk start) is ``chunk_kernels``' dot-bias backward with values ``u``;
the state adjoint carries the extra path ``S0 -> u`` (``bwd_dstate`` here, which also writes
``du``), and ``wy_bwd`` takes ``du`` back through ``u = U - W S0^T`` and the triangular solve
to k, v, eta and log alpha.

Blocking as in ``chunk_kernels``: the state is never whole in registers; key and value dims are
looped over in ``BK`` / ``BV`` blocks, every ``[BT, BT]`` tile is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.linear_blocks import (
    RUNTIME_INTS,
    chunk_of,
    load_gate,
    load_state_block,
    load_token_tile,
    sequence_bounds,
    store_gate,
    store_state_block,
    store_token_tile,
)
from miras_kernels.common.tiles import chunk_cumsum, chunk_rev_cumsum, dot32, pick


@triton.jit
def delta_chunk_gates(la, eta, t0, seq_len, H, BT: tl.constexpr, HAS_ALPHA: tl.constexpr,
                      RETAINED: tl.constexpr):
    """``(L, Lr, b, e^{Lr} b)`` ``[BT]`` of one chunk (zeros past the sequence end)."""
    b_b = load_gate(eta, t0, seq_len, H, BT)
    if HAS_ALPHA:
        b_la = load_gate(la, t0, seq_len, H, BT)
        b_L = chunk_cumsum(b_la, BT)
        if RETAINED:
            b_Lr = b_L
        else:
            b_Lr = b_L - b_la
    else:
        b_L = tl.zeros([BT], dtype=tl.float32)
        b_Lr = b_L
    return b_L, b_Lr, b_b, b_b * tl.exp(b_Lr)


@triton.jit
def delta_decay_ratio(b_Lr, b_L, BT: tl.constexpr):
    """``E[i, j] = e^{Lr_i - L_j}`` for ``j < i`` else 0 (exponent masked before ``exp``)."""
    o = tl.arange(0, BT)
    m = o[:, None] > o[None, :]
    return tl.where(m, tl.exp(tl.where(m, b_Lr[:, None] - b_L[None, :], 0.0)), 0.0)


@triton.jit
def delta_gram(k, t0, seq_len, H, K, BT: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``K K^T`` ``[BT, BT]`` of one chunk, accumulated over key blocks."""
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_kk += dot32(b_k, tl.trans(b_k), DOT_PRECISION)
    return b_kk


# ----------------------------------------------------------------------------- forward: T, W, U
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_delta_wy_fwd_kernel(
    k, v, la, eta,  # k [B*T,H,K]; v [B*T,H,V]; log alpha, eta fp32 [B*T,H]
    tinv,  # out: T = (I + A)^{-1} of every chunk, row per token [B*T, H, BT] fp32
    wbuf, ubuf,  # out: W [B*T, H, K], U [B*T, H, V] fp32
    cu_seqlens, chunk_indices,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, RETAINED: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (chunk, sequence * head) (varlen: (flat chunk, head))."""
    i_c = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    wbuf += (bos * H + i_h) * K
    ubuf += (bos * H + i_h) * V
    tinv += (bos * H + i_h) * BT
    la += bos * H + i_h
    eta += bos * H + i_h
    t0 = i_t * BT
    b_L, b_Lr, b_b, b_c = delta_chunk_gates(la, eta, t0, seq_len, H, BT, HAS_ALPHA, RETAINED)
    b_a = b_b[:, None] * delta_decay_ratio(b_Lr, b_L, BT) * delta_gram(k, t0, seq_len, H, K, BT, BK, DOT_PRECISION)
    # T = (I + A)^{-1} by forward substitution: row i = e_i - A[i, :] T (rows j < i are final and
    # A[i, j] = 0 for j >= i). BT <= 64 steps of [BT, BT] vector work, no dot: exact in fp32.
    o = tl.arange(0, BT)
    b_T = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.range(1, BT):
        a_i = tl.sum(tl.where((o == i)[:, None], b_a, 0.0), axis=0)
        r_i = tl.sum(a_i[:, None] * b_T, axis=0)
        b_T = tl.where((o == i)[:, None], b_T - r_i[None, :], b_T)
    store_token_tile(tinv, b_T, t0, seq_len, H * BT, 0, BT, BT, BT)
    for i_k in tl.range(0, tl.cdiv(K, BK), disable_licm=True):
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        store_token_tile(wbuf, dot32(b_T, b_c[:, None] * b_k, DOT_PRECISION), t0, seq_len, H * K, i_k * BK, K, BT, BK)
    for i_v in tl.range(0, tl.cdiv(V, BV), disable_licm=True):
        b_v = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        store_token_tile(ubuf, dot32(b_T, b_b[:, None] * b_v, DOT_PRECISION), t0, seq_len, H * V, i_v * BV, V, BT, BV)


# ----------------------------------------------------------------------------- forward: state pass
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_delta_state_kernel(
    k, wbuf, ubuf, la,  # k [B*T,H,K]; W [B*T,H,K], U [B*T,H,V] fp32; log alpha [B*T,H]
    h0,  # initial state [N, H, V, K] fp32
    hs,  # out: state at every chunk start + final [NS, H, V, K] fp32
    vnew,  # out: new values u = U - W S0^T [B*T, H, V] fp32
    cu_seqlens, chunk_offsets,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (value block, sequence * head), chunks in order (value rows of the state
    are independent in the delta rule: ``u`` and the update of row block ``i_v`` only read it)."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = sequence_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)
    k += (bos * H + i_h) * K
    wbuf += (bos * H + i_h) * K
    ubuf += (bos * H + i_h) * V
    vnew += (bos * H + i_h) * V
    la += bos * H + i_h
    hs += (slot0 * H + i_h) * V * K
    h0 += i_nh.to(tl.int64) * V * K
    slot_stride = H * V * K
    for i_k in tl.range(0, NK, disable_licm=True):
        if USE_H0:
            b_h = load_state_block(h0, i_v, i_k, K, V, BK, BV)
        else:
            b_h = tl.zeros([BV, BK], dtype=tl.float32)
        store_state_block(hs, b_h, i_v, i_k, K, V, BK, BV)
    tl.debug_barrier()
    o = tl.arange(0, BT)
    for i_t in tl.range(0, n_chunks, disable_licm=True):
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_u = load_token_tile(ubuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        for i_k in tl.range(0, NK, disable_licm=True):
            b_w = load_token_tile(wbuf, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_u -= dot32(b_w, tl.trans(load_state_block(hs + cur, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
        store_token_tile(vnew, b_u, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        if HAS_ALPHA:
            b_L = chunk_cumsum(load_gate(la, t0, seq_len, H, BT), BT)
        else:
            b_L = tl.zeros([BT], dtype=tl.float32)
        L_last = pick(b_L, last, BT)
        b_gam = tl.where(o <= last, tl.exp(L_last - b_L), 0.0)
        b_ug = b_u * b_gam[:, None]
        for i_k in tl.range(0, NK, disable_licm=True):
            b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_h = tl.exp(L_last) * load_state_block(hs + cur, i_v, i_k, K, V, BK, BV)
            b_h += dot32(tl.trans(b_ug), b_k, DOT_PRECISION)
            store_state_block(hs + nxt, b_h, i_v, i_k, K, V, BK, BV)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- backward: state adjoints
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_delta_bwd_dstate_kernel(
    q, k, wbuf, la,
    dua,  # -(A^T dy) [B*T, H, V] fp32, A = (Q K^T) * D_L (miras_linear_chunk_bwd_du_kernel, eta = 1)
    dy, dht,  # dy [B*T, H, V]; d final state [N, H, V, K] fp32
    dhs,  # out: adjoint of the state at every slot [NS, H, V, K] fp32
    dvnew,  # out: dL/du [B*T, H, V] fp32 (every path: reads, later states)
    cu_seqlens, chunk_offsets,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, USE_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (value block, sequence * head), chunks in reverse:
    ``du = (A^T dy) + gamma * (K dS1^T)``, ``dS0 = e^{L_last} dS1 + (e^L dy)^T Q - du^T W``."""
    NK = tl.cdiv(K, BK)
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, slot0 = sequence_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    wbuf += (bos * H + i_h) * K
    dua += (bos * H + i_h) * V
    dy += (bos * H + i_h) * V
    dvnew += (bos * H + i_h) * V
    la += bos * H + i_h
    dhs += (slot0 * H + i_h) * V * K
    dht += i_nh.to(tl.int64) * V * K
    slot_stride = H * V * K
    fin = (slot0 * 0 + n_chunks) * slot_stride
    for i_k in tl.range(0, NK, disable_licm=True):
        if USE_DHT:
            b_dh = load_state_block(dht, i_v, i_k, K, V, BK, BV)
        else:
            b_dh = tl.zeros([BV, BK], dtype=tl.float32)
        store_state_block(dhs + fin, b_dh, i_v, i_k, K, V, BK, BV)
    tl.debug_barrier()
    o = tl.arange(0, BT)
    for i_r in tl.range(0, n_chunks, disable_licm=True):
        i_t = n_chunks - 1 - i_r
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        if HAS_ALPHA:
            b_L = chunk_cumsum(load_gate(la, t0, seq_len, H, BT), BT)
        else:
            b_L = tl.zeros([BT], dtype=tl.float32)
        L_last = pick(b_L, last, BT)
        b_gam = tl.where(o <= last, tl.exp(L_last - b_L), 0.0)
        b_kds = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in tl.range(0, NK, disable_licm=True):
            b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_kds += dot32(b_k, tl.trans(load_state_block(dhs + nxt, i_v, i_k, K, V, BK, BV)), DOT_PRECISION)
        b_du = b_gam[:, None] * b_kds - load_token_tile(dua, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        store_token_tile(dvnew, b_du, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_ydy = tl.exp(b_L)[:, None] * load_token_tile(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        for i_k in tl.range(0, NK, disable_licm=True):
            b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_w = load_token_tile(wbuf, t0, seq_len, H * K, i_k * BK, K, BT, BK)
            b_dh = tl.exp(L_last) * load_state_block(dhs + nxt, i_v, i_k, K, V, BK, BV)
            b_dh += dot32(tl.trans(b_ydy), b_q, DOT_PRECISION) - dot32(tl.trans(b_du), b_w, DOT_PRECISION)
            store_state_block(dhs + cur, b_dh, i_v, i_k, K, V, BK, BV)
        tl.debug_barrier()


# ----------------------------------------------------------------------------- backward: through the WY form
# Two launches (one program per (chunk, sequence * head) each), so that no program holds T, dT,
# K K^T and the [BT, BT] products of the adjoint at once (one kernel spilled ~800 bytes on sm_80 at
# BT = 64): ``wy_bwd_da`` goes from du to dv, dW (staged) and dA, ``wy_bwd_dk`` from dA and dW to
# dk, eta and the log gates.
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_delta_wy_bwd_da_kernel(
    v, la, eta, tinv,
    hs,  # chunk-start states [NS, H, V, K] fp32
    dvnew,  # dL/du [B*T, H, V] fp32
    dwbuf,  # out: dL/dW = -du S0 [B*T, H, K] fp32
    dabuf,  # out: -T^T dT_U (U's share of -T^T dT) of every chunk, row per token [B*T, H, BT] fp32
    dv, deta,  # out: dv [B*T, H, V] fp32; d eta through U (wy_bwd_dk adds the rest) [B*T, H] fp32
    cu_seqlens, chunk_indices,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, RETAINED: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``dU = du`` through ``U = T diag(b) V`` to dv, eta and ``-T^T dT_U``; ``dW = -du S0``."""
    NK = tl.cdiv(K, BK)
    NV = tl.cdiv(V, BV)
    i_c = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    v += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    dwbuf += (bos * H + i_h) * K
    dvnew += (bos * H + i_h) * V
    tinv += (bos * H + i_h) * BT
    dabuf += (bos * H + i_h) * BT
    la += bos * H + i_h
    eta += bos * H + i_h
    deta += bos * H + i_h
    hs += (slot * H + i_h) * V * K
    t0 = i_t * BT
    b_L, b_Lr, b_b, b_c = delta_chunk_gates(la, eta, t0, seq_len, H, BT, HAS_ALPHA, RETAINED)
    b_T = load_token_tile(tinv, t0, seq_len, H * BT, 0, BT, BT, BT)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    # U = T diag(b) V:  dT += dU (bV)^T,  dV = b (T^T dU),  db += <T^T dU, V>
    for i_v in tl.range(0, NV, disable_licm=True):
        b_du = load_token_tile(dvnew, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_v = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_tdu = dot32(tl.trans(b_T), b_du, DOT_PRECISION)
        store_token_tile(dv, b_b[:, None] * b_tdu, t0, seq_len, H * V, i_v * BV, V, BT, BV)
        b_db += tl.sum(b_tdu * b_v, axis=1)
        b_dT += dot32(b_du, tl.trans(b_b[:, None] * b_v), DOT_PRECISION)
    store_gate(deta, b_db, t0, seq_len, H, BT)
    # dW = -du S0, staged for wy_bwd_dk (which adds W's term -(T^T dW)(cK)^T to -T^T dT)
    for i_k in tl.range(0, NK, disable_licm=True):
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in tl.range(0, NV, disable_licm=True):
            b_du = load_token_tile(dvnew, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            b_dw -= dot32(b_du, load_state_block(hs, i_v, i_k, K, V, BK, BV), DOT_PRECISION)
        store_token_tile(dwbuf, b_dw, t0, seq_len, H * K, i_k * BK, K, BT, BK)
    store_token_tile(dabuf, -dot32(tl.trans(b_T), b_dT, DOT_PRECISION), t0, seq_len, H * BT, 0, BT, BT, BT)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_delta_wy_bwd_dk_kernel(
    k, la, eta, tinv,
    dwbuf,  # dL/dW [B*T, H, K] fp32 (wy_bwd_da)
    dabuf,  # in: -T^T dT (the W term of dT still to add here) [B*T, H, BT] fp32
    dk,  # out: the WY share of dk [B*T, H, K] fp32 (the host adds the read/update share)
    dla, deta,  # out: the WY share of d log alpha; d eta (adds to wy_bwd_da's U share) [B*T, H] fp32
    cu_seqlens, chunk_indices,
    T, H,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, RETAINED: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Adds the ``W = T diag(c) K`` term to ``dT``, forms ``dA = -T^T dT T^T`` (strictly lower) and
    goes through ``A = diag(b) (E * K K^T)`` (``E[i, j] = e^{Lr_i - L_j}``) and ``W`` to k, eta
    and the log gates."""
    NK = tl.cdiv(K, BK)
    i_c = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    k += (bos * H + i_h) * K
    dk += (bos * H + i_h) * K
    dwbuf += (bos * H + i_h) * K
    tinv += (bos * H + i_h) * BT
    dabuf += (bos * H + i_h) * BT
    la += bos * H + i_h
    eta += bos * H + i_h
    dla += bos * H + i_h
    deta += bos * H + i_h
    t0 = i_t * BT
    b_L, b_Lr, b_b, b_c = delta_chunk_gates(la, eta, t0, seq_len, H, BT, HAS_ALPHA, RETAINED)
    # -T^T dT = (-T^T dT_U) + (-T^T dW (cK)^T): the second term per key block
    b_m = load_token_tile(dabuf, t0, seq_len, H * BT, 0, BT, BT, BT)
    b_T = load_token_tile(tinv, t0, seq_len, H * BT, 0, BT, BT, BT)
    b_dc = tl.zeros([BT], dtype=tl.float32)
    for i_k in tl.range(0, NK, disable_licm=True):
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_tdw = dot32(tl.trans(b_T), load_token_tile(dwbuf, t0, seq_len, H * K, i_k * BK, K, BT, BK), DOT_PRECISION)
        b_dc += tl.sum(b_tdw * b_k, axis=1)
        b_m -= dot32(b_tdw, tl.trans(b_c[:, None] * b_k), DOT_PRECISION)
        # dK from W = T diag(c) K: c * (T^T dW), stored now, the A term added below
        store_token_tile(dk, b_c[:, None] * b_tdw, t0, seq_len, H * K, i_k * BK, K, BT, BK)
    o = tl.arange(0, BT)
    b_dA = tl.where(o[:, None] > o[None, :], dot32(b_m, tl.trans(b_T), DOT_PRECISION), 0.0)
    b_kk = delta_gram(k, t0, seq_len, H, K, BT, BK, DOT_PRECISION)
    b_g = b_dA * delta_decay_ratio(b_Lr, b_L, BT)  # dA * E
    b_db = tl.sum(b_g * b_kk, axis=1)
    b_daa = b_g * b_kk * b_b[:, None]  # dA * A: d Lr_i (rows), -d L_j (columns)
    b_dLr = tl.sum(b_daa, axis=1)
    b_dL = -tl.sum(b_daa, axis=0)
    b_bg = b_b[:, None] * b_g
    tl.debug_barrier()
    for i_k in tl.range(0, NK, disable_licm=True):
        b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_dk = load_token_tile(dk, t0, seq_len, H * K, i_k * BK, K, BT, BK)
        b_dk += dot32(b_bg, b_k, DOT_PRECISION) + dot32(tl.trans(b_bg), b_k, DOT_PRECISION)
        store_token_tile(dk, b_dk, t0, seq_len, H * K, i_k * BK, K, BT, BK)
    # c = b e^{Lr}
    b_db += b_dc * tl.exp(b_Lr)
    b_dLr += b_dc * b_c
    store_gate(deta, load_gate(deta, t0, seq_len, H, BT) + b_db, t0, seq_len, H, BT)
    if HAS_ALPHA:
        # L = cumsum(log a); Lr = L (retained) or L - log a (previous)
        b_dla = chunk_rev_cumsum(b_dL + b_dLr, BT)
        if not RETAINED:
            b_dla -= b_dLr
        store_gate(dla, b_dla, t0, seq_len, H, BT)
