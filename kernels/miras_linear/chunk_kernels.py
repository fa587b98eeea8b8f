"""Fused chunk-parallel Triton kernels for the linear-memory Miras rule (none/decay retention,
gd/momentum learner, dot/l2/lp/huber bias). Chunk semantics: ../../shared notes, section 3.

One program owns one (sequence, head, value-block) and walks the chunks of its sequence in
order (forward) or in reverse (backward), keeping the ``[BV, BK]`` state tile(s) in registers.
Inside a chunk of ``BT`` tokens every product is a small matmul:

    E = K W0^T - V,  U = f(E)                                   ([BT, BV])
    Y = exp(L) * (Q W0^T) [+ c * (Q S0^T)] - ((Q K^T) * G * eta) U
    W_end = exp(L_last) W0 [+ c_last S0] - (U * eta * G[last])^T K
    S_end = exp(M_last) S0 - (U * eta * exp(M_last - M))^T K       (momentum)

with ``L``/``M`` the chunk-local cumulative log(alpha)/log(mu), ``G = D_L`` (gd) or
``D_L @ D_M`` (momentum: the coefficient of g_i in X_t is sum_{s=i..t} exp(L_t-L_s+M_s-M_i)) and
``c_t = sum_s D_L[t, s] exp(M_s)``. Value rows of the state are independent except through the
huber norm, so value blocks run in parallel (huber launches one block covering dv).

The forward optionally saves the state at every chunk start (``[NT_total, H, dv, dk]`` fp32, and
the same for S): the backward reloads it instead of re-running the chunk recurrence, and
recomputes every intra-chunk quantity (E, U, decay matrices) from the inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common.tiles import (
    bias_map,
    bias_map_grad,
    chunk_cumsum,
    chunk_rev_cumsum,
    decay_matrix,
    dot32,
    pick,
    pick_row,
)


@triton.jit
def _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token row, length, first per-chunk-state index) of sequence ``i_n``."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
        seq_len = (eos - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, seq_len, boh


@triton.jit
def miras_linear_chunk_fwd_kernel(
    q, k, v, la, lmu, eta, delta,  # inputs (la/lmu = log alpha / log mu, fp32 [B*T, H])
    h0, s0,  # initial states [N, H, V, K] fp32
    y, ht, st,  # outputs: y [B*T, H, V]; final states [N, H, V, K] fp32
    hs, ss,  # per-chunk-start states [NT_total, H, V, K] fp32 (saved for the backward)
    cu_seqlens, chunk_offsets,
    T, H, p,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, SAVE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, boh = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_st = m_v[:, None] & m_k[None, :]
    off_st = o_v[:, None] * K + o_k[None, :]
    base_st = i_nh.to(tl.int64) * V * K

    b_w = tl.zeros([BV, BK], dtype=tl.float32)
    b_s = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_H0:
        b_w = tl.load(h0 + base_st + off_st, mask=m_st, other=0.0)
        if MOMENTUM:
            b_s = tl.load(s0 + base_st + off_st, mask=m_st, other=0.0)

    for i_t in range(0, n_chunks):
        if SAVE_STATES:
            base_hs = ((boh + i_t) * H + i_h) * V * K
            tl.store(hs + base_hs + off_st, b_w, mask=m_st)
            if MOMENTUM:
                tl.store(ss + base_hs + off_st, b_s, mask=m_st)
        t0 = i_t * BT
        m_t = (t0 + o_t) < seq_len
        last = tl.minimum(seq_len - t0, BT) - 1
        rows = bos + t0 + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_vv = tl.load(v + rows[:, None] * H * V + i_h * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.0)
        if BIAS == 3:
            b_delta = tl.load(delta + rows * H + i_h, mask=m_t, other=0.0)
        else:
            b_delta = b_eta
        if HAS_ALPHA:
            b_L = chunk_cumsum(tl.load(la + rows * H + i_h, mask=m_t, other=0.0), BT)
        else:
            b_L = tl.zeros([BT], dtype=tl.float32)

        # gradients of every token at the chunk-start state
        if BIAS == 0:
            b_u = -b_vv
        else:
            b_e = dot32(b_k, tl.trans(b_w)) - b_vv
            b_u = bias_map(b_e, b_vv, b_delta, p, BIAS, EPS)
        b_dl = decay_matrix(b_L, BT)
        if MOMENTUM:
            b_M = chunk_cumsum(tl.load(lmu + rows * H + i_h, mask=m_t, other=0.0), BT)
            b_g = dot32(b_dl, decay_matrix(b_M, BT))
            b_c = tl.sum(b_dl * tl.exp(b_M)[None, :], axis=1)
        else:
            b_g = b_dl
        b_a = dot32(b_q, tl.trans(b_k)) * b_g * b_eta[None, :]
        b_y = tl.exp(b_L)[:, None] * dot32(b_q, tl.trans(b_w)) - dot32(b_a, b_u)
        if MOMENTUM:
            b_y += b_c[:, None] * dot32(b_q, tl.trans(b_s))
        tl.store(y + rows[:, None] * H * V + i_h * V + o_v[None, :], b_y.to(y.dtype.element_ty), mask=m_tv)

        # chunk-end state
        b_gam = pick_row(b_g, last, BT)
        w_new = tl.exp(pick(b_L, last, BT)) * b_w - dot32(tl.trans(b_u * (b_eta * b_gam)[:, None]), b_k)
        if MOMENTUM:
            M_last = pick(b_M, last, BT)
            w_new += pick(b_c, last, BT) * b_s
            b_s = tl.exp(M_last) * b_s - dot32(tl.trans(b_u * (b_eta * tl.exp(M_last - b_M))[:, None]), b_k)
        b_w = w_new

    if STORE_FINAL:
        tl.store(ht + base_st + off_st, b_w, mask=m_st)
        if MOMENTUM:
            tl.store(st + base_st + off_st, b_s, mask=m_st)


@triton.jit
def miras_linear_chunk_bwd_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ss,  # per-chunk-start states saved by the forward
    dy, dht, dst,  # upstream gradients: y [B*T, H, V]; final states [N, H, V, K] fp32
    dq, dk, dv, dla, dlmu, deta, ddelta,  # dq/dk [NV, B*T, H, K]; dv [B*T, H, V]; gates [NV, B*T, H]
    dh0, ds0,  # [N, H, V, K] fp32
    cu_seqlens, chunk_offsets,
    T, H, p,
    K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    USE_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, boh = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(seq_len, BT)
    # partial (per value block) gradients of q, k and the gates; the host sums over blocks
    NTOK = tl.num_programs(1) // H * T
    if IS_VARLEN:
        NTOK = T
    part_tok = i_v.to(tl.int64) * NTOK

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_st = m_v[:, None] & m_k[None, :]
    off_st = o_v[:, None] * K + o_k[None, :]
    base_st = i_nh.to(tl.int64) * V * K

    # adjoints of the state (and momentum) at the end of the current chunk
    b_dw = tl.zeros([BV, BK], dtype=tl.float32)
    b_ds = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_DHT:
        b_dw = tl.load(dht + base_st + off_st, mask=m_st, other=0.0)
        if MOMENTUM:
            b_ds = tl.load(dst + base_st + off_st, mask=m_st, other=0.0)

    for i_r in range(0, n_chunks):
        i_t = n_chunks - 1 - i_r
        base_hs = ((boh + i_t) * H + i_h) * V * K
        b_w = tl.load(hs + base_hs + off_st, mask=m_st, other=0.0)
        t0 = i_t * BT
        m_t = (t0 + o_t) < seq_len
        last = tl.minimum(seq_len - t0, BT) - 1
        is_last = o_t == last
        rows = bos + t0 + o_t
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + rows[:, None] * H * K + i_h * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_vv = tl.load(v + rows[:, None] * H * V + i_h * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + rows[:, None] * H * V + i_h * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_eta = tl.load(eta + rows * H + i_h, mask=m_t, other=0.0)
        if BIAS == 3:
            b_delta = tl.load(delta + rows * H + i_h, mask=m_t, other=0.0)
        else:
            b_delta = b_eta
        if HAS_ALPHA:
            b_L = chunk_cumsum(tl.load(la + rows * H + i_h, mask=m_t, other=0.0), BT)
        else:
            b_L = tl.zeros([BT], dtype=tl.float32)

        # ---- recompute the forward's intra-chunk quantities
        if BIAS == 0:
            b_e = b_vv  # unused
            b_u = -b_vv
        else:
            b_e = dot32(b_k, tl.trans(b_w)) - b_vv
            b_u = bias_map(b_e, b_vv, b_delta, p, BIAS, EPS)
        b_dl = decay_matrix(b_L, BT)
        if MOMENTUM:
            b_s = tl.load(ss + base_hs + off_st, mask=m_st, other=0.0)
            b_M = chunk_cumsum(tl.load(lmu + rows * H + i_h, mask=m_t, other=0.0), BT)
            b_dm = decay_matrix(b_M, BT)
            b_g = dot32(b_dl, b_dm)
            b_eM = tl.exp(b_M)
            b_c = tl.sum(b_dl * b_eM[None, :], axis=1)
            M_last = pick(b_M, last, BT)
            b_mm = tl.exp(M_last - b_M)
        else:
            b_g = b_dl
        b_qk = dot32(b_q, tl.trans(b_k))
        b_a = b_qk * b_g * b_eta[None, :]
        b_eL = tl.exp(b_L)
        eL_last = tl.exp(pick(b_L, last, BT))
        b_gam = pick_row(b_g, last, BT)
        b_b = b_eta * b_gam

        # ---- adjoints through the chunk-end state(s)
        b_kdw = dot32(b_k, tl.trans(b_dw))  # [BT, BV]
        b_du = -dot32(tl.trans(b_a), b_dy) - b_b[:, None] * b_kdw
        b_db = -tl.sum(b_u * b_kdw, axis=1)
        b_dk = -b_b[:, None] * dot32(b_u, b_dw)
        # ---- adjoints through y
        b_da = -dot32(b_dy, tl.trans(b_u))  # [BT, BT]
        b_deL = tl.sum(b_dy * dot32(b_q, tl.trans(b_w)), axis=1)
        b_dp = b_eL[:, None] * b_dy
        deL_last = tl.sum(tl.sum(b_dw * b_w, axis=1), axis=0)
        b_dw_prev = eL_last * b_dw + dot32(tl.trans(b_dp), b_q)
        b_dq = dot32(b_dp, b_w)
        b_dsqk = b_da * b_g * b_eta[None, :]
        b_dq += dot32(b_dsqk, b_k)
        b_dk += dot32(tl.trans(b_dsqk), b_q)
        b_dg = b_da * b_qk * b_eta[None, :]
        b_deta = tl.sum(b_da * b_qk * b_g, axis=0) + b_db * b_gam
        b_dg += tl.where(is_last[:, None], (b_db * b_eta)[None, :], 0.0)
        if MOMENTUM:
            b_kds = dot32(b_k, tl.trans(b_ds))
            b_bm = b_eta * b_mm
            b_du -= b_bm[:, None] * b_kds
            b_dbm = -tl.sum(b_u * b_kds, axis=1)
            b_dk -= b_bm[:, None] * dot32(b_u, b_ds)
            b_deta += b_dbm * b_mm
            b_dmm = b_dbm * b_eta
            b_dc = tl.sum(b_dy * dot32(b_q, tl.trans(b_s)), axis=1)
            b_dr = b_c[:, None] * b_dy
            c_last = pick(b_c, last, BT)
            b_dc += tl.where(is_last, tl.sum(tl.sum(b_dw * b_s, axis=1), axis=0), 0.0)
            deM_last = tl.sum(tl.sum(b_ds * b_s, axis=1), axis=0)
            b_ds_prev = c_last * b_dw + tl.exp(M_last) * b_ds + dot32(tl.trans(b_dr), b_q)
            b_dq += dot32(b_dr, b_s)

        # ---- through u = f(e), e = K W0^T - V
        if BIAS == 0:
            b_dvv = -b_du  # u = -v
        else:
            b_de, b_dd = bias_map_grad(b_e, b_du, b_delta, p, BIAS, EPS)
            b_dk += dot32(b_de, b_w)
            b_dw_prev += dot32(tl.trans(b_de), b_k)
            b_dvv = -b_de
            if BIAS == 3:
                tl.store(ddelta + part_tok * H + rows * H + i_h, b_dd, mask=m_t)

        # ---- through the decay matrices to the cumulative log gates
        if MOMENTUM:
            b_ddl = dot32(b_dg, tl.trans(b_dm)) + b_dc[:, None] * b_eM[None, :]
            b_ddm = dot32(tl.trans(b_dl), b_dg)
            b_hm = b_ddm * b_dm
            b_dM = tl.sum(b_hm, axis=1) - tl.sum(b_hm, axis=0)
            b_dM += b_eM * tl.sum(b_dc[:, None] * b_dl, axis=0)
            b_dM -= b_dmm * b_mm
            b_dM += tl.where(is_last, tl.sum(b_dmm * b_mm, axis=0) + deM_last * tl.exp(M_last), 0.0)
            tl.store(dlmu + part_tok * H + rows * H + i_h, chunk_rev_cumsum(b_dM, BT), mask=m_t)
        else:
            b_ddl = b_dg
        if HAS_ALPHA:
            b_hl = b_ddl * b_dl
            b_dL = tl.sum(b_hl, axis=1) - tl.sum(b_hl, axis=0) + b_deL * b_eL
            b_dL += tl.where(is_last, deL_last * eL_last, 0.0)
            tl.store(dla + part_tok * H + rows * H + i_h, chunk_rev_cumsum(b_dL, BT), mask=m_t)

        tl.store(deta + part_tok * H + rows * H + i_h, b_deta, mask=m_t)
        tl.store(dq + (part_tok + rows[:, None]) * H * K + i_h * K + o_k[None, :], b_dq, mask=m_tk)
        tl.store(dk + (part_tok + rows[:, None]) * H * K + i_h * K + o_k[None, :], b_dk, mask=m_tk)
        tl.store(dv + rows[:, None] * H * V + i_h * V + o_v[None, :], b_dvv, mask=m_tv)
        b_dw = b_dw_prev
        if MOMENTUM:
            b_ds = b_ds_prev

    tl.store(dh0 + base_st + off_st, b_dw, mask=m_st)
    if MOMENTUM:
        tl.store(ds0 + base_st + off_st, b_ds, mask=m_st)
