"""Moneta's l_q retention (``retention="lq"``) for the MLP-memory chunk kernels: the extra phases.

Semantics (``docs/semantics.md``, the lq retention): the state of each weight matrix is the
accumulator ``X`` (``A`` in ``docs/semantics.md``) with the affine decay recurrence; the weights are
``W_t = s_t X_t`` with ONE scalar per token and matrix, ``s_t = (||X_t||_q + eps)^(2-q)`` (q-norm over
all entries of the head's matrix). Inside a chunk every inner gradient is taken at the chunk-start
weights ``W_0 = s_0 X_0``; reads use the per-token ``W_t``. With the chunk kernels' coefficients
(``c_t``, ``Gam_ti``, see ``chunk_kernels.py``) and the inner-gradient factors ``(a_i, b_i)`` = ``(dz_i, k_i)``
for ``W2``, ``(do_i, h_i)`` for ``W1``:

    X_t = c_t X_0 - sum_{i<=t} Gam_ti a_i b_i^T,     read_t = s_t * (affine read of X_t)

so the existing phases compute everything once they (1) scale their ``W_0`` loads by ``s_0``
(``LQ`` constexpr in ``chunk_kernels.py``) and (2) scale the two reads by ``s1_t``, ``s2_t``. Only the
norms need ``X_t`` itself. The phases here, per chunk and program (sequence, head), grid ``(N*H,)``:

* ``lq_s0`` (first of every step, forward and backward): ``||X_0||_q`` and ``s_0`` of both matrices.
* forward ``lq_norm2`` / ``lq_norm1`` (after the backward's ``read`` phase parked the factors): per
  hidden block, the in-chunk token recurrence ``X_t = alpha_t X_{t-1} - eta_t a_t b_t^T`` (momentum:
  with the ``S_t`` tile) on the ``[BH, D]`` / ``[D, BH]`` tile in registers, accumulating
  ``sum |X_t|^q`` per token -> ``n_t``, ``s_t``; ``lq_nsave`` saves ``n_t`` ([T, H, 2]) and the
  backward's ``lq_nload`` reads it back (no second scan).
* backward ``lq_adj2`` / ``lq_adj2k`` / ``lq_adj1`` (after the read's backward gave ``d s_t``): the
  state adjoint of the norm, ``Lam_t = d s_t * s'(X_t) = kappa_t X_t |X_t|^(q-2)``, pushed through
  the affine form in ONE forward token sweep per hidden block (no reverse scan, no division by
  decay products): ``d a_i -= sum_{t>=i} Gam_ti Lam_t b_i``, ``d b_i -= sum_{t>=i} Gam_ti Lam_t^T a_i``,
  ``d X_0 += sum_t c_t Lam_t`` (momentum: ``d S_0 += sum_t b_t Lam_t``, ``d b_t += <Lam_t, S_0>``),
  ``d Gam_ti -= a_i^T Lam_t b_i``, ``d c_t += <Lam_t, X_0>``, added to the scratch the later phases
  (``state``, ``state_do``, ``state_dk``, ``dgam``, ``gates``) consume.
* backward ``lq_dw0`` (after ``first``): the inner gradients' weight cotangent ``d W_0`` (kept apart
  in ``dw1``/``dw2`` by ``state_dk``/``first`` when ``LQ``) mapped through ``W_0 = s(X_0) X_0``:
  ``d X_0 += s_0 dW_0 + <dW_0, X_0> s'(X_0)``.

Scratch: vectors ``V_N1/V_N2`` (norms), ``V_S1/V_S2`` (scales), ``V_DS1/V_DS2``, ``V_LQDC``, ``V_LQDB``;
scalars ``C_N01, C_N02, C_S01, C_S02``; slot ``S_LQDK`` (layout in ``chunk_kernels.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.mlp_scratch import (C_N01, C_N02, C_S01, C_S02, NSLOT, R_B, R_C, R_GDZ, R_GH,
    S_DGR, S_DO, S_GAMM, S_GDR, S_KT, S_LQDK, V_B, V_C, V_DB, V_DC, V_DS1, V_DS2, V_LQDB, V_LQDC, V_N1, V_N2,
    V_S1, V_S2, chunk_origin, chunk_prologue, load_tokens, region_ptrs, scalar_ptr, slot_ptrs, slot_ptrs_t,
    token_gate, vector_entry_ptr, vector_ptrs)
from miras_kernels.common.mlp_tiles import (absq2, gelu, lq_scale, qroot)
from miras_kernels.miras_mlp.chunk_kernels import (BWD_KERNELS, FWD_KERNELS, insert_phases,
    mlp_bwd_read_kernel)


@triton.jit
def _lq_kappa(n, ds, lqe, LQQ: tl.constexpr):
    """kappa with d s / d X = kappa X |X|^(q-2) / ds: ds (2-q) (n+eps)^(1-q) / n^(q-1); 0 at n = 0
    (torch's subgradient in ``MirasSpec.lq_scale``)."""
    live = n > 0
    nn = tl.where(live, n, 1.0)
    if LQQ == 4.0:
        npow = nn * nn * nn
    else:
        npow = tl.exp2((LQQ - 1.0) * tl.log2(nn))
    return tl.where(live, ds * (2.0 - LQQ) * tl.exp2((1.0 - LQQ) * tl.log2(n + lqe)) / npow, 0.0)


@triton.jit(do_not_specialize=["step"])
def mlp_lq_s0_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq, first phase of a step: q-norm n_0 and scale s_0 of the chunk-start X1, X2 (the inner
    gradients of the chunk are taken at W_0 = s_0 X_0)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        acc2 = tl.zeros([BH, D], dtype=tl.float32)
        acc1 = tl.zeros([D, BH], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            X2 = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])
            acc2 += X2 * X2 * absq2(X2, LQQ)
            X1 = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])
            acc1 += X1 * X1 * absq2(X1, LQQ)
        n2 = qroot(tl.sum(tl.sum(acc2, axis=1), axis=0), LQQ)
        n1 = qroot(tl.sum(tl.sum(acc1, axis=1), axis=0), LQQ)
        tl.store(scalar_ptr(scr_p, C_N02, BT, SW, E), n2)
        tl.store(scalar_ptr(scr_p, C_N01, BT, SW, E), n1)
        tl.store(scalar_ptr(scr_p, C_S02, BT, SW, E), lq_scale(n2, lqe, LQQ))
        tl.store(scalar_ptr(scr_p, C_S01, BT, SW, E), lq_scale(n1, lqe, LQQ))


@triton.jit
def _lq_norm_step(X, S, a, b, acc, sel, la, eta, lmu, g0, nv, t, H: tl.constexpr, MOMENTUM: tl.constexpr,
                  LQQ: tl.constexpr):
    """One token of the in-chunk recurrence on a weight tile (gd: X_t = alpha_t X - eta_t a b^T;
    momentum: S_t = mu_t S - eta_t a b^T, X_t = alpha_t X + S_t), adding sum |X_t|^q to ``acc[t]``
    (``sel`` = the token's lane). Shared by the W2 and W1 norm scans."""
    if MOMENTUM:
        S = tl.exp(token_gate(lmu, g0, nv, t, H, 0.0)) * S - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
        X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X + S
    else:
        X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
    acc += tl.where(sel, tl.sum(tl.sum(X * X * absq2(X, LQQ), axis=1), axis=0), 0.0)
    return X, S, acc


@triton.jit(do_not_specialize=["step"])
def mlp_lq_norm2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq, W2, per hidden block: the in-chunk recurrence X_t = alpha_t X_{t-1} - eta_t a_t b_t^T
    (momentum: S_t = mu_t S_{t-1} - eta_t a_t b_t^T, X_t = alpha_t X_{t-1} + S_t) on the [BH, D]
    tile in registers, sum |X_t|^q per token -> n_t, s_t ([BT]). Factors from scratch: dz_i (R_C),
    k_i (S_KT). (One kernel per matrix: both scans in one made ptxas spill a few bytes on sm_80.)"""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        acc = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            X = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])                    # [BH, D]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss2 + b_in + hh[:, None] * D + od[None, :])
            for t in tl.range(0, BT, disable_licm=True):
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                X, S, acc = _lq_norm_step(X, S, a, b, acc, rows == t, la, eta, lmu, g0, nv, t, H, MOMENTUM, LQQ)
        n = qroot(acc, LQQ)
        tl.store(vector_ptrs(scr_p, V_N2, BT, SW, E), n)
        tl.store(vector_ptrs(scr_p, V_S2, BT, SW, E), lq_scale(n, lqe, LQQ))


@triton.jit(do_not_specialize=["step"])
def mlp_lq_norm1_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq, W1: as lq_norm2 on the [D, BH] tiles of W1 (factors do_i from S_DO, h_i from R_GH)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        acc = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            X = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])                    # [D, BH]
            S = X  # never read without momentum
            if MOMENTUM:
                S = tl.load(ss1 + b_in + od[:, None] * E + hh[None, :])
            for t in tl.range(0, BT, disable_licm=True):
                a = tl.load(scr_p + S_DO * BT * SW + t * SW + od)                        # do_t [D]
                b = tl.load(reg + R_GH * BT * E + t * E + hh)                            # h_t [BH]
                X, S, acc = _lq_norm_step(X, S, a, b, acc, rows == t, la, eta, lmu, g0, nv, t, H, MOMENTUM, LQQ)
        n = qroot(acc, LQQ)
        tl.store(vector_ptrs(scr_p, V_N1, BT, SW, E), n)
        tl.store(vector_ptrs(scr_p, V_S1, BT, SW, E), lq_scale(n, lqe, LQQ))


@triton.jit(do_not_specialize=["step"])
def mlp_lq_nload_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq, the per-token norms' round trip: the forward (after lq_norm1) saves n_t of both matrices
    to ``nrm`` ([T, H, 2]); the backward loads them -> n_t, s_t in scratch instead of a second
    token scan. (A separate phase: the stores inside the norm scan made ptxas spill a few bytes.)"""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        if REV:
            # past the sequence end: n = 1 keeps s finite (those rows get no cotangent)
            n1 = tl.load(nrm + go * 2, mask=tm, other=1.0)
            n2 = tl.load(nrm + go * 2 + 1, mask=tm, other=1.0)
            tl.store(vector_ptrs(scr_p, V_N2, BT, SW, E), n2)
            tl.store(vector_ptrs(scr_p, V_N1, BT, SW, E), n1)
            tl.store(vector_ptrs(scr_p, V_S2, BT, SW, E), lq_scale(n2, lqe, LQQ))
            tl.store(vector_ptrs(scr_p, V_S1, BT, SW, E), lq_scale(n1, lqe, LQQ))
        else:
            tl.store(nrm + go * 2, tl.load(vector_ptrs(scr_p, V_N1, BT, SW, E)), mask=tm)
            tl.store(nrm + go * 2 + 1, tl.load(vector_ptrs(scr_p, V_N2, BT, SW, E)), mask=tm)


@triton.jit(do_not_specialize=["step"])
def mlp_lq_adj2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq backward, W2 (factors a = dz, b = k), per hidden block: one forward token sweep
    recomputes X2_t, forms Lam_t = kappa_t X_t |X_t|^(q-2) and accumulates d(dz_i) (into R_GDZ),
    d X2_0 (dst2) [, d S2_0], d Gam (S_DGR) and d c (V_LQDC) [, d b (V_LQDB)]; dk_i is lq_adj2k's
    (split off: both in one kernel spilled on sm_80 at d = 64, C = 64). Parks h_i = gelu(W2_0 k_i)
    in R_B for lq_adj1 (R_B is free after readdst)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        s02 = tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
        dG = tl.zeros([BT, BT], dtype=tl.float32)
        dcv = tl.zeros([BT], dtype=tl.float32)
        dbv = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            X0 = tl.load(st2 + b_in + o2)                                                 # [BH, D]
            tl.store(region_ptrs(scr_p, R_B, hh, BT, SW, E), gelu(tl.dot(load_tokens(k + tb, tm, H, D, BT), tl.trans(X0 * s02), input_precision=DOT_PRECISION)))
            X = X0
            dX0 = tl.zeros([BH, D], dtype=tl.float32)
            dA = tl.zeros([BH, BT], dtype=tl.float32)                                     # d(dz_i)^T
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
                dS0 = tl.zeros([BH, D], dtype=tl.float32)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                if MOMENTUM:
                    S = tl.exp(token_gate(lmu, g0, nv, t, H, 0.0)) * S - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X + S
                else:
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                Lam = _lq_kappa(tl.load(vector_entry_ptr(scr_p, V_N2, t, BT, SW, E)), tl.load(vector_entry_ptr(scr_p, V_DS2, t, BT, SW, E)), lqe, LQQ) * X * absq2(X, LQQ)
                dX0 += tl.load(vector_entry_ptr(scr_p, V_C, t, BT, SW, E)) * Lam
                dcv += tl.where(sel, tl.sum(tl.sum(Lam * X0, axis=1), axis=0), 0.0)
                if MOMENTUM:   # X_t = c_t X_0 + b_t S_0 - ...
                    dS0 += tl.load(vector_entry_ptr(scr_p, V_B, t, BT, SW, E)) * Lam
                    dbv += tl.where(sel, tl.sum(tl.sum(Lam * tl.load(ss2 + b_in + o2), axis=1), axis=0), 0.0)
                P = tl.dot(Lam, tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), input_precision=DOT_PRECISION)                   # [BH, BT]: Lam k_i
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                dA -= P * grow[None, :]
                AT = tl.load(reg + R_C * BT * E + rows[None, :] * E + hh[:, None])       # dz^T [BH, BT]
                dG += tl.where(sel[:, None], -tl.sum(AT * P, axis=0)[None, :], 0.0)
            pg = reg + R_GDZ * BT * E + rows[None, :] * E + hh[:, None]
            tl.store(pg, tl.load(pg) + dA)
            tl.store(dst2 + b_in + o2, tl.load(dst2 + b_in + o2) + dX0)
            if MOMENTUM:
                tl.store(dss2 + b_in + o2, tl.load(dss2 + b_in + o2) + dS0)
        causal = rows[:, None] >= rows[None, :]
        pd = slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT)
        tl.store(pd, tl.load(pd) + tl.where(causal, dG, 0.0))
        # [BT] vectors are never read-modified-written in one kernel (replicated layouts): chained
        tl.store(vector_ptrs(scr_p, V_LQDC, BT, SW, E), tl.load(vector_ptrs(scr_p, V_DC, BT, SW, E)) + dcv)
        if MOMENTUM:
            tl.store(vector_ptrs(scr_p, V_LQDB, BT, SW, E), tl.load(vector_ptrs(scr_p, V_DB, BT, SW, E)) + dbv)


@triton.jit(do_not_specialize=["step"])
def mlp_lq_adj2k_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq backward, W2: the same token sweep as lq_adj2 for dk_i -= sum_{t>=i} Gam_ti dz_i^T Lam_t
    (into S_LQDK, picked up by state_dk)."""
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
            if MOMENTUM:
                S = tl.load(ss2 + b_in + o2)
            for t in tl.range(0, BT, disable_licm=True):
                a = tl.load(reg + R_C * BT * E + t * E + hh)                             # dz_t [BH]
                b = tl.load(scr_p + S_KT * BT * SW + od * BT + t)                        # k_t [D]
                if MOMENTUM:
                    S = tl.exp(token_gate(lmu, g0, nv, t, H, 0.0)) * S - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X + S
                else:
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                Lam = _lq_kappa(tl.load(vector_entry_ptr(scr_p, V_N2, t, BT, SW, E)), tl.load(vector_entry_ptr(scr_p, V_DS2, t, BT, SW, E)), lqe, LQQ) * X * absq2(X, LQQ)
                grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                 # Gam[t, :]
                # the Gam row folded into the operand: no [BT, D] temporary
                dK = tl.dot(tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E)) * (-grow)[:, None], Lam, acc=dK, input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_LQDK, BT, D, SW, BT), dK)


@triton.jit
def _w1_adjoint_step(Lam, X0, dX0, dH, dDo, dG, dcv, sel, t, scr_p, reg, hh, rows,
                     R_H: tl.constexpr, BT: tl.constexpr, SW: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """One token of a W1 tile's forward-accumulated adjoint (lq): the state adjoint ``Lam``
    ``[D, BH]`` of token t into d X1_0 (``dX0``), d c (``dcv``), d(do_i) (``dDo^T``), d Gam row t
    (``dG``) and d(h_i) (``dH``; the factors h_i live in register region ``R_H``). d Gam row t is
    taken from the ``[BT, BH]`` product ``Q = do Lam`` that d(h_i) needs anyway
    (``a_i^T Lam_t b_i = sum_h Q[i, h] h_i[h]``), not from a ``[D, BT]`` do^T tile times ``P``: at
    D = 128, C = 64 that tile (32 registers per thread at 8 warps) made lq_adj1 spill 48-152 bytes
    on sm_80."""
    dX0 += tl.load(vector_entry_ptr(scr_p, V_C, t, BT, SW, E)) * Lam
    dcv += tl.where(sel, tl.sum(tl.sum(Lam * X0, axis=1), axis=0), 0.0)
    Hb = tl.load(reg + R_H * BT * E + rows[:, None] * E + hh[None, :])                 # h_i [BT, BH]
    P = tl.dot(Lam, tl.trans(Hb), input_precision=DOT_PRECISION)                                                     # [D, BT]: Lam h_i
    grow = tl.load(scr_p + S_GAMM * BT * SW + t * SW + rows)                          # Gam[t, :]
    dDo -= P * grow[None, :]
    Q = tl.dot(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), Lam, input_precision=DOT_PRECISION)                         # [BT, BH]: do_i^T Lam
    dG += tl.where(sel[:, None], -tl.sum(Q * Hb, axis=1)[None, :], 0.0)
    # dh_i -= Gam_ti do_i^T Lam
    dH -= grow[:, None] * Q
    return dX0, dH, dDo, dG, dcv


@triton.jit(do_not_specialize=["step"])
def mlp_lq_adj1_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq backward, W1 (factors a = do, b = h), per hidden block: as lq_adj2, accumulating
    d(do_i) (into S_GDR), d(h_i) (R_GH), d X1_0 (dst1), d Gam (S_DGR), d c (V_DC = V_LQDC + ..)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        rows = tl.arange(0, BT)
        g0, nv = chunk_origin(go, tm, BT)
        reg = scr_p + NSLOT * BT * SW
        dDo = tl.zeros([D, BT], dtype=tl.float32)                                         # d(do_i)^T
        dG = tl.zeros([BT, BT], dtype=tl.float32)
        dcv = tl.zeros([BT], dtype=tl.float32)
        dbv = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            X0 = tl.load(st1 + b_in + o1)                                                 # [D, BH]
            X = X0
            dX0 = tl.zeros([D, BH], dtype=tl.float32)
            dH = tl.zeros([BT, BH], dtype=tl.float32)
            if MOMENTUM:
                S = tl.load(ss1 + b_in + o1)
                dS0 = tl.zeros([D, BH], dtype=tl.float32)
            for t in tl.range(0, BT, disable_licm=True):
                sel = rows == t
                a = tl.load(scr_p + S_DO * BT * SW + t * SW + od)                        # do_t [D]
                b = tl.load(reg + R_B * BT * E + t * E + hh)                             # h_t [BH]
                if MOMENTUM:
                    S = tl.exp(token_gate(lmu, g0, nv, t, H, 0.0)) * S - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X + S
                else:
                    X = tl.exp(token_gate(la, g0, nv, t, H, 0.0)) * X - (token_gate(eta, g0, nv, t, H, 0.0) * a)[:, None] * b[None, :]
                Lam = _lq_kappa(tl.load(vector_entry_ptr(scr_p, V_N1, t, BT, SW, E)), tl.load(vector_entry_ptr(scr_p, V_DS1, t, BT, SW, E)), lqe, LQQ) * X * absq2(X, LQQ)
                if MOMENTUM:
                    dS0 += tl.load(vector_entry_ptr(scr_p, V_B, t, BT, SW, E)) * Lam
                    dbv += tl.where(sel, tl.sum(tl.sum(Lam * tl.load(ss1 + b_in + o1), axis=1), axis=0), 0.0)
                dX0, dH, dDo, dG, dcv = _w1_adjoint_step(Lam, X0, dX0, dH, dDo, dG, dcv, sel, t, scr_p, reg,
                                                         hh, rows, R_B, BT, SW, E, D, DOT_PRECISION)
            ph = region_ptrs(scr_p, R_GH, hh, BT, SW, E)
            tl.store(ph, tl.load(ph) + dH)
            tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + dX0)
            if MOMENTUM:
                tl.store(dss1 + b_in + o1, tl.load(dss1 + b_in + o1) + dS0)
        pg = scr_p + S_GDR * BT * SW + rows[None, :] * SW + od[:, None]                   # d(do)^T [D, BT]
        tl.store(pg, tl.load(pg) + dDo)
        causal = rows[:, None] >= rows[None, :]
        pd = slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT)
        tl.store(pd, tl.load(pd) + tl.where(causal, dG, 0.0))
        tl.store(vector_ptrs(scr_p, V_DC, BT, SW, E), tl.load(vector_ptrs(scr_p, V_LQDC, BT, SW, E)) + dcv)
        if MOMENTUM:
            tl.store(vector_ptrs(scr_p, V_DB, BT, SW, E), tl.load(vector_ptrs(scr_p, V_LQDB, BT, SW, E)) + dbv)


@triton.jit(do_not_specialize=["step"])
def mlp_lq_dw0_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step, lqe, nrm,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LQQ: tl.constexpr,
):
    """lq backward, after ``first``: d X_0 += s_0 dW_0 + <dW_0, X_0> s'(X_0) for both matrices
    (dW_0 = the inner-gradient weights' cotangent, in the per-program buffers dw1/dw2)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        w0 = tl.program_id(0).to(tl.int64) * (D * E)
        acc2 = tl.zeros([BH, D], dtype=tl.float32)
        acc1 = tl.zeros([D, BH], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            acc2 += tl.load(dw2 + w0 + o2) * tl.load(st2 + b_in + o2)
            acc1 += tl.load(dw1 + w0 + o1) * tl.load(st1 + b_in + o1)
        k2 = _lq_kappa(tl.load(scalar_ptr(scr_p, C_N02, BT, SW, E)), tl.sum(tl.sum(acc2, axis=1), axis=0), lqe, LQQ)
        k1 = _lq_kappa(tl.load(scalar_ptr(scr_p, C_N01, BT, SW, E)), tl.sum(tl.sum(acc1, axis=1), axis=0), lqe, LQQ)
        s02 = tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
        s01 = tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            X2 = tl.load(st2 + b_in + o2)
            tl.store(dst2 + b_in + o2, tl.load(dst2 + b_in + o2) + s02 * tl.load(dw2 + w0 + o2) + k2 * X2 * absq2(X2, LQQ))
            X1 = tl.load(st1 + b_in + o1)
            tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + s01 * tl.load(dw1 + w0 + o1) + k1 * X1 * absq2(X1, LQQ))


# phases of the lq path, in launch order (the shared phases run with LQ=True). The forward reuses
# the backward's ``read`` phase to park dz_i, h_i for the norm scan.
LQ_KERNELS = {"mlp_lq_s0": mlp_lq_s0_kernel, "mlp_lq_norm2": mlp_lq_norm2_kernel,
              "mlp_lq_norm1": mlp_lq_norm1_kernel, "mlp_lq_nload": mlp_lq_nload_kernel,
              "mlp_lq_adj2": mlp_lq_adj2_kernel, "mlp_lq_adj2k": mlp_lq_adj2k_kernel,
              "mlp_lq_adj1": mlp_lq_adj1_kernel,
              "mlp_lq_dw0": mlp_lq_dw0_kernel}


FWD_LQ_KERNELS = insert_phases(FWD_KERNELS, [
    (None, ("mlp_fwd_lq_s0", mlp_lq_s0_kernel)),
    ("mlp_fwd_qw", ("mlp_fwd_read", mlp_bwd_read_kernel)),
    ("mlp_fwd_qw", ("mlp_fwd_lq_norm2", mlp_lq_norm2_kernel)),
    ("mlp_fwd_qw", ("mlp_fwd_lq_norm1", mlp_lq_norm1_kernel)),
    ("mlp_fwd_qw", ("mlp_fwd_lq_nsave", mlp_lq_nload_kernel)),
])
BWD_LQ_KERNELS = insert_phases(BWD_KERNELS, [
    (None, ("mlp_bwd_lq_s0", mlp_lq_s0_kernel)),
    ("mlp_bwd_read", ("mlp_bwd_lq_nload", mlp_lq_nload_kernel)),
    ("mlp_bwd_readdst", ("mlp_bwd_lq_adj2", mlp_lq_adj2_kernel)),
    ("mlp_bwd_readdst", ("mlp_bwd_lq_adj2k", mlp_lq_adj2k_kernel)),
    ("mlp_bwd_readdst", ("mlp_bwd_lq_adj1", mlp_lq_adj1_kernel)),
    ("mlp_bwd_first", ("mlp_bwd_lq_dw0", mlp_lq_dw0_kernel)),
])
# phases that take the extra lq arguments (runtime eps, the saved norms [T, H, 2], constexpr q)
LQ_ARG_KERNELS = frozenset(LQ_KERNELS.values())
