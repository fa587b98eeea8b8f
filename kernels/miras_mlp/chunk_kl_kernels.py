"""Memora's KL retention (``retention="kl"``, gd and momentum learners) for the MLP-memory chunk
kernels.

Semantics (``docs/semantics.md``, the kl retention): the state of each weight matrix is the logit
matrix ``Z`` with the affine decay recurrence ``Z_t = alpha_t Z_{t-1} - eta_t g_t`` (momentum:
``S_t = mu_t S_{t-1} - eta_t g_t``, ``Z_t = alpha_t Z_{t-1} + S_t``); the weights are
``W_t = c * softmax_rows(Z_t)`` (softmax over the input = last dim of each matrix). Every inner
gradient of a chunk is taken at ``W_0 = c softmax(Z_0)``; the reads use the per-token ``W_t``.
With the chunk coefficients of ``chunk_kernels.py`` (``c_t``, ``b_t``, ``Gam_ti``; ``b = 0`` for gd) and the
factors ``(a, b)`` = ``(dz, k)`` for ``W2``, ``(do, h)`` for ``W1``:

    Z_t = c_t Z_0 [+ b_t S_0] - sum_{i<=t} Gam_ti a_i b_i^T

The reads are no longer affine in the state, so the Gram-matrix read of the other retentions is
replaced by per-token sweeps on the ``[BH, D]`` / ``[D, BH]`` tiles in registers (the token
recurrence of ``chunk_lq_kernels``'s norm scan; momentum carries the ``S_t`` tile next to ``Z_t``, ``_kl_tok``).
Phases (grid ``(N*H,)``), extra arguments ``wst1, wst2``
(the materialised ``W_0`` per chunk boundary, same layout as the state) and ``kc`` (= c):

* ``kl_w0`` (first of every step): ``W_0 = c softmax(Z_0)`` -> ``wst``; ``C_S01 = C_S02 = 1`` so the
  shared phases' ``LQ`` weight scaling is the identity. The shared phases that take inner
  gradients at ``W_0`` (``W0_PHASES``: ``prep``, ``qw``, ``hidden``, ``read``, ``state``,
  ``state_mom``, ``state_do``, ``first``) get ``wst`` as their state pointer; ``fwd_state`` /
  ``state_dk`` get ``Z`` (and ``S``).
* ``kl_z2``: per hidden block, token sweep of ``Z2_t`` (rows lie in the tile): ``z'_t = c P2_t q_t``
  -> ``R_DZ``.
* ``kl_o1``: per hidden block, token sweep of ``Z1_t``; rows span all hidden blocks, so an online
  softmax (flash-attention style) keeps per-token row max ``m``, row sum ``s`` and numerator
  ``o`` in ``[BT, D]`` register tiles across the blocks (a per-token read-modify-write of scratch
  would race between the threads that replicate a row vector) -> ``o'`` (``S_OC``), ``m``
  (``S_OS``), ``s`` (``S_SHH``).
* ``kl_out``: forward ``y = q + LN(o')``; backward ``do' = LN_bwd(dy)`` -> ``S_DOQ``.
* ``kl_adj1`` / ``kl_adj1h`` / ``kl_adj2`` / ``kl_adj2k`` (backward): per token and tile, the softmax Jacobian
  gives the state adjoint ``Lam_t[r, j] = c P_rj g_r (x_j - read_r / c)`` (``g`` = the read's output
  cotangent, ``x`` its input) and the input cotangent ``c P^T g``; ``Lam_t`` is pushed through the
  affine form in the same forward sweep as ``chunk_lq_kernels``'s adjoint: ``d a_i -= Gam_ti Lam_t b_i``,
  ``d b_i -= Gam_ti Lam_t^T a_i``, ``d Gam_ti -= a_i^T Lam_t b_i``, ``d c_t += <Lam_t, Z_0>``,
  ``d Z_0 += c_t Lam_t`` (momentum: ``d S_0 += b_t Lam_t``, ``d b_t += <Lam_t, S_0>``), written to
  the scratch the later shared phases consume (``R_GDZ``, ``R_GH``, ``S_GDR``, ``S_LQDK``,
  ``S_DGAM``, ``V_DC``, ``V_DB``, ``dst``, ``dss``). Layer 1 is swept twice: ``kl_adj1`` (``dh'``,
  ``d(do_i)`` from ``Lam_t H^T``, ``d c``, ``d Z1_0``, momentum ``d S1_0`` / ``d b``) and
  ``kl_adj1h`` (``d(h_i)`` and ``d Gam`` from the ``[C, BH]`` product ``Q = do Lam_t``): in one
  kernel they spilled 128 bytes on sm_80 at d = 128, C = 64 with momentum. Layer 2 is swept three
  times: ``kl_adj2q``
  (``dq``), ``kl_adj2`` (everything but ``dk``, with ``d(dz_i)`` and ``d Gam`` from ``Lam_t K^T``, no
  ``[C, D]`` tile in the token loop) and ``kl_adj2k`` (``dk``): in one kernel they spilled (280
  bytes on sm_80 with ``dq``; 592-720 bytes at d = 128 with ``dk``).
* ``kl_dkm``: ``S_DKM = S_DK`` (the affine read's ``dq``/``dkm`` phases do not run).
* ``kl_dw0`` (after ``first``): ``d Z_0 += c P0 * (dW_0 - <P0, dW_0>_row)`` for the inner gradients'
  weight cotangent ``dW_0`` (``dw1``/``dw2``, kept apart by ``state_dk``/``first`` under ``LQ``).

Momentum adds nothing kl-specific beyond the ``S`` tiles: the shared phases run with
``MOMENTUM=True`` (``fwd_state`` carries ``S``; the backward's ``state_mom`` -- which takes its
inner forward at ``W_0``, so it gets ``wst`` -- and ``gates_m`` run as for the other retentions).
Launches per chunk step: 10 forward, 21 backward (gd) / 23 (momentum) (``kl_phases``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.mlp_scratch import (C_S01, C_S02, NSLOT, R_A, R_B, R_C, R_DZ, R_GDZ, R_GH, S_DGAM,
    S_DGR, S_DK, S_DKM, S_DO, S_DOQ, S_GAMM, S_GDR, S_KT, S_LQDK, S_OC, S_OS, S_QT, S_SHH, V_B, V_C, V_DB,
    V_DC, V_LQDB, V_LQDC, chunk_origin, chunk_prologue, load_tokens, region_ptrs, scalar_ptr, slot_ptrs,
    slot_ptrs_t, token_gate, token_offsets, vector_entry_ptr, vector_ptrs)
from miras_kernels.common.mlp_tiles import (gelu, gelu_d, ln_bwd, ln_rows, row_stats, softmax_read_step)
from miras_kernels.miras_mlp.chunk_kernels import (BWD_KERNELS, FWD_KERNELS, insert_phases)


@triton.jit(do_not_specialize=["step"])
def mlp_kl_w0_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl, first phase of a step: W_0 = c softmax_rows(Z_0) of both matrices -> wst (W2 rows lie in
    one [BH, D] tile; W1 rows span the hidden blocks: online max/sum, then a second pass)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        m1 = tl.full([D], -1e30, dtype=tl.float32)
        s1 = tl.zeros([D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            Z2 = tl.load(st2 + b_in + o2)                                              # [BH, D]
            P2 = tl.exp(Z2 - tl.max(Z2, axis=1)[:, None])
            tl.store(wst2 + b_in + o2, kc * P2 / tl.sum(P2, axis=1)[:, None])
            Z1 = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])                   # [D, BH]
            m1, s1 = row_stats(m1, s1, Z1)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            tl.store(wst1 + b_in + o1, kc * tl.exp(tl.load(st1 + b_in + o1) - m1[:, None]) / s1[:, None])
        one = kc * 0.0 + 1.0
        tl.store(scalar_ptr(scr_p, C_S01, BT, SW, E), one)
        tl.store(scalar_ptr(scr_p, C_S02, BT, SW, E), one)


@triton.jit
def _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H: tl.constexpr, MOMENTUM: tl.constexpr):
    """One token of the in-chunk recurrence on a logit tile (gd: Z_t = alpha_t Z - eta_t a b^T;
    momentum: S_t = mu_t S - eta_t a b^T, Z_t = alpha_t Z + S_t; ``S`` is passed through unread for
    gd). Gates are scalar loads (no [BT] vector stays live in the token loops)."""
    if MOMENTUM:
        S = tl.exp(token_gate(lmu, g0, nv, t, H, 0.0)) * S - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
        X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X + S
    else:
        X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
    return X, S


@triton.jit
def _kl_lam2(X, scr_p, reg, t, hh, od, kc, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """State adjoint of token t's layer-2 read ``z'_t = c softmax_rows(Z2_t) q_t`` on a [BH, D]
    tile: Lam = P (dz'_r (c q_j - z'_r)), dz'_t = dh'_t gelu'(z'_t) (dh'_t from kl_adj1 in R_A)."""
    Pn = tl.exp(X - tl.max(X, axis=1)[:, None])
    Pm = Pn / tl.sum(Pn, axis=1)[:, None]                                                # [BH, D]
    qt = tl.load(scr_p + S_QT * BT * SW + od * BT + t)                                   # q_t [D]
    zq = tl.load(reg + R_DZ * BT * E + t * E + hh)                                       # z'_t [BH]
    gz = tl.load(reg + R_A * BT * E + t * E + hh) * gelu_d(zq)                          # dz'_t [BH]
    return Pm * gz[:, None] * (kc * qt[None, :] - zq[:, None])


@triton.jit(do_not_specialize=["step"])
def mlp_kl_z2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl, the read's layer 2, per hidden block: Z2_t = alpha_t Z2_{t-1} - eta_t dz_t k_t^T on the
    [BH, D] tile (momentum: with the S2_t tile), z'_t = c softmax_rows(Z2_t) q_t -> R_DZ (factors
    dz_i from R_C, k_i, q_t from S_KT, S_QT)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            X = tl.load(st2 + b_in + o2)                                                  # [BH, D]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
            for t in tl.range(0, BT, disable_licm=True):
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                qt = tl.load(scr_p + S_QT * BT * SW + od * BT + t)                       # q_t [D]
                P = tl.exp(X - tl.max(X, axis=1)[:, None])
                tl.store(reg + R_DZ * BT * E + t * E + hh, kc * tl.sum(P * qt[None, :], axis=1) / tl.sum(P, axis=1))


@triton.jit(do_not_specialize=["step"])
def mlp_kl_o1_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl, the read's layer 1, per hidden block: Z1_t = alpha_t Z1_{t-1} - eta_t do_t h_t^T on the
    [D, BH] tile (momentum: with the S1_t tile); online softmax over the blocks: per token row max
    m, row sum s, numerator o -> o'_t = c o / s (S_OC), m (S_OS), s (S_SHH). h_i: R_B (forward,
    from ``hidden``) / R_GH (backward, from ``read``); h'_t = gelu(z'_t) from R_DZ."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        if REV:
            hbase = reg + R_GH * BT * E
        else:
            hbase = reg + R_B * BT * E
        Mx = tl.full([BT, D], -1e30, dtype=tl.float32)
        Sm = tl.zeros([BT, D], dtype=tl.float32)
        On = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            X = tl.load(st1 + b_in + o1)                                                  # [D, BH]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss1 + b_in + o1)
            for t in tl.range(0, BT, disable_licm=True):
                sel = (rows == t)[:, None]
                a = tl.load(scr_p + S_DO * BT * SW + t * SW + od)                        # do_t [D]
                b = tl.load(hbase + t * E + hh)                                          # h_t [BH]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                hq = gelu(tl.load(reg + R_DZ * BT * E + t * E + hh))                    # h'_t [BH]
                mn, s_new, o_new = softmax_read_step(tl.sum(tl.where(sel, Mx, 0.0), axis=0),   # token t's [D] rows
                                                      tl.sum(tl.where(sel, Sm, 0.0), axis=0),
                                                      tl.sum(tl.where(sel, On, 0.0), axis=0), X, hq)
                Mx = tl.where(sel, mn[None, :], Mx)
                Sm = tl.where(sel, s_new[None, :], Sm)
                On = tl.where(sel, o_new[None, :], On)
        tl.store(slot_ptrs(scr_p, S_OC, BT, D, SW, BT), kc * On / Sm)
        tl.store(slot_ptrs(scr_p, S_OS, BT, D, SW, BT), Mx)
        tl.store(slot_ptrs(scr_p, S_SHH, BT, D, SW, BT), Sm)


@triton.jit(do_not_specialize=["step"])
def mlp_kl_out_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl, the read's output LN: forward y = q + LN(o'); backward do' = LN_bwd(dy) -> S_DOQ
    (``y`` is dy in the backward's argument list)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        xq, rq = ln_rows(tl.load(slot_ptrs(scr_p, S_OC, BT, D, SW, BT)), D)
        if REV:
            tl.store(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT), ln_bwd(xq, rq, load_tokens(y + tb, tm, H, D, BT), D))
        else:
            tl.store(y + tb + token_offsets(H, D, BT), (load_tokens(q + tb, tm, H, D, BT) + xq).to(y.dtype.element_ty),
                     mask=tm[:, None])


@triton.jit
def _kl_lam1(X, scr_p, reg, t, hh, od, kc, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr):
    """State adjoint of token t's layer-1 read ``o'_t = c softmax_rows(Z1_t) h'_t`` on a [D, BH]
    tile, from the row stats kl_o1 saved (max S_OS, sum S_SHH): returns (Lam, Pg) with
    Pg = P1_t * do'_t (rows; the input cotangent is dh'_t = c sum_r Pg[r, :]) and
    Lam = Pg (c h'_j - o'_r) (do'_t: S_DOQ, o'_t: S_OC, h'_t = gelu(z'_t) from R_DZ)."""
    mt = tl.load(scr_p + S_OS * BT * SW + t * SW + od)
    Pm = tl.exp(X - mt[:, None]) / tl.load(scr_p + S_SHH * BT * SW + t * SW + od)[:, None]
    gt = tl.load(scr_p + S_DOQ * BT * SW + t * SW + od)                                  # do'_t [D]
    ot = tl.load(scr_p + S_OC * BT * SW + t * SW + od)                                   # o'_t [D]
    hq = gelu(tl.load(reg + R_DZ * BT * E + t * E + hh))                                # h'_t [BH]
    Pg = Pm * gt[:, None]
    return Pg * (kc * hq[None, :] - ot[:, None]), Pg


@triton.jit(do_not_specialize=["step"])
def mlp_kl_adj1_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, the read's layer 1 (factors a = do, b = h), per hidden block, one forward token
    sweep: Lam_t (``_kl_lam1``), dh'_t = c P^T do'_t (R_A); the adjoint through the affine Z1_t:
    d(do_i) (S_GDR, from P = Lam_t H^T), d c (V_LQDC), d Z1_0 = sum_t c_t Lam_t (dst1, written);
    momentum: d S1_0 = sum_t b_t Lam_t (dss1, written), d b (V_LQDB). (d(h_i) and d Gam:
    kl_adj1h; in one kernel they spilled 128 bytes on sm_80 at d = 128, C = 64 with momentum.)"""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dDo = tl.zeros([D, BT], dtype=tl.float32)                                         # d(do_i)^T
        dcv = tl.zeros([BT], dtype=tl.float32)
        dbv = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            X0 = tl.load(st1 + b_in + o1)                                                 # [D, BH]
            X = X0
            S = X0  # never read without momentum
            dX0 = tl.zeros([D, BH], dtype=tl.float32)
            if MOMENTUM:
                S = tl.load(ss1 + b_in + o1)
                dS0 = tl.zeros([D, BH], dtype=tl.float32)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(scr_p + S_DO * BT * SW + t * SW + od)                        # do_t [D]
                b = tl.load(reg + R_GH * BT * E + t * E + hh)                            # h_t [BH]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                Lam, Pg = _kl_lam1(X, scr_p, reg, t, hh, od, kc, BT, SW, E)
                tl.store(reg + R_A * BT * E + t * E + hh, kc * tl.sum(Pg, axis=0))       # dh'_t
                if MOMENTUM:   # Z_t = c_t Z_0 + b_t S_0 - ...: S_0 re-read (not kept live)
                    dS0 += tl.load(vector_entry_ptr(scr_p, V_B, t, BT, SW, E)) * Lam
                    dbv += tl.where(sel, tl.sum(tl.sum(Lam * tl.load(ss1 + b_in + o1), axis=1), axis=0), 0.0)
                dX0 += tl.load(vector_entry_ptr(scr_p, V_C, t, BT, SW, E)) * Lam
                dcv += tl.where(sel, tl.sum(tl.sum(Lam * X0, axis=1), axis=0), 0.0)
                P = tl.dot(Lam, tl.load(reg + R_GH * BT * E + rows[None, :] * E + hh[:, None]), input_precision=DOT_PRECISION)  # [D, BT]: Lam h_i
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                dDo -= P * grow[None, :]
            tl.store(dst1 + b_in + o1, dX0)
            if MOMENTUM:
                tl.store(dss1 + b_in + o1, dS0)
        tl.store(scr_p + S_GDR * BT * SW + rows[None, :] * SW + od[:, None], dDo)
        tl.store(vector_ptrs(scr_p, V_LQDC, BT, SW, E), dcv)
        if MOMENTUM:
            tl.store(vector_ptrs(scr_p, V_LQDB, BT, SW, E), dbv)


@triton.jit(do_not_specialize=["step"])
def mlp_kl_adj1h_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, the read's layer 1, d(h_i) and d Gam part (split off kl_adj1: together they
    spilled 128 bytes on sm_80 at d = 128, C = 64 with momentum), the same token sweep: with
    Q = do Lam_t ([BT, BH], one dot), d(h_i) -= Gam_ti Q[i] (R_B, moved to R_GH by kl_adj2q: the
    sweep reads h_i from R_GH) and d Gam[t, i] = -a_i^T Lam_t b_i = -sum_h Q[i, h] h_i[h] (S_DGR,
    written; kl_adj2 adds layer 2's part)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dG = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            X = tl.load(st1 + b_in + o1)                                                  # [D, BH]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss1 + b_in + o1)
            dH = tl.zeros([BT, BH], dtype=tl.float32)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(scr_p + S_DO * BT * SW + t * SW + od)                        # do_t [D]
                b = tl.load(reg + R_GH * BT * E + t * E + hh)                            # h_t [BH]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                Lam, Pg = _kl_lam1(X, scr_p, reg, t, hh, od, kc, BT, SW, E)
                Q = tl.dot(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), Lam, input_precision=DOT_PRECISION)                # [BT, BH]: do_i^T Lam
                Hb = tl.load(region_ptrs(scr_p, R_GH, hh, BT, SW, E))                            # h_i [BT, BH]
                dG += tl.where(sel[:, None], -tl.sum(Q * Hb, axis=1)[None, :], 0.0)
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                dH -= grow[:, None] * Q
            tl.store(region_ptrs(scr_p, R_B, hh, BT, SW, E), dH)
        causal = rows[:, None] >= rows[None, :]
        tl.store(slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT), tl.where(causal, dG, 0.0))


@triton.jit(do_not_specialize=["step"])
def mlp_kl_adj2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, the read's layer 2 (factors a = dz, b = k), per hidden block, one forward token
    sweep: Lam_t (``_kl_lam2``), P = Lam_t K^T ([BH, BT], one dot); the adjoint: d(dz_i) (R_GDZ,
    written), d Gam (S_DGAM = S_DGR + ..), d c (V_DC = V_LQDC + ..), d Z2_0 (dst2, written);
    momentum: d S2_0 (dss2, written), d b (V_DB = V_LQDB + ..). (dq: kl_adj2q; dk: kl_adj2k.)"""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dG = tl.zeros([BT, BT], dtype=tl.float32)
        dcv = tl.zeros([BT], dtype=tl.float32)
        dbv = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            X0 = tl.load(st2 + b_in + o2)                                                 # [BH, D]
            X = X0
            S = X0  # never read without momentum
            dX0 = tl.zeros([BH, D], dtype=tl.float32)
            dA = tl.zeros([BH, BT], dtype=tl.float32)                                     # d(dz_i)^T
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
                dS0 = tl.zeros([BH, D], dtype=tl.float32)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                Lam = _kl_lam2(X, scr_p, reg, t, hh, od, kc, BT, SW, E)
                dX0 += tl.load(vector_entry_ptr(scr_p, V_C, t, BT, SW, E)) * Lam
                dcv += tl.where(sel, tl.sum(tl.sum(Lam * X0, axis=1), axis=0), 0.0)
                if MOMENTUM:   # Z_t = c_t Z_0 + b_t S_0 - ...: S_0 re-read (not kept live)
                    dS0 += tl.load(vector_entry_ptr(scr_p, V_B, t, BT, SW, E)) * Lam
                    dbv += tl.where(sel, tl.sum(tl.sum(Lam * tl.load(ss2 + b_in + o2), axis=1), axis=0), 0.0)
                P = tl.dot(Lam, tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), input_precision=DOT_PRECISION)                   # [BH, BT]: Lam k_i
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                dA -= P * grow[None, :]
                AT = tl.load(reg + R_C * BT * E + rows[None, :] * E + hh[:, None])       # dz^T [BH, BT]
                dG += tl.where(sel[:, None], -tl.sum(AT * P, axis=0)[None, :], 0.0)
            tl.store(reg + R_GDZ * BT * E + rows[None, :] * E + hh[:, None], dA)
            tl.store(dst2 + b_in + o2, dX0)
            if MOMENTUM:
                tl.store(dss2 + b_in + o2, dS0)
        causal = rows[:, None] >= rows[None, :]
        tl.store(slot_ptrs(scr_p, S_DGAM, BT, BT, SW, BT), tl.load(slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT)) + tl.where(causal, dG, 0.0))
        # [BT] vectors are never read-modified-written in one kernel (replicated layouts): chained
        tl.store(vector_ptrs(scr_p, V_DC, BT, SW, E), tl.load(vector_ptrs(scr_p, V_LQDC, BT, SW, E)) + dcv)
        if MOMENTUM:
            tl.store(vector_ptrs(scr_p, V_DB, BT, SW, E), tl.load(vector_ptrs(scr_p, V_LQDB, BT, SW, E)) + dbv)


@triton.jit(do_not_specialize=["step"])
def mlp_kl_adj2k_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, the read's layer 2, dk part (split off kl_adj2: together they spilled 592-720
    bytes at d = 128), the same token sweep: dk_i -= sum_{t>=i} Gam_ti dz_i^T Lam_t -> S_LQDK
    (picked up by state_dk)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dK = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            X = tl.load(st2 + b_in + o2)                                                  # [BH, D]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
            for t in tl.range(0, BT, disable_licm=True):
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                Lam = _kl_lam2(X, scr_p, reg, t, hh, od, kc, BT, SW, E)
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                # the Gam row folded into the operand: no [BT, D] temporary
                dK = tl.dot(tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E)) * (-grow)[:, None], Lam, acc=dK, input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_LQDK, BT, D, SW, BT), dK)


@triton.jit(do_not_specialize=["step"])
def mlp_kl_adj2q_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, the read's layer 2, dq part (split off kl_adj2: together they spilled on
    sm_80), per hidden block, token sweep: dq_t = c P2_t^T dz'_t (+ dy, the residual; written to
    dq); moves kl_adj1's d(h_i) R_B -> R_GH."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dQ = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            X = tl.load(st2 + b_in + o2)                                                  # [BH, D]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                X, S = _kl_tok(X, S, a, b, la, eta, lmu, g0, nv, t, H, MOMENTUM)
                Pn = tl.exp(X - tl.max(X, axis=1)[:, None])
                gz = tl.load(reg + R_A * BT * E + t * E + hh) * gelu_d(tl.load(reg + R_DZ * BT * E + t * E + hh))
                Pg = Pn * (gz / tl.sum(Pn, axis=1))[:, None]
                dQ = tl.where(sel[:, None], dQ + kc * tl.sum(Pg, axis=0)[None, :], dQ)
            tl.store(region_ptrs(scr_p, R_GH, hh, BT, SW, E), tl.load(region_ptrs(scr_p, R_B, hh, BT, SW, E)))
        tl.store(dq + tb + token_offsets(H, D, BT), dQ + load_tokens(y + tb, tm, H, D, BT), mask=tm[:, None])


@triton.jit(do_not_specialize=["step"])
def mlp_kl_dkm_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward: dk so far (S_DK, from state_dk) -> S_DKM, where ``mid`` reads it (the affine
    read's dkm phase, which adds its A2 term there, does not run for kl)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        tl.store(slot_ptrs(scr_p, S_DKM, BT, D, SW, BT), tl.load(slot_ptrs(scr_p, S_DK, BT, D, SW, BT)))


@triton.jit(do_not_specialize=["step"])
def mlp_kl_dw0_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, wst1, wst2, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """kl backward, after ``first``: d Z_0 += W_0 * (dW_0 - <W_0, dW_0>_row / c) (the softmax
    Jacobian of W_0 = c softmax_rows(Z_0); dW_0 in the per-program buffers dw1/dw2)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        w0 = tl.program_id(0).to(tl.int64) * (D * E)
        r1 = tl.zeros([D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            W2 = tl.load(wst2 + b_in + o2)
            g2 = tl.load(dw2 + w0 + o2)
            tl.store(dst2 + b_in + o2, tl.load(dst2 + b_in + o2) + W2 * (g2 - tl.sum(W2 * g2, axis=1)[:, None] / kc))
            r1 += tl.sum(tl.load(wst1 + b_in + o1) * tl.load(dw1 + w0 + o1), axis=1)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            W1 = tl.load(wst1 + b_in + o1)
            tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + W1 * (tl.load(dw1 + w0 + o1) - r1[:, None] / kc))


KL_KERNELS = {"mlp_kl_w0": mlp_kl_w0_kernel, "mlp_kl_z2": mlp_kl_z2_kernel, "mlp_kl_o1": mlp_kl_o1_kernel,
              "mlp_kl_out": mlp_kl_out_kernel, "mlp_kl_adj1": mlp_kl_adj1_kernel,
              "mlp_kl_adj1h": mlp_kl_adj1h_kernel, "mlp_kl_adj2": mlp_kl_adj2_kernel,
              "mlp_kl_adj2k": mlp_kl_adj2k_kernel, "mlp_kl_adj2q": mlp_kl_adj2q_kernel,
              "mlp_kl_dkm": mlp_kl_dkm_kernel, "mlp_kl_dw0": mlp_kl_dw0_kernel}
_F = dict(FWD_KERNELS)
_B = dict(BWD_KERNELS)
# phases of the kl path in launch order (gd learner). The shared phases run with LQ = REV
# (backward: d(W_0) kept apart in dw1/dw2; C_S01 = C_S02 = 1 from kl_w0 make the LQ weight scaling
# exact). The forward list is the same for momentum (the phases take MOMENTUM).
FWD_KL_KERNELS = (
    ("mlp_fwd_kl_w0", mlp_kl_w0_kernel), ("mlp_fwd_prep", _F["mlp_fwd_prep"]), ("mlp_fwd_prep2", _F["mlp_fwd_prep2"]),
    ("mlp_fwd_coef", _F["mlp_fwd_coef"]), ("mlp_fwd_qw", _F["mlp_fwd_qw"]), ("mlp_fwd_hidden", _F["mlp_fwd_hidden"]),
    ("mlp_fwd_state", _F["mlp_fwd_state"]), ("mlp_fwd_kl_z2", mlp_kl_z2_kernel), ("mlp_fwd_kl_o1", mlp_kl_o1_kernel),
    ("mlp_fwd_kl_out", mlp_kl_out_kernel),
)
BWD_KL_KERNELS = (
    ("mlp_bwd_kl_w0", mlp_kl_w0_kernel), ("mlp_bwd_prep", _B["mlp_bwd_prep"]), ("mlp_bwd_prep2", _B["mlp_bwd_prep2"]),
    ("mlp_bwd_coef", _B["mlp_bwd_coef"]), ("mlp_bwd_read", _B["mlp_bwd_read"]), ("mlp_bwd_kl_z2", mlp_kl_z2_kernel),
    ("mlp_bwd_kl_o1", mlp_kl_o1_kernel), ("mlp_bwd_kl_out", mlp_kl_out_kernel), ("mlp_bwd_kl_adj1", mlp_kl_adj1_kernel),
    ("mlp_bwd_kl_adj1h", mlp_kl_adj1h_kernel), ("mlp_bwd_kl_adj2q", mlp_kl_adj2q_kernel),
    ("mlp_bwd_kl_adj2", mlp_kl_adj2_kernel), ("mlp_bwd_kl_adj2k", mlp_kl_adj2k_kernel), ("mlp_bwd_state", _B["mlp_bwd_state"]),
    ("mlp_bwd_state_do", _B["mlp_bwd_state_do"]), ("mlp_bwd_state_dk", _B["mlp_bwd_state_dk"]),
    ("mlp_bwd_kl_dkm", mlp_kl_dkm_kernel), ("mlp_bwd_mid", _B["mlp_bwd_mid"]), ("mlp_bwd_first", _B["mlp_bwd_first"]),
    ("mlp_bwd_kl_dw0", mlp_kl_dw0_kernel), ("mlp_bwd_gates", _B["mlp_bwd_gates"]),
)


# momentum learner (backward): the momentum-only shared phases (chunk.MOMENTUM_ONLY) where the
# affine path runs them: state_mom (through the chunk-end S' into d(dz_i), d(h_i), d pi; after the
# kl adjoint wrote R_GDZ / R_GH) before state, gates_m (d eta, d log alpha, d log mu through
# E = Dm Bm and b) before gates
BWD_KL_MOM_KERNELS = insert_phases(BWD_KL_KERNELS, [
    ("mlp_bwd_kl_adj2k", ("mlp_bwd_state_mom", _B["mlp_bwd_state_mom"])),   # right before state
    ("mlp_bwd_kl_dw0", ("mlp_bwd_gates_m", _B["mlp_bwd_gates_m"])),         # right before gates
])


def kl_phases(rev: bool, momentum: bool):
    """The kl phase list the host launches (forward or backward, gd or momentum)."""
    if not rev:
        return FWD_KL_KERNELS
    return BWD_KL_MOM_KERNELS if momentum else BWD_KL_KERNELS


# shared phases that take their inner gradients at W_0: they get the materialised wst as state
# (state_mom: its h_i = gelu(W2_0 k_i))
W0_PHASES = frozenset({"mlp_fwd_prep", "mlp_fwd_hidden", "mlp_fwd_qw", "mlp_bwd_prep", "mlp_bwd_read",
                       "mlp_bwd_state", "mlp_bwd_state_mom", "mlp_bwd_state_do", "mlp_bwd_first"})
# phases that take the extra kl arguments (wst1, wst2, c)
KL_ARG_KERNELS = frozenset(KL_KERNELS.values())
