"""Triton chunk-parallel kernels (``@triton.jit`` phases) for the deep (2-layer residual MLP) Miras
memory. The host side (autograd Function, launches) is ``chunk.py``.

Memory (per head, ``docs/semantics.md``):
``M(x) = x + LN(W1 gelu(W2 x))`` with ``W2 [E, D]``, ``W1 [D, E]`` (``E = expansion * D``), LN
over ``D`` without affine weights (eps 1e-5) and the exact erf gelu.

Chunk semantics (chunk size ``BT``): every token ``i`` of a chunk takes its inner-loss gradient at
the chunk-start weights ``W_0``; the weights seen by the read of token ``t`` are

    X_t = c_t X_0 [+ b_t S_0] - sum_{i<=t} Gam_ti g_i

with ``c_t = exp(L_t)`` (``L`` = in-chunk cumsum of log alpha), ``Gam_ti = eta_i exp(L_t - L_i)`` for
plain GD and ``Gam_ti = eta_i sum_{s=i..t} exp(L_t - L_s + M_s - M_i)`` (``M`` = cumsum log mu) for
momentum, ``b_t = sum_{s<=t} exp(L_t - L_s + M_s)``. Because every ``g_i`` is a pair of outer
products (``g_W1 = do_i h_i^T``, ``g_W2 = dz_i k_i^T``) the reads never build per-token weights:

    z'_t = c_t W2_0 q_t [+ b_t S2_0 q_t] - sum_i Gam_ti dz_i (k_i . q_t)
    o'_t = c_t W1_0 h'_t [+ b_t S1_0 h'_t] - sum_i Gam_ti do_i (h_i . h'_t),   h'_t = gelu(z'_t)

Structure (register budget: zero spills on sm_80/sm_90 for every shipped configuration). The
chunks of a sequence are sequential (a chunk's gradients depend non-linearly on its start state),
so the host walks the chunk steps and launches, per step, a few *phase* kernels with grid
``(N * H,)`` (one program per sequence and head). Each phase keeps only its own working set in
registers; everything a later phase needs goes through a per-program fp32 scratch region (L2
resident, layout below), so no value is live across phases:

* forward: ``prep`` / ``prep2`` (inner forward on the keys, LN, bias map, ``do``) -> ``coef``
  (chunk coefficients, ``Gam``, ``A2 = Gam * (Q K^T)``) -> ``qw`` (``Q W2^T``, ``Q S2^T``) ->
  ``fwd_hidden`` (per hidden block: ``dz``, the read's hidden layer) -> ``fwd_state`` (chunk-end
  state) -> ``fwd_gram`` (``o'`` and the Gram matrix) -> ``fwd_out`` (Gram term, LN, ``y``).
* backward (chunks in reverse, d(state) carried through the per-boundary buffers): the same
  ``prep``/``prep2``/``coef``/``qw`` (recompute) -> ``read``/``read2`` (recompute the read) ->
  ``readout``/``readout2`` (the read's output LN backward, Gram term) -> ``readgrad``/
  ``readgrad2``/``readdst`` (the read's hidden-layer backward) -> ``state_mom``/``state``/
  ``state_do``/``state_dk`` (the chunk-end state's gradient and the inner gradient's chain) ->
  ``dq``/``dkm``/``dgam`` (the ``A2`` term) -> ``mid`` (second-order path through the LN backward
  and the bias) -> ``first`` (first-layer weights, ``dk``) -> ``gates_m``/``gates``.
  (``state_mom`` and ``gates_m`` run for momentum only.)

The hidden dimension ``E`` is tiled by ``BH`` inside the phases that touch the weights; tiles a
hidden-block loop needs are re-read from scratch inside the loop (``tl.range(...,
disable_licm=True)`` keeps the compiler from hoisting them back into registers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from miras_kernels.common.mlp_scratch import (C_BC, C_CC, C_DBC, C_DCC, C_DPC, C_PC, C_S01, C_S02, R_A, R_B,
    R_C, R_DZ, R_GDZ, R_GH, S_A2, S_DA2, S_DGAM, S_DGR, S_DK, S_DKM, S_DO, S_DOIN, S_DOQ, S_DQ, S_DS1,
    S_GAMM, S_GDN, S_GDR, S_KT, S_LQDK, S_OC, S_OS, S_QT, S_SHH, S_U, S_XH, V_B, V_C, V_DB, V_DB0, V_DC,
    V_DC0, V_DETA, V_DGAM, V_DPI, V_DS1, V_DS2, V_GAC, V_GAM, V_GAR, V_PI, V_RSTD, V_S1, V_S2,
    chunk_prologue, load_gates, load_tokens, region_ptrs, scalar_ptr, slot_ptrs, slot_ptrs_t, token_offsets,
    vector_ptrs, w0_offset)
from miras_kernels.common.mlp_tiles import (bias_grad, gelu, gelu_d, gelu_dd, ln_bwd, ln_rows)



@triton.jit
def _chunk_coefs(la_c, lm_c, et_c, tm, BT: tl.constexpr, MOMENTUM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """In-chunk decay coefficients.

    Returns (c [BT], cC, Dm [BT,BT] = exp(L_t-L_i) masked i<=t, Gam [BT,BT], gam [BT] = coefficient
    of g_i in the chunk-end X, b [BT], bC, pi [BT] = coefficient of g_i in the chunk-end S, PC).
    For plain GD the momentum outputs are zeros.
    """
    rows = tl.arange(0, BT)
    causal = rows[:, None] >= rows[None, :]
    L = tl.cumsum(la_c, axis=0)
    Ltot = tl.sum(la_c, axis=0)
    cvec = tl.exp(L)
    cC = tl.exp(Ltot)
    Dm = tl.where(causal, tl.exp(tl.where(causal, L[:, None] - L[None, :], 0.0)), 0.0)
    if MOMENTUM:
        M = tl.cumsum(lm_c, axis=0)
        Mtot = tl.sum(lm_c, axis=0)
        Bm = tl.where(causal, tl.exp(tl.where(causal, M[:, None] - M[None, :], 0.0)), 0.0)
        # E_ti = sum_{s=i..t} exp(L_t - L_s) exp(M_s - M_i): a product of two triangular matrices
        Em = tl.dot(Dm, Bm, input_precision=DOT_PRECISION)
        Gam = Em * et_c[None, :]
        eM = tl.exp(M)
        bvec = tl.sum(Dm * eM[None, :], axis=1)
        # chunk end: only valid tokens s take part in the sums over s
        wend = tl.where(tm, tl.exp(Ltot - L), 0.0)
        bC = tl.sum(wend * eM, axis=0)
        gam = et_c * tl.sum(wend[:, None] * Bm, axis=0)
        pi = et_c * tl.exp(Mtot - M)
        PC = tl.exp(Mtot)
    else:
        Gam = Dm * et_c[None, :]
        gam = et_c * tl.exp(Ltot - L)
        bvec = tl.zeros([BT], dtype=tl.float32)
        bC = Ltot * 0.0
        pi = tl.zeros([BT], dtype=tl.float32)
        PC = Ltot * 0.0
    return cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC


# The phase kernels share one argument list (the host and the AOT list stay simple; a phase
# ignores what it does not use). Grid: (N * H,), one launch per chunk step.
# ``step`` (the chunk step) changes with every launch: ``do_not_specialize`` keeps one compile
# for all steps (Triton would otherwise compile step == 1 and step % 16 == 0 apart), the same
# one tools/kernel_report.py checks. ``DOT_PRECISION`` (common.precision.dot_precision(): tf32,
# or ieee under MIRAS_EXACT_FP32=1) is every fp32 tl.dot's input_precision.
@triton.jit(do_not_specialize=["step"])
def mlp_prep_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Phase 1a (forward and backward): the inner forward at W_0 on the keys, o = W1 gelu(W2 k)
    (parked); K^T and Q^T staged in fp32."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        O = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            W2b = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])          # [BH, D]
            W1b = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])          # [D, BH]
            if LQ:   # inner gradients at the weights W_0 = s_0 X_0
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
                W1b = W1b * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
            O += tl.dot(gelu(tl.dot(load_tokens(k + tb, tm, H, D, BT), tl.trans(W2b), input_precision=DOT_PRECISION)), tl.trans(W1b), input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_OC, BT, D, SW, BT), O)
        tl.store(slot_ptrs_t(scr_p, S_KT, D, SW, BT), tl.trans(load_tokens(k + tb, tm, H, D, BT)))
        tl.store(slot_ptrs_t(scr_p, S_QT, D, SW, BT), tl.trans(load_tokens(q + tb, tm, H, D, BT)))


@triton.jit(do_not_specialize=["step"])
def mlp_prep2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Phase 1b (forward and backward): LN of o, the bias map u = dl/dM, do = LN_bwd(u)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        xh, rstd = ln_rows(tl.load(slot_ptrs(scr_p, S_OC, BT, D, SW, BT)), D)
        dl_c = tl.load(dlt + go, mask=tm, other=1.0)
        V = load_tokens(v + tb, tm, H, D, BT)
        U = bias_grad(load_tokens(k + tb, tm, H, D, BT) + xh - V, V, dl_c, p, BIAS)
        tl.store(slot_ptrs(scr_p, S_DO, BT, D, SW, BT), ln_bwd(xh, rstd, U, D))
        tl.store(slot_ptrs(scr_p, S_XH, BT, D, SW, BT), xh)
        tl.store(slot_ptrs(scr_p, S_U, BT, D, SW, BT), U)
        tl.store(vector_ptrs(scr_p, V_RSTD, BT, SW, E), rstd)


@triton.jit(do_not_specialize=["step"])
def mlp_coef_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Phase 1c (forward and backward): the in-chunk coefficients (c, gam, b, pi, cC, bC, PC, Gam)
    and A2 = Gam * (Q K^T)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        la_c, et_c, dl_c, lm_c = load_gates(la, eta, dlt, lmu, go, tm)
        cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC = _chunk_coefs(la_c, lm_c, et_c, tm, BT, MOMENTUM, DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT), Gam)
        tl.store(slot_ptrs(scr_p, S_A2, BT, BT, SW, BT),
                 Gam * tl.dot(load_tokens(q + tb, tm, H, D, BT), tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), input_precision=DOT_PRECISION))
        tl.store(vector_ptrs(scr_p, V_C, BT, SW, E), cvec)
        tl.store(vector_ptrs(scr_p, V_GAM, BT, SW, E), gam)
        tl.store(vector_ptrs(scr_p, V_B, BT, SW, E), bvec)
        tl.store(vector_ptrs(scr_p, V_PI, BT, SW, E), pi)
        tl.store(scalar_ptr(scr_p, C_CC, BT, SW, E), cC)
        tl.store(scalar_ptr(scr_p, C_BC, BT, SW, E), bC)
        tl.store(scalar_ptr(scr_p, C_PC, BT, SW, E), PC)


@triton.jit(do_not_specialize=["step"])
def mlp_qw_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Phase 1d (forward and backward), per hidden block: Q W2_0^T (and Q S2_0^T for momentum)
    into scratch, kept out of the register-heavy hidden-layer phases."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2t = hh[None, :] * D + od[:, None]
            tl.store(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E), tl.dot(load_tokens(q + tb, tm, H, D, BT), tl.load(st2 + b_in + o2t), input_precision=DOT_PRECISION))
            if MOMENTUM:
                tl.store(region_ptrs(scr_p, R_DZ, hh, BT, SW, E), tl.dot(load_tokens(q + tb, tm, H, D, BT), tl.load(ss2 + b_in + o2t), input_precision=DOT_PRECISION))


@triton.jit(do_not_specialize=["step"])
def mlp_fwd_hidden_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward phase 2a, per hidden block: dz_i and the read's hidden layer Hq; Hq, Hh = gelu(z)
    and dz_i are parked for the state and Gram phases."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = load_tokens(k + tb, tm, H, D, BT)
            Dn = tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            if LQ:
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
                W1b = W1b * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
            Z = tl.dot(Kl, tl.trans(W2b), input_precision=DOT_PRECISION)
            Hh = gelu(Z)
            DZ = tl.dot(Dn, W1b, input_precision=DOT_PRECISION) * gelu_d(Z)                                   # dz_i [BT, BH]
            Zq = cvec[:, None] * tl.load(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E)) - tl.dot(tl.load(slot_ptrs(scr_p, S_A2, BT, BT, SW, BT)), DZ, input_precision=DOT_PRECISION)
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                Zq += bvec[:, None] * tl.load(region_ptrs(scr_p, R_DZ, hh, BT, SW, E))
            if LQ:   # lq read of layer 2: z'_t = s2_t (affine read of X2_t)
                Zq = Zq * tl.load(vector_ptrs(scr_p, V_S2, BT, SW, E))[:, None]
            tl.store(region_ptrs(scr_p, R_A, hh, BT, SW, E), gelu(Zq))
            tl.store(region_ptrs(scr_p, R_B, hh, BT, SW, E), Hh)
            tl.store(region_ptrs(scr_p, R_C, hh, BT, SW, E), DZ)


@triton.jit(do_not_specialize=["step"])
def mlp_fwd_state_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward phase 2b, per hidden block: the chunk-end state X' = cC X [+ bC S] - sum_i gam_i
    g_i (and S' = PC S - sum_i pi_i g_i) from the parked dz_i, h_i."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        cC = tl.load(scalar_ptr(scr_p, C_CC, BT, SW, E))
        bC = tl.load(scalar_ptr(scr_p, C_BC, BT, SW, E))
        PC = tl.load(scalar_ptr(scr_p, C_PC, BT, SW, E))
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            o2 = hh[None, :] * D + od[:, None]      # W2 block as [D, BH] (dot with M = D)
            KT = tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT))
            Dn = tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))
            gam = tl.load(vector_ptrs(scr_p, V_GAM, BT, SW, E))
            DZ = tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E))
            Hh = tl.load(region_ptrs(scr_p, R_B, hh, BT, SW, E))
            W2n = cC * tl.load(st2 + b_in + o2) - tl.dot(KT, DZ * gam[:, None], input_precision=DOT_PRECISION)
            W1n = cC * tl.load(st1 + b_in + o1) - tl.dot(tl.trans(Dn * gam[:, None]), Hh, input_precision=DOT_PRECISION)
            if MOMENTUM:
                pi = tl.load(vector_ptrs(scr_p, V_PI, BT, SW, E))
                S2b = tl.load(ss2 + b_in + o2)
                S1b = tl.load(ss1 + b_in + o1)
                W2n += bC * S2b
                W1n += bC * S1b
                tl.store(ss2 + b_out + o2, PC * S2b - tl.dot(KT, DZ * pi[:, None], input_precision=DOT_PRECISION))
                tl.store(ss1 + b_out + o1, PC * S1b - tl.dot(tl.trans(Dn * pi[:, None]), Hh, input_precision=DOT_PRECISION))
            tl.store(st2 + b_out + o2, W2n)
            tl.store(st1 + b_out + o1, W1n)


@triton.jit(do_not_specialize=["step"])
def mlp_fwd_gram_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward phase 3, per hidden block: the read's o' without the Gram term (c Hq W1^T [+ b Hq
    S1^T]) and the Gram matrix Hq Hh^T."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        Oq = tl.zeros([BT, D], dtype=tl.float32)
        Shh = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            Hq = tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E))
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            Oq += tl.dot(Hq * cvec[:, None], tl.trans(tl.load(st1 + b_in + o1)), input_precision=DOT_PRECISION)
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                Oq += tl.dot(Hq * bvec[:, None], tl.trans(tl.load(ss1 + b_in + o1)), input_precision=DOT_PRECISION)
            Shh += tl.dot(Hq, tl.trans(tl.load(region_ptrs(scr_p, R_B, hh, BT, SW, E))), input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_OC, BT, D, SW, BT), Oq)
        tl.store(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT), Shh)


@triton.jit(do_not_specialize=["step"])
def mlp_fwd_out_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Forward phase 3: o' -= (Gam * Shh) do, y = q + LN(o')."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        A1 = tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT)) * tl.load(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT))
        Oq = tl.load(slot_ptrs(scr_p, S_OC, BT, D, SW, BT)) - tl.dot(A1, tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), input_precision=DOT_PRECISION)
        if LQ:   # lq read of layer 1: o'_t = s1_t (affine read of X1_t)
            Oq = Oq * tl.load(vector_ptrs(scr_p, V_S1, BT, SW, E))[:, None]
        xq, rq = ln_rows(Oq, D)
        tl.store(y + tb + token_offsets(H, D, BT), (load_tokens(q + tb, tm, H, D, BT) + xq).to(y.dtype.element_ty),
                 mask=tm[:, None])


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_read_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B0a, per hidden block: recompute and park dz_i and h_i = gelu(z_i)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            W2b = tl.load(st2 + b_in + o2)
            if LQ:
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
            Z = tl.dot(load_tokens(k + tb, tm, H, D, BT), tl.trans(W2b), input_precision=DOT_PRECISION)
            if LQ:
                W1b = tl.load(st1 + b_in + o1) * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
            else:
                W1b = tl.load(st1 + b_in + o1)
            tl.store(region_ptrs(scr_p, R_C, hh, BT, SW, E), tl.dot(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), W1b, input_precision=DOT_PRECISION) * gelu_d(Z))
            tl.store(region_ptrs(scr_p, R_GH, hh, BT, SW, E), gelu(Z))


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_read2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B0b, per hidden block: the read's hidden layer from the parked pieces -> Oc, Os,
    Shh."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        Oc = tl.zeros([BT, D], dtype=tl.float32)    # sum_blocks Hq W1^T (coefficient c_t)
        Os = tl.zeros([BT, D], dtype=tl.float32)    # sum_blocks Hq S1^T (coefficient b_t)
        Shh = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            Zq = cvec[:, None] * tl.load(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E)) \
                - tl.dot(tl.load(slot_ptrs(scr_p, S_A2, BT, BT, SW, BT)), tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E)), input_precision=DOT_PRECISION)
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                Zq += bvec[:, None] * tl.load(region_ptrs(scr_p, R_DZ, hh, BT, SW, E))
                if LQ:   # z'_t = s2_t (affine read of X2_t)
                    Zq = Zq * tl.load(vector_ptrs(scr_p, V_S2, BT, SW, E))[:, None]
                Hq = gelu(Zq)
                Os += tl.dot(Hq, tl.trans(tl.load(ss1 + b_in + o1)), input_precision=DOT_PRECISION)
            else:
                if LQ:
                    Zq = Zq * tl.load(vector_ptrs(scr_p, V_S2, BT, SW, E))[:, None]
                Hq = gelu(Zq)
            Oc += tl.dot(Hq, tl.trans(tl.load(st1 + b_in + o1)), input_precision=DOT_PRECISION)
            Shh += tl.dot(Hq, tl.trans(tl.load(region_ptrs(scr_p, R_GH, hh, BT, SW, E))), input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_OC, BT, D, SW, BT), Oc)
        tl.store(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT), Shh)
        if MOMENTUM:
            tl.store(slot_ptrs(scr_p, S_OS, BT, D, SW, BT), Os)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_readout_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B1: the read's output layer o' = c Oc [+ b Os] - (Gam * Shh) do and its LN."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
        A1 = tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT)) * tl.load(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT))
        Oc = tl.load(slot_ptrs(scr_p, S_OC, BT, D, SW, BT))
        Oq = cvec[:, None] * Oc - tl.dot(A1, tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), input_precision=DOT_PRECISION)
        if MOMENTUM:
            Oq += tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))[:, None] * tl.load(slot_ptrs(scr_p, S_OS, BT, D, SW, BT))
        if LQ:
            # o'_t = s1_t r_t: d s1_t = <d o'_t, r_t>; the affine read r gets s1_t d o'_t
            s1 = tl.load(vector_ptrs(scr_p, V_S1, BT, SW, E))
            xq, rq = ln_rows(Oq * s1[:, None], D)
            dOq = ln_bwd(xq, rq, load_tokens(y + tb, tm, H, D, BT), D)
            tl.store(vector_ptrs(scr_p, V_DS1, BT, SW, E), tl.sum(dOq * Oq, axis=1))
            dOq = dOq * s1[:, None]
        else:
            xq, rq = ln_rows(Oq, D)
            dOq = ln_bwd(xq, rq, load_tokens(y + tb, tm, H, D, BT), D)
        tl.store(vector_ptrs(scr_p, V_DC0, BT, SW, E), tl.sum(dOq * Oc, axis=1))
        if MOMENTUM:
            tl.store(vector_ptrs(scr_p, V_DB0, BT, SW, E), tl.sum(dOq * tl.load(slot_ptrs(scr_p, S_OS, BT, D, SW, BT)), axis=1))
        else:
            tl.store(vector_ptrs(scr_p, V_DB0, BT, SW, E), tl.zeros([BT], dtype=tl.float32))
        tl.store(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT), dOq)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_readout2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B1b: through the Gram term of the read's output, A1 = Gam * Shh."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        Shh = tl.load(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT))
        Gam = tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT))
        dA1 = -tl.dot(tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT)), tl.trans(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))), input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT), dA1 * Shh)
        tl.store(slot_ptrs(scr_p, S_DS1, BT, BT, SW, BT), dA1 * Gam)
        # the two dots in sequence, operands re-read after a CTA barrier: sharing the [BT, D] d(o')
        # tile between them kept both dots' operand copies live (sm_80 spilled 696 bytes at
        # D = 128, C = 64)
        tl.debug_barrier()
        GS = tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT)) * tl.load(slot_ptrs(scr_p, S_SHH, BT, BT, SW, BT))
        tl.store(slot_ptrs(scr_p, S_GDR, BT, D, SW, BT), -tl.dot(tl.trans(GS), tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT)), input_precision=DOT_PRECISION))   # d(do) from the read


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_readgrad_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B2a, per hidden block: the read's hidden layer backward (Zq -> Hq -> o'), dc,
    db (Q W2^T, h_i, dz_i [, Q S2^T] parked by the read phase); dZq, Hq parked for B2b."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        dc = tl.load(vector_ptrs(scr_p, V_DC0, BT, SW, E))
        db = tl.load(vector_ptrs(scr_p, V_DB0, BT, SW, E))
        ds2 = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o1 = od[:, None] * E + hh[None, :]
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            QW = tl.load(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E))
            Zq = cvec[:, None] * QW - tl.dot(tl.load(slot_ptrs(scr_p, S_A2, BT, BT, SW, BT)), tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E)), input_precision=DOT_PRECISION)
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                QS = tl.load(region_ptrs(scr_p, R_DZ, hh, BT, SW, E))
                Zq += bvec[:, None] * QS
            if LQ:
                s2 = tl.load(vector_ptrs(scr_p, V_S2, BT, SW, E))
                Hq = gelu(Zq * s2[:, None])
            else:
                Hq = gelu(Zq)
            dOql = tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT))
            dHq = cvec[:, None] * tl.dot(dOql, tl.load(st1 + b_in + o1), input_precision=DOT_PRECISION) \
                + tl.dot(tl.load(slot_ptrs(scr_p, S_DS1, BT, BT, SW, BT)), tl.load(region_ptrs(scr_p, R_GH, hh, BT, SW, E)), input_precision=DOT_PRECISION)
            if MOMENTUM:
                dHq += bvec[:, None] * tl.dot(dOql, tl.load(ss1 + b_in + o1), input_precision=DOT_PRECISION)
            if LQ:
                # z'_t = s2_t r_t: d s2_t = <d z'_t, r_t>; the affine read r gets s2_t d z'_t
                dZq = dHq * gelu_d(Zq * s2[:, None])
                ds2 += tl.sum(dZq * Zq, axis=1)
                dZq = dZq * s2[:, None]
            else:
                dZq = dHq * gelu_d(Zq)
            dc += tl.sum(dZq * QW, axis=1)
            if MOMENTUM:
                db += tl.sum(dZq * QS, axis=1)
            tl.store(region_ptrs(scr_p, R_A, hh, BT, SW, E), dZq)
            tl.store(region_ptrs(scr_p, R_B, hh, BT, SW, E), Hq)
        tl.store(vector_ptrs(scr_p, V_DC, BT, SW, E), dc)
        tl.store(vector_ptrs(scr_p, V_DB, BT, SW, E), db)
        if LQ:
            tl.store(vector_ptrs(scr_p, V_DS2, BT, SW, E), ds2)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_readgrad2_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B2b, per hidden block: dq of the read, d(A2), and d/d(dz_i), d/d(h_i) from the
    read (parked for B3)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        dQ = tl.zeros([BT, D], dtype=tl.float32)
        dA2 = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            dZq = tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E))
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            dQ += tl.dot(dZq * cvec[:, None], tl.load(st2 + b_in + o2), input_precision=DOT_PRECISION)
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                dQ += tl.dot(dZq * bvec[:, None], tl.load(ss2 + b_in + o2), input_precision=DOT_PRECISION)
            dA2 -= tl.dot(dZq, tl.trans(tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E))), input_precision=DOT_PRECISION)
            tl.store(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E), -tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_A2, BT, BT, SW, BT))), dZq, input_precision=DOT_PRECISION))
            tl.store(region_ptrs(scr_p, R_GH, hh, BT, SW, E),
                     tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_DS1, BT, BT, SW, BT))), tl.load(region_ptrs(scr_p, R_B, hh, BT, SW, E)), input_precision=DOT_PRECISION))
        tl.store(slot_ptrs(scr_p, S_DQ, BT, D, SW, BT), dQ)
        tl.store(slot_ptrs(scr_p, S_DA2, BT, BT, SW, BT), dA2)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_readdst_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B2c, per hidden block: the read's share of d(chunk-start state) (written, not
    accumulated: B3c and B5 add the rest)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            cvec = tl.load(vector_ptrs(scr_p, V_C, BT, SW, E))
            dZq = tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E))
            Hq = tl.load(region_ptrs(scr_p, R_B, hh, BT, SW, E))
            tl.store(dst1 + b_in + o1, tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT)) * cvec[:, None]), Hq, input_precision=DOT_PRECISION))
            o2 = hh[None, :] * D + od[:, None]      # [D, BH] view of the W2 block
            tl.store(dst2 + b_in + o2, tl.dot(tl.load(slot_ptrs_t(scr_p, S_QT, D, SW, BT)), dZq * cvec[:, None], input_precision=DOT_PRECISION))
            if MOMENTUM:
                bvec = tl.load(vector_ptrs(scr_p, V_B, BT, SW, E))
                tl.store(dss1 + b_in + o1, tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT)) * bvec[:, None]), Hq, input_precision=DOT_PRECISION))
                tl.store(dss2 + b_in + o2, tl.dot(tl.load(slot_ptrs_t(scr_p, S_QT, D, SW, BT)), dZq * bvec[:, None], input_precision=DOT_PRECISION))


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_state_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B3a, per hidden block: through the chunk-end state (X' = cC X [+ bC S] -
    sum gam_i g_i, S' = PC S - sum pi_i g_i) to d(dz_i) and d(h_i), the inner-gradient chain
    dz = (W1^T do) gelu'(z); d(gam), d(pi). d(dh) = d(dz) gelu'(z) is parked for B3b/B3c."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        dgam = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            gam = tl.load(vector_ptrs(scr_p, V_GAM, BT, SW, E))
            Kl = load_tokens(k + tb, tm, H, D, BT)
            Dnl = tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            if LQ:
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
                W1b = W1b * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
            dW2e = tl.load(dst2 + b_out + o2)
            dW1e = tl.load(dst1 + b_out + o1)
            Z = tl.dot(Kl, tl.trans(W2b), input_precision=DOT_PRECISION)
            gz = gelu_d(Z)
            dH = tl.dot(Dnl, W1b, input_precision=DOT_PRECISION)
            DZ = dH * gz
            KdW2 = tl.dot(Kl, tl.trans(dW2e), input_precision=DOT_PRECISION)
            DdW1 = tl.dot(Dnl, dW1e, input_precision=DOT_PRECISION)      # [C, BH]; <do_i, dW1' h_i> = sum_j h_ij (do_i dW1')_j
            gDZ = tl.load(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E)) - gam[:, None] * KdW2
            gH = tl.load(region_ptrs(scr_p, R_GH, hh, BT, SW, E)) - gam[:, None] * DdW1
            dgam -= tl.sum(DZ * KdW2, axis=1) + tl.sum(gelu(Z) * DdW1, axis=1)
            # dz = dh * gelu'(z), dh = W1^T do
            tl.store(region_ptrs(scr_p, R_A, hh, BT, SW, E), gDZ * gz)
            # d/dz, partial (the LN-of-o part is added in B5)
            tl.store(region_ptrs(scr_p, R_DZ, hh, BT, SW, E), gDZ * dH * gelu_dd(Z) + gH * gz)
        tl.store(vector_ptrs(scr_p, V_DGAM, BT, SW, E), dgam)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_state_mom_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Momentum only, backward B3m (before B3a), per hidden block: the chunk-end momentum
    S' = PC S - sum_i pi_i g_i into d(dz_i), d(h_i) (accumulated in scratch) and d(pi)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        dpi = tl.zeros([BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            pi = tl.load(vector_ptrs(scr_p, V_PI, BT, SW, E))
            Kl = load_tokens(k + tb, tm, H, D, BT)
            dS2e = tl.load(dss2 + b_out + o2)
            KdS2 = tl.dot(Kl, tl.trans(dS2e), input_precision=DOT_PRECISION)
            dpi -= tl.sum(tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E)) * KdS2, axis=1)
            tl.store(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E), tl.load(region_ptrs(scr_p, R_GDZ, hh, BT, SW, E)) - pi[:, None] * KdS2)
            DdS1 = tl.dot(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), tl.load(dss1 + b_out + o1), input_precision=DOT_PRECISION)
            if LQ:
                dpi -= tl.sum(gelu(tl.dot(Kl, tl.trans(tl.load(st2 + b_in + o2) * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))), input_precision=DOT_PRECISION)) * DdS1, axis=1)
            else:
                dpi -= tl.sum(gelu(tl.dot(Kl, tl.trans(tl.load(st2 + b_in + o2)), input_precision=DOT_PRECISION)) * DdS1, axis=1)
            tl.store(region_ptrs(scr_p, R_GH, hh, BT, SW, E), tl.load(region_ptrs(scr_p, R_GH, hh, BT, SW, E)) - pi[:, None] * DdS1)
        tl.store(vector_ptrs(scr_p, V_DPI, BT, SW, E), dpi)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_state_do_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B3b, per hidden block: d(do_i) total = read part - gam_i h_i dW1'^T [- pi_i h_i
    dS1'^T] + d(dh_i) W1^T."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        gDn = tl.load(slot_ptrs(scr_p, S_GDR, BT, D, SW, BT))
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            gam = tl.load(vector_ptrs(scr_p, V_GAM, BT, SW, E))
            if LQ:
                Hh = gelu(tl.dot(load_tokens(k + tb, tm, H, D, BT), tl.trans(tl.load(st2 + b_in + o2) * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))), input_precision=DOT_PRECISION))
            else:
                Hh = gelu(tl.dot(load_tokens(k + tb, tm, H, D, BT), tl.trans(tl.load(st2 + b_in + o2)), input_precision=DOT_PRECISION))
            gDn -= tl.dot(Hh * gam[:, None], tl.trans(tl.load(dst1 + b_out + o1)), input_precision=DOT_PRECISION)
            if MOMENTUM:
                pi = tl.load(vector_ptrs(scr_p, V_PI, BT, SW, E))
                gDn -= tl.dot(Hh * pi[:, None], tl.trans(tl.load(dss1 + b_out + o1)), input_precision=DOT_PRECISION)
            if LQ:
                gDn += tl.dot(tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E)), tl.trans(tl.load(st1 + b_in + o1) * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))), input_precision=DOT_PRECISION)
            else:
                gDn += tl.dot(tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E)), tl.trans(tl.load(st1 + b_in + o1)), input_precision=DOT_PRECISION)
        tl.store(slot_ptrs(scr_p, S_GDN, BT, D, SW, BT), gDn)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_state_dk_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B3c, per hidden block: dk from the chunk-end state, -gam_i dz_i^T dW2' [- pi_i
    dz_i^T dS2'] (dz_i parked by B2a); d(chunk-start state) += cC dX' [+ bC, PC terms] +
    do^T d(dh); d(cC), d(bC), d(PC)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        cC = tl.load(scalar_ptr(scr_p, C_CC, BT, SW, E))
        if LQ:   # dk from the norms' adjoint (chunk_lq)
            dK = tl.load(slot_ptrs(scr_p, S_LQDK, BT, D, SW, BT))
        else:
            dK = tl.zeros([BT, D], dtype=tl.float32)
        dcC = cC * 0.0
        dbC = dcC
        dPC = dcC
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            DZ = tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E))
            gam = tl.load(vector_ptrs(scr_p, V_GAM, BT, SW, E))
            dW2e = tl.load(dst2 + b_out + o2)
            dW1e = tl.load(dst1 + b_out + o1)
            dK -= tl.dot(DZ * gam[:, None], dW2e, input_precision=DOT_PRECISION)
            dcC += tl.sum(tl.sum(dW2e * tl.load(st2 + b_in + o2), axis=1), axis=0) \
                + tl.sum(tl.sum(dW1e * tl.load(st1 + b_in + o1), axis=1), axis=0)
            if LQ:
                # d(X_0) and d(W_0) (inner gradients' weights) kept apart: chunk_lq's dw0 phase
                # maps d(W_0) through W_0 = s(X_0) X_0
                tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + cC * dW1e)
                tl.store(dw1 + w0_offset(D, E) + o1,
                         tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))), tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E)), input_precision=DOT_PRECISION))
            else:
                tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + cC * dW1e
                         + tl.dot(tl.trans(tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT))), tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E)), input_precision=DOT_PRECISION))
            tl.store(dst2 + b_in + o2, tl.load(dst2 + b_in + o2) + cC * dW2e)
        if MOMENTUM:
            # the momentum terms in a second hidden-block loop (d(chunk-end X) re-read): in one loop
            # with the X terms the [BH, D] tiles of both states plus the [BT, D] dk accumulator
            # spilled on sm_80 at D = 128, C = 64 (2920 bytes)
            pi = tl.load(vector_ptrs(scr_p, V_PI, BT, SW, E))
            bC = tl.load(scalar_ptr(scr_p, C_BC, BT, SW, E))
            PC = tl.load(scalar_ptr(scr_p, C_PC, BT, SW, E))
            for jb in tl.range(0, E, BH, disable_licm=True):
                hh = jb + oh
                o2 = hh[:, None] * D + od[None, :]
                o1 = od[:, None] * E + hh[None, :]
                DZ = tl.load(region_ptrs(scr_p, R_C, hh, BT, SW, E))
                dW2e = tl.load(dst2 + b_out + o2)
                dW1e = tl.load(dst1 + b_out + o1)
                dS2e = tl.load(dss2 + b_out + o2)
                dS1e = tl.load(dss1 + b_out + o1)
                S2b = tl.load(ss2 + b_in + o2)
                S1b = tl.load(ss1 + b_in + o1)
                dK -= tl.dot(DZ * pi[:, None], dS2e, input_precision=DOT_PRECISION)
                dbC += tl.sum(tl.sum(dW2e * S2b, axis=1), axis=0) + tl.sum(tl.sum(dW1e * S1b, axis=1), axis=0)
                dPC += tl.sum(tl.sum(dS2e * S2b, axis=1), axis=0) + tl.sum(tl.sum(dS1e * S1b, axis=1), axis=0)
                tl.store(dss1 + b_in + o1, tl.load(dss1 + b_in + o1) + bC * dW1e + PC * dS1e)
                tl.store(dss2 + b_in + o2, tl.load(dss2 + b_in + o2) + bC * dW2e + PC * dS2e)
        tl.store(slot_ptrs(scr_p, S_DK, BT, D, SW, BT), dK)
        tl.store(scalar_ptr(scr_p, C_DCC, BT, SW, E), dcC)
        tl.store(scalar_ptr(scr_p, C_DBC, BT, SW, E), dbC)
        tl.store(scalar_ptr(scr_p, C_DPC, BT, SW, E), dPC)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_dq_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B4a: A2 = Gam * (Q K^T): completes dq."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        dA2 = tl.load(slot_ptrs(scr_p, S_DA2, BT, BT, SW, BT))
        dS2 = dA2 * tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT))
        dQ = tl.load(slot_ptrs(scr_p, S_DQ, BT, D, SW, BT)) + tl.dot(dS2, load_tokens(k + tb, tm, H, D, BT), input_precision=DOT_PRECISION) + load_tokens(y + tb, tm, H, D, BT)
        tl.store(dq + tb + token_offsets(H, D, BT), dQ, mask=tm[:, None])


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_dkm_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B4b: dk += (dA2 * Gam)^T Q."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        dS2 = tl.load(slot_ptrs(scr_p, S_DA2, BT, BT, SW, BT)) * tl.load(slot_ptrs(scr_p, S_GAMM, BT, BT, SW, BT))
        tl.store(slot_ptrs(scr_p, S_DKM, BT, D, SW, BT), tl.load(slot_ptrs(scr_p, S_DK, BT, D, SW, BT)) + tl.dot(tl.trans(dS2), load_tokens(q + tb, tm, H, D, BT), input_precision=DOT_PRECISION))


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_dgam_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B4b: d(Gam) total = read part + dA2 * (Q K^T) (recomputed: A2 / Gam is unsafe
    where Gam = 0)."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        dA2 = tl.load(slot_ptrs(scr_p, S_DA2, BT, BT, SW, BT))
        tl.store(slot_ptrs(scr_p, S_DGAM, BT, BT, SW, BT), tl.load(slot_ptrs(scr_p, S_DGR, BT, BT, SW, BT))
                 + dA2 * tl.dot(load_tokens(q + tb, tm, H, D, BT), tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), input_precision=DOT_PRECISION))


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_mid_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B4b: the second-order path through do = LN_bwd(o, u), the bias map (dv,
    d delta) and LN(o) -> d(o) at the keys."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        dl_c = tl.load(dlt + go, mask=tm, other=1.0)
        # through do = LN_bwd(o, u) (second order), the bias, and LN(o) itself
        xh = tl.load(slot_ptrs(scr_p, S_XH, BT, D, SW, BT))
        rstd = tl.load(vector_ptrs(scr_p, V_RSTD, BT, SW, E))
        dU = ln_bwd(xh, rstd, tl.load(slot_ptrs(scr_p, S_GDN, BT, D, SW, BT)), D)
        dd_c = tl.zeros([BT], dtype=tl.float32)
        if BIAS == 0:
            dV = -dU
        else:
            # park dU in the free slot S_DA2 (dq/dkm/dgam have consumed it): with the bias map's
            # tiles it kept too many [BT, D] fp32 tiles live at D = 128, C = 64 (see below)
            tl.store(slot_ptrs(scr_p, S_DA2, BT, D, SW, BT), dU)
            tl.debug_barrier()
            dU = tl.load(slot_ptrs(scr_p, S_DA2, BT, D, SW, BT))
            xh = tl.load(slot_ptrs(scr_p, S_XH, BT, D, SW, BT))
            Ein = load_tokens(k + tb, tm, H, D, BT) + xh - load_tokens(v + tb, tm, H, D, BT)
            if BIAS == 1:
                dE = dU
            elif BIAS == 2:
                e2 = Ein * Ein + 1e-6
                dE = dU * p * tl.exp((p - 4.0) * 0.5 * tl.log(e2)) * ((p - 1.0) * Ein * Ein + 1e-6)
            else:  # huber: p carries huber_eps
                e2 = Ein * Ein + p
                big = tl.sqrt(tl.sum(Ein * Ein, axis=1)) > dl_c
                inv = 1.0 / tl.sqrt(e2)
                dE = tl.where(big[:, None], dU * dl_c[:, None] * p * inv / e2, dU)
                dd_c = tl.where(big, tl.sum(dU * Ein * inv, axis=1), 0.0)
            dV = -dE
        tl.store(dv + tb + token_offsets(H, D, BT), dV, mask=tm[:, None])
        tl.store(ddlt + go, dd_c, mask=tm)
        # dk so far (+ dE), finished by B5 (slot S_DQ is free now: dq is written)
        if BIAS == 0:
            tl.store(slot_ptrs(scr_p, S_DQ, BT, D, SW, BT), tl.load(slot_ptrs(scr_p, S_DKM, BT, D, SW, BT)))
        else:
            tl.store(slot_ptrs(scr_p, S_DQ, BT, D, SW, BT), tl.load(slot_ptrs(scr_p, S_DKM, BT, D, SW, BT)) - dV)
            # park dV (slot S_DOQ is free after the read's backward) and start the LN part from
            # scratch after a CTA barrier: at D = 128, C = 64 the bias part's [BT, D] tiles (Ein,
            # dE, e2, inv, dU) stayed live into the LN part and ptxas spilled (lp/huber)
            tl.store(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT), dV)
            tl.debug_barrier()
            xh = tl.load(slot_ptrs(scr_p, S_XH, BT, D, SW, BT))
            rstd = tl.load(vector_ptrs(scr_p, V_RSTD, BT, SW, E))
        gDn = tl.load(slot_ptrs(scr_p, S_GDN, BT, D, SW, BT))
        U = tl.load(slot_ptrs(scr_p, S_U, BT, D, SW, BT))
        P = tl.sum(U * xh, axis=1) / D
        mgx = tl.sum(gDn * xh, axis=1) / D
        gx = -rstd[:, None] * (P[:, None] * gDn + mgx[:, None] * U)
        if BIAS != 0:
            gx -= tl.load(slot_ptrs(scr_p, S_DOQ, BT, D, SW, BT))          # + dE = -dV
        gr = tl.sum(gDn * tl.load(slot_ptrs(scr_p, S_DO, BT, D, SW, BT)), axis=1) / rstd
        tl.store(slot_ptrs(scr_p, S_DOIN, BT, D, SW, BT), ln_bwd(xh, rstd, gx, D) - (gr * rstd * rstd / D)[:, None] * xh)


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_first_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B5, per hidden block: finish d/dz and the first-layer weight gradients; dk."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        od = tl.arange(0, D)
        oh = tl.arange(0, BH)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = load_tokens(k + tb, tm, H, D, BT)
            dOin = tl.load(slot_ptrs(scr_p, S_DOIN, BT, D, SW, BT))
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            if LQ:
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
                W1b = W1b * tl.load(scalar_ptr(scr_p, C_S01, BT, SW, E))
            Z = tl.dot(Kl, tl.trans(W2b), input_precision=DOT_PRECISION)
            dZt = tl.load(region_ptrs(scr_p, R_DZ, hh, BT, SW, E)) + tl.dot(dOin, W1b, input_precision=DOT_PRECISION) * gelu_d(Z)
            if LQ:   # d(W_0), mapped to d(X_0) by chunk_lq's dw0 phase
                w0 = w0_offset(D, E)
                tl.store(dw1 + w0 + o1, tl.load(dw1 + w0 + o1) + tl.dot(tl.trans(dOin), gelu(Z), input_precision=DOT_PRECISION))
                o2t = hh[None, :] * D + od[:, None]
                tl.store(dw2 + w0 + o2t, tl.dot(tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), dZt, input_precision=DOT_PRECISION))
            else:
                tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + tl.dot(tl.trans(dOin), gelu(Z), input_precision=DOT_PRECISION))
                o2t = hh[None, :] * D + od[:, None]
                tl.store(dst2 + b_in + o2t, tl.load(dst2 + b_in + o2t) + tl.dot(tl.load(slot_ptrs_t(scr_p, S_KT, D, SW, BT)), dZt, input_precision=DOT_PRECISION))
            # dz_i parked (region R_A is free after state_dk) for the dk loop below
            tl.store(region_ptrs(scr_p, R_A, hh, BT, SW, E), dZt)
        # dk = (dk so far) + sum_blocks dz W2 in a second loop, after a CTA barrier (the parked dz
        # tiles are read by other threads): with the [BT, D] dk accumulator live in the loop above
        # ptxas spilled 532-4820 bytes at D = 128, C = 64 (sm_80 and sm_90)
        tl.debug_barrier()
        dK = tl.load(slot_ptrs(scr_p, S_DQ, BT, D, SW, BT))
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            W2b = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])
            if LQ:
                W2b = W2b * tl.load(scalar_ptr(scr_p, C_S02, BT, SW, E))
            dK += tl.dot(tl.load(region_ptrs(scr_p, R_A, hh, BT, SW, E)), W2b, input_precision=DOT_PRECISION)
        tl.store(dk + tb + token_offsets(H, D, BT), dK, mask=tm[:, None])


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_gates_m_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Momentum only, backward B6m: the dA = d(Gam) eta B^T + db exp(M)^T part of the gate
    gradients, reduced to row/column sums of dA * Dm, and d(eta) through E = Dm Bm."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        rows = tl.arange(0, BT)
        causal = rows[:, None] >= rows[None, :]
        la_c, et_c, dl_c, lm_c = load_gates(la, eta, dlt, lmu, go, tm)
        L = tl.cumsum(la_c, axis=0)
        Dm = tl.where(causal, tl.exp(tl.where(causal, L[:, None] - L[None, :], 0.0)), 0.0)
        M = tl.cumsum(lm_c, axis=0)
        Bm = tl.where(causal, tl.exp(tl.where(causal, M[:, None] - M[None, :], 0.0)), 0.0)
        dGam = tl.load(slot_ptrs(scr_p, S_DGAM, BT, BT, SW, BT))
        tl.store(vector_ptrs(scr_p, V_DETA, BT, SW, E), tl.sum(dGam * tl.dot(Dm, Bm, input_precision=DOT_PRECISION), axis=0))
        dA = tl.dot(dGam * et_c[None, :], tl.trans(Bm), input_precision=DOT_PRECISION) \
            + tl.load(vector_ptrs(scr_p, V_DB, BT, SW, E))[:, None] * tl.exp(M)[None, :]
        GA = dA * Dm
        tl.store(vector_ptrs(scr_p, V_GAR, BT, SW, E), tl.sum(GA, axis=1))
        tl.store(vector_ptrs(scr_p, V_GAC, BT, SW, E), tl.sum(GA, axis=0))


@triton.jit(do_not_specialize=["step"])
def mlp_bwd_gates_kernel(
    q, k, v, la, eta, dlt, lmu, y, dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, p, step,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr, REV: tl.constexpr, LQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward B6: gate gradients through L = cumsum log alpha, M = cumsum log mu and eta."""
    valid, tm, tb, go, b_in, b_out, so = chunk_prologue(cu, coff, step, H, D, E, BT, SW, REV)
    if valid:
        scr_p = scr + so
        rows = tl.arange(0, BT)
        causal = rows[:, None] >= rows[None, :]
        la_c, et_c, dl_c, lm_c = load_gates(la, eta, dlt, lmu, go, tm)
        L = tl.cumsum(la_c, axis=0)
        Ltot = tl.sum(la_c, axis=0)
        cvec = tl.exp(L)
        cC = tl.exp(Ltot)
        Dm = tl.where(causal, tl.exp(tl.where(causal, L[:, None] - L[None, :], 0.0)), 0.0)
        dGam = tl.load(slot_ptrs(scr_p, S_DGAM, BT, BT, SW, BT))
        dgam = tl.load(vector_ptrs(scr_p, V_DGAM, BT, SW, E))
        dc = tl.load(vector_ptrs(scr_p, V_DC, BT, SW, E))
        dcC = tl.load(scalar_ptr(scr_p, C_DCC, BT, SW, E))
        wend = tl.where(tm, tl.exp(Ltot - L), 0.0)
        if MOMENTUM:
            # Gam = eta_i E_ti, E = A B (A_ts = exp(L_t-L_s), B_si = exp(M_s-M_i));
            # gam_i = eta_i sum_s wend_s B_si ; b_t = sum_s A_ts exp(M_s) ; bC = sum_s wend_s exp(M_s)
            # (the dA part was reduced by the gates_m phase)
            db = tl.load(vector_ptrs(scr_p, V_DB, BT, SW, E))
            dpi = tl.load(vector_ptrs(scr_p, V_DPI, BT, SW, E))
            dbC = tl.load(scalar_ptr(scr_p, C_DBC, BT, SW, E))
            dPC = tl.load(scalar_ptr(scr_p, C_DPC, BT, SW, E))
            M = tl.cumsum(lm_c, axis=0)
            Mtot = tl.sum(lm_c, axis=0)
            Bm = tl.where(causal, tl.exp(tl.where(causal, M[:, None] - M[None, :], 0.0)), 0.0)
            eM = tl.exp(M)
            pi = et_c * tl.exp(Mtot - M)
            PC = tl.exp(Mtot)
            dB = tl.dot(tl.trans(Dm), dGam * et_c[None, :], input_precision=DOT_PRECISION)
            dgw = dgam * et_c
            deta_c = tl.load(vector_ptrs(scr_p, V_DETA, BT, SW, E)) + dgam * tl.sum(wend[:, None] * Bm, axis=0) + dpi * tl.exp(Mtot - M)
            dB += wend[:, None] * dgw[None, :]
            dwend = tl.sum(Bm * dgw[None, :], axis=1) + dbC * eM
            GB = dB * Bm
            dL = tl.load(vector_ptrs(scr_p, V_GAR, BT, SW, E)) - tl.load(vector_ptrs(scr_p, V_GAC, BT, SW, E)) + dc * cvec
            dM = tl.sum(GB, axis=1) - tl.sum(GB, axis=0)
            Hw = dwend * wend                     # wend_s = exp(Ltot - L_s)
            dLC = tl.sum(Hw, axis=0) + dcC * cC
            dL -= Hw
            dM += dbC * wend * eM + tl.sum(Dm * db[:, None], axis=0) * eM
            Hp = dpi * pi                         # pi_i = eta_i exp(Mtot - M_i); PC = exp(Mtot)
            dMC = tl.sum(Hp, axis=0) + dPC * PC
            dM -= Hp
            dlm_c = tl.sum(dM, axis=0) - tl.cumsum(dM, axis=0) + dM + dMC
            tl.store(dlmu + go, dlm_c, mask=tm)
        else:
            G = dGam * Dm * et_c[None, :]                  # dGam * Gam
            gam = et_c * wend
            deta_c = tl.sum(dGam * Dm, axis=0) + dgam * wend
            dL = tl.sum(G, axis=1) - tl.sum(G, axis=0) + dc * cvec
            Hg = dgam * gam
            dLC = tl.sum(Hg, axis=0) + dcC * cC
            dL -= Hg
        dla_c = tl.sum(dL, axis=0) - tl.cumsum(dL, axis=0) + dL + dLC
        tl.store(dla + go, dla_c, mask=tm)
        tl.store(deta + go, deta_c, mask=tm)


FWD_KERNELS = (("mlp_fwd_prep", mlp_prep_kernel), ("mlp_fwd_prep2", mlp_prep2_kernel),
               ("mlp_fwd_coef", mlp_coef_kernel), ("mlp_fwd_qw", mlp_qw_kernel), ("mlp_fwd_hidden", mlp_fwd_hidden_kernel),
               ("mlp_fwd_state", mlp_fwd_state_kernel), ("mlp_fwd_gram", mlp_fwd_gram_kernel),
               ("mlp_fwd_out", mlp_fwd_out_kernel))
BWD_KERNELS = (("mlp_bwd_prep", mlp_prep_kernel), ("mlp_bwd_prep2", mlp_prep2_kernel),
               ("mlp_bwd_coef", mlp_coef_kernel), ("mlp_bwd_qw", mlp_qw_kernel), ("mlp_bwd_read", mlp_bwd_read_kernel),
               ("mlp_bwd_read2", mlp_bwd_read2_kernel),
               ("mlp_bwd_readout", mlp_bwd_readout_kernel), ("mlp_bwd_readout2", mlp_bwd_readout2_kernel),
               ("mlp_bwd_readgrad", mlp_bwd_readgrad_kernel), ("mlp_bwd_readgrad2", mlp_bwd_readgrad2_kernel),
               ("mlp_bwd_readdst", mlp_bwd_readdst_kernel), ("mlp_bwd_state_mom", mlp_bwd_state_mom_kernel),
               ("mlp_bwd_state", mlp_bwd_state_kernel), ("mlp_bwd_state_do", mlp_bwd_state_do_kernel),
               ("mlp_bwd_state_dk", mlp_bwd_state_dk_kernel), ("mlp_bwd_dq", mlp_bwd_dq_kernel), ("mlp_bwd_dkm", mlp_bwd_dkm_kernel),
               ("mlp_bwd_dgam", mlp_bwd_dgam_kernel), ("mlp_bwd_mid", mlp_bwd_mid_kernel),
               ("mlp_bwd_first", mlp_bwd_first_kernel), ("mlp_bwd_gates_m", mlp_bwd_gates_m_kernel),
               ("mlp_bwd_gates", mlp_bwd_gates_kernel))
# phases that only run (and are only compiled) for learner='momentum'
MOMENTUM_ONLY = ("mlp_bwd_state_mom", "mlp_bwd_gates_m")
# phases whose code depends on the bias (the others are compiled once per learner)
BIAS_KERNELS = ("mlp_fwd_prep2", "mlp_bwd_prep2", "mlp_bwd_mid")


def insert_phases(base, inserts):
    """Insert ``(name, kernel)`` pairs after the named phases (``None``: at the front)."""
    out = [p for after, p in inserts if after is None]
    for name, kern in base:
        out.append((name, kern))
        out += [p for after, p in inserts if after == name]
    return tuple(out)
