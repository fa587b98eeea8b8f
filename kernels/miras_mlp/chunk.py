"""Triton chunk-parallel kernels for the deep (2-layer residual MLP) Miras memory.

Memory (per head, project rule in ``../shared/miras-notes.md``):
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

Kernels (one program per (sequence, head); chunks are walked in order because the gradients of a
chunk depend non-linearly on its start state):

* ``_mlp_fwd_kernel`` writes ``y`` and every chunk-end state into the per-chunk state buffer (the
  only saved activation besides the inputs: no per-token weights anywhere).
* ``_mlp_bwd_kernel`` walks the chunks backwards, recomputes each chunk from its saved start
  state and back-propagates through the read, the inner gradient (a second-order path through LN
  and gelu) and the state update, carrying d(state) chunk to chunk.

The hidden dimension ``E`` is tiled by ``BH`` so a ``D=128, E=512`` weight never sits in
registers whole. Register discipline (no spills on sm_80/sm_90): only accumulators and ``[BT]``
vectors stay live across a hidden-block loop; the ``[BT, D]`` / ``[BT, BT]`` tiles a loop needs
(q, k, do, the masked Gram matrices) are staged in a small per-program fp32 scratch in global
memory (L2 resident) and re-read inside the loop (``tl.range(..., disable_licm=True)`` keeps the
compiler from hoisting them back into registers). The backward also stages one ``[BT, E]`` partial
gradient that needs the whole-row LN backward before it can be finished.
"""

from __future__ import annotations

import triton
import triton.language as tl

# bias codes (constexpr BIAS)
BIAS_CODES = {"dot": 0, "l2": 1, "lp": 2, "huber": 3}

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_d(z):
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def _gelu_dd(z):
    # d2/dz2 [z Phi(z)] = phi(z) (2 - z^2)
    return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)


@triton.jit
def _bias_grad(e, v, dlt, p, BIAS: tl.constexpr):
    """u = dl/dM for the attentional bias; e = M(k) - v, rows = tokens. [BT, D]."""
    if BIAS == 0:
        u = -v
    elif BIAS == 1:
        u = e
    elif BIAS == 2:
        u = p * e * tl.exp((p - 2.0) * 0.5 * tl.log(e * e + 1e-6))
    else:
        nrm = tl.sqrt(tl.sum(e * e, axis=1))
        big = nrm > dlt
        u = tl.where(big[:, None], dlt[:, None] * e / tl.sqrt(e * e + 1e-6), e)
    return u


@triton.jit
def _ln_rows(x, D: tl.constexpr):
    """Plain layer norm of each row: returns (xhat, rstd)."""
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + 1e-5)
    return xc * rstd[:, None], rstd


@triton.jit
def _ln_bwd(xh, rstd, g, D: tl.constexpr):
    """VJP of xhat = LN(x) for cotangent g (rows)."""
    mg = tl.sum(g, axis=1) / D
    mgx = tl.sum(g * xh, axis=1) / D
    return rstd[:, None] * (g - mg[:, None] - xh * mgx[:, None])


@triton.jit
def _chunk_coefs(la_c, lm_c, et_c, tm, BT: tl.constexpr, MOMENTUM: tl.constexpr):
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
        Em = tl.dot(Dm, Bm)
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


@triton.jit
def _tok_off(H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """int32 offsets of a [BT, D] token tile from the chunk's base pointer (rematerialised at
    every use: a live [BT, D] int64 offset tile would cost two registers per element)."""
    return tl.arange(0, BT)[:, None] * (H * D) + tl.arange(0, D)[None, :]


@triton.jit
def _ld_tok(base, tm, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """A [BT, D] token tile (masked rows -> 0), upcast to fp32."""
    return tl.load(base + _tok_off(H, D, BT), mask=tm[:, None], other=0.0).to(tl.float32)


@triton.jit
def _sl(scr_p, SLOT: tl.constexpr, R: tl.constexpr, Cc: tl.constexpr, SW: tl.constexpr, BT: tl.constexpr):
    """Pointers of an [R, Cc] tile in scratch slot SLOT (slots are [BT, SW])."""
    return scr_p + SLOT * BT * SW + tl.arange(0, R)[:, None] * SW + tl.arange(0, Cc)[None, :]


@triton.jit
def _scr_off(R: tl.constexpr, Cc: tl.constexpr, SW: tl.constexpr):
    """Offsets of an [R, Cc] tile inside a scratch slot of row width SW."""
    return tl.arange(0, R)[:, None] * SW + tl.arange(0, Cc)[None, :]


@triton.jit
def _load_gates(la, eta, dlt, lmu, go, tm):
    la_c = tl.load(la + go, mask=tm, other=0.0)
    et_c = tl.load(eta + go, mask=tm, other=0.0)
    dl_c = tl.load(dlt + go, mask=tm, other=1.0)
    lm_c = tl.load(lmu + go, mask=tm, other=0.0)
    return la_c, et_c, dl_c, lm_c


@triton.jit
def _mlp_fwd_kernel(
    q, k, v, la, eta, dlt, lmu,           # [Ntok, H, D] x3, [Ntok, H] x4 (fp32)
    y,                                    # [Ntok, H, D]
    st1, st2, ss1, ss2,                   # chunk states [J, H, D, E], [J, H, E, D] (+ momentum)
    scr,                                  # [N*H, 2, BT, SW] fp32 staging tiles
    cu, coff,                             # int32 [N+1] token offsets, [N+1] chunk offsets
    p,                                    # lp exponent (fp32)
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr,
):
    # Register budget: only accumulators stay live across a hidden-block loop; q/k and the staged
    # do / A2 tiles are re-read inside it (L1/L2 hits) instead of being held in registers.
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    j0 = tl.load(coff + n) + n
    NTn = tl.cdiv(eos - bos, BT)

    rows = tl.arange(0, BT)
    od = tl.arange(0, D)
    oh = tl.arange(0, BH)
    scr_p = scr + i_nh.to(tl.int64) * (2 * BT * SW + 4 * BT)
    # slots: 0 do [BT, D], 1 A2 [BT, BT], then the [BT] vectors c, gam, b, pi
    for c in tl.range(0, NTn, disable_licm=True):
        t = bos + c * BT + rows
        tm = t < eos
        t64 = t.to(tl.int64)
        tb = (bos + c * BT).to(tl.int64) * (H * D) + h * D
        go = t64 * H + h
        j = (j0 + c).to(tl.int64)
        b_in = (j * H + h) * (D * E)
        b_out = ((j + 1) * H + h) * (D * E)

        # pass 1: inner forward at W_0 on the keys -> o = W1 gelu(W2 k)
        K = _ld_tok(k + tb, tm, H, D, BT)
        O = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            W2b = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])          # [BH, D]
            W1b = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])          # [D, BH]
            O += tl.dot(_gelu(tl.dot(K, tl.trans(W2b))), tl.trans(W1b))
        xh, rstd = _ln_rows(O, D)
        la_c, et_c, dl_c, lm_c = _load_gates(la, eta, dlt, lmu, go, tm)
        V = _ld_tok(v + tb, tm, H, D, BT)
        U = _bias_grad(K + xh - V, V, dl_c, p, BIAS)
        cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC = _chunk_coefs(la_c, lm_c, et_c, tm, BT, MOMENTUM)
        tl.store(_sl(scr_p, 0, BT, D, SW, BT), _ln_bwd(xh, rstd, U, D))                                # do_i [BT, D]
        tl.store(_sl(scr_p, 1, BT, BT, SW, BT), Gam * tl.dot(_ld_tok(q + tb, tm, H, D, BT), tl.trans(K)))
        tl.store((scr_p + 2 * BT * SW + tl.arange(0, BT)), cvec)
        tl.store((scr_p + 2 * BT * SW + tl.arange(0, BT)) + BT, gam)
        tl.store((scr_p + 2 * BT * SW + tl.arange(0, BT)) + 2 * BT, bvec)
        tl.store((scr_p + 2 * BT * SW + tl.arange(0, BT)) + 3 * BT, pi)
        tl.debug_barrier()

        # pass 2: per hidden block, dz_i, the read's hidden layer, the chunk-end state
        Oq = tl.zeros([BT, D], dtype=tl.float32)
        Shh = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = _ld_tok(k + tb, tm, H, D, BT)
            Ql = _ld_tok(q + tb, tm, H, D, BT)
            Dn = tl.load(_sl(scr_p, 0, BT, D, SW, BT))
            cvec = tl.load((scr_p + 2 * BT * SW + tl.arange(0, BT)))
            gam = tl.load((scr_p + 2 * BT * SW + tl.arange(0, BT)) + BT)
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            Z = tl.dot(Kl, tl.trans(W2b))
            Hh = _gelu(Z)
            DZ = tl.dot(Dn, W1b) * _gelu_d(Z)                                   # dz_i [BT, BH]
            Zq = cvec[:, None] * tl.dot(Ql, tl.trans(W2b)) - tl.dot(tl.load(_sl(scr_p, 1, BT, BT, SW, BT)), DZ)
            W2n = cC * W2b - tl.dot(tl.trans(DZ * gam[:, None]), Kl)
            W1n = cC * W1b - tl.dot(tl.trans(Dn * gam[:, None]), Hh)
            if MOMENTUM:
                bvec = tl.load((scr_p + 2 * BT * SW + tl.arange(0, BT)) + 2 * BT)
                pi = tl.load((scr_p + 2 * BT * SW + tl.arange(0, BT)) + 3 * BT)
                S2b = tl.load(ss2 + b_in + o2)
                S1b = tl.load(ss1 + b_in + o1)
                Zq += bvec[:, None] * tl.dot(Ql, tl.trans(S2b))
                Hq = _gelu(Zq)
                Oq += bvec[:, None] * tl.dot(Hq, tl.trans(S1b))
                W2n += bC * S2b
                W1n += bC * S1b
                tl.store(ss2 + b_out + o2, PC * S2b - tl.dot(tl.trans(DZ * pi[:, None]), Kl))
                tl.store(ss1 + b_out + o1, PC * S1b - tl.dot(tl.trans(Dn * pi[:, None]), Hh))
            else:
                Hq = _gelu(Zq)
            Oq += cvec[:, None] * tl.dot(Hq, tl.trans(W1b))
            Shh += tl.dot(Hq, tl.trans(Hh))
            tl.store(st2 + b_out + o2, W2n)
            tl.store(st1 + b_out + o1, W1n)
        la_c, et_c, dl_c, lm_c = _load_gates(la, eta, dlt, lmu, go, tm)
        cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC = _chunk_coefs(la_c, lm_c, et_c, tm, BT, MOMENTUM)
        Oq -= tl.dot(Gam * Shh, tl.load(_sl(scr_p, 0, BT, D, SW, BT)))
        xq, rq = _ln_rows(Oq, D)
        tl.store(y + tb + _tok_off(H, D, BT), (_ld_tok(q + tb, tm, H, D, BT) + xq).to(y.dtype.element_ty), mask=tm[:, None])
        # the next chunk reads the state (and reuses the scratch) this program just wrote
        tl.debug_barrier()


@triton.jit
def _mlp_bwd_kernel(
    q, k, v, la, eta, dlt, lmu, dy,
    dq, dk, dv, dla, deta, ddlt, dlmu,
    st1, st2, ss1, ss2,                   # saved chunk-start states
    dst1, dst2, dss1, dss2,               # d(state) per chunk boundary (end entries pre-filled)
    scr,                                  # [N*H, 8*BT*SW + 2*BT*E] fp32 staging tiles
    cu, coff, p,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    SW: tl.constexpr, BIAS: tl.constexpr, MOMENTUM: tl.constexpr,
):
    # Same register discipline as the forward: tiles needed inside a hidden-block loop are staged
    # in this program's scratch slots and re-read there; only accumulators and [BT] vectors stay
    # live across loops.
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    j0 = tl.load(coff + n) + n
    NTn = tl.cdiv(eos - bos, BT)

    rows = tl.arange(0, BT)
    od = tl.arange(0, D)
    oh = tl.arange(0, BH)
    causal = rows[:, None] >= rows[None, :]
    scr_p = scr + i_nh.to(tl.int64) * (8 * BT * SW + 2 * BT * E)
    # slots: 0 do, 1 A2, 2 xhat, 3 u, 4 d(o'), 5 dS1, 6 dGam, 7 d(o) total; then two [BT, E]
    # regions: d/d(dz) -> d/dz (partial), d/dh
    for ci in tl.range(0, NTn, disable_licm=True):
        c = NTn - 1 - ci
        t = bos + c * BT + rows
        tm = t < eos
        t64 = t.to(tl.int64)
        tb = (bos + c * BT).to(tl.int64) * (H * D) + h * D
        go = t64 * H + h
        j = (j0 + c).to(tl.int64)
        b_in = (j * H + h) * (D * E)
        b_out = ((j + 1) * H + h) * (D * E)

        # ---- recompute the chunk's forward (pass 1 and the read)
        K = _ld_tok(k + tb, tm, H, D, BT)
        O = tl.zeros([BT, D], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            W2b = tl.load(st2 + b_in + hh[:, None] * D + od[None, :])
            W1b = tl.load(st1 + b_in + od[:, None] * E + hh[None, :])
            O += tl.dot(_gelu(tl.dot(K, tl.trans(W2b))), tl.trans(W1b))
        xh, rstd = _ln_rows(O, D)
        la_c, et_c, dl_c, lm_c = _load_gates(la, eta, dlt, lmu, go, tm)
        V = _ld_tok(v + tb, tm, H, D, BT)
        U = _bias_grad(K + xh - V, V, dl_c, p, BIAS)
        cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC = _chunk_coefs(la_c, lm_c, et_c, tm, BT, MOMENTUM)
        tl.store(_sl(scr_p, 0, BT, D, SW, BT), _ln_bwd(xh, rstd, U, D))
        tl.store(_sl(scr_p, 1, BT, BT, SW, BT), Gam * tl.dot(_ld_tok(q + tb, tm, H, D, BT), tl.trans(K)))
        tl.store(_sl(scr_p, 2, BT, D, SW, BT), xh)
        tl.store(_sl(scr_p, 3, BT, D, SW, BT), U)
        tl.debug_barrier()

        Oc = tl.zeros([BT, D], dtype=tl.float32)    # sum_blocks Hq W1^T (coefficient c_t)
        Os = tl.zeros([BT, D], dtype=tl.float32)    # sum_blocks Hq S1^T (coefficient b_t)
        Shh = tl.zeros([BT, BT], dtype=tl.float32)
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = _ld_tok(k + tb, tm, H, D, BT)
            Ql = _ld_tok(q + tb, tm, H, D, BT)
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            Z = tl.dot(Kl, tl.trans(W2b))
            DZ = tl.dot(tl.load(_sl(scr_p, 0, BT, D, SW, BT)), W1b) * _gelu_d(Z)
            Zq = cvec[:, None] * tl.dot(Ql, tl.trans(W2b)) - tl.dot(tl.load(_sl(scr_p, 1, BT, BT, SW, BT)), DZ)
            if MOMENTUM:
                S2b = tl.load(ss2 + b_in + o2)
                S1b = tl.load(ss1 + b_in + o1)
                Zq += bvec[:, None] * tl.dot(Ql, tl.trans(S2b))
                Hq = _gelu(Zq)
                Os += tl.dot(Hq, tl.trans(S1b))
            else:
                Hq = _gelu(Zq)
            Oc += tl.dot(Hq, tl.trans(W1b))
            Shh += tl.dot(Hq, tl.trans(_gelu(Z)))
        Dn = tl.load(_sl(scr_p, 0, BT, D, SW, BT))
        A1 = Gam * Shh
        Oq = cvec[:, None] * Oc - tl.dot(A1, Dn)
        if MOMENTUM:
            Oq += bvec[:, None] * Os
        xq, rq = _ln_rows(Oq, D)

        # ---- backward of the read's output layer
        dOq = _ln_bwd(xq, rq, _ld_tok(dy + tb, tm, H, D, BT), D)
        dc = tl.sum(dOq * Oc, axis=1)
        db = tl.sum(dOq * Os, axis=1)
        dA1 = -tl.dot(dOq, tl.trans(Dn))
        # d/d(do_i), parked in slot 7 until B1b (slot 7 gets d(o) total later)
        tl.store(_sl(scr_p, 7, BT, D, SW, BT), -tl.dot(tl.trans(A1), dOq))
        tl.store(_sl(scr_p, 6, BT, BT, SW, BT), dA1 * Shh)
        tl.store(_sl(scr_p, 5, BT, BT, SW, BT), dA1 * Gam)
        tl.store(_sl(scr_p, 4, BT, D, SW, BT), dOq)
        tl.debug_barrier()
        dQ = tl.zeros([BT, D], dtype=tl.float32)
        dK = tl.zeros([BT, D], dtype=tl.float32)
        dA2 = tl.zeros([BT, BT], dtype=tl.float32)
        dgam = tl.zeros([BT], dtype=tl.float32)
        dpi = tl.zeros([BT], dtype=tl.float32)
        dcC = tl.sum(dgam, axis=0)
        dbC = dcC
        dPC = dcC

        # ---- pass B1a: per hidden block, the backward of the read (Zq -> Hq -> o')
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Ql = _ld_tok(q + tb, tm, H, D, BT)
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            Z = tl.dot(_ld_tok(k + tb, tm, H, D, BT), tl.trans(W2b))
            Hh = _gelu(Z)
            DZ = tl.dot(tl.load(_sl(scr_p, 0, BT, D, SW, BT)), W1b) * _gelu_d(Z)
            QW = tl.dot(Ql, tl.trans(W2b))
            Zq = cvec[:, None] * QW - tl.dot(tl.load(_sl(scr_p, 1, BT, BT, SW, BT)), DZ)
            if MOMENTUM:
                S2b = tl.load(ss2 + b_in + o2)
                QS = tl.dot(Ql, tl.trans(S2b))
                Zq += bvec[:, None] * QS
            Hq = _gelu(Zq)
            dOql = tl.load(_sl(scr_p, 4, BT, D, SW, BT))
            dHq = cvec[:, None] * tl.dot(dOql, W1b) + tl.dot(tl.load(_sl(scr_p, 5, BT, BT, SW, BT)), Hh)
            if MOMENTUM:
                dHq += bvec[:, None] * tl.dot(dOql, tl.load(ss1 + b_in + o1))
            dZq = dHq * _gelu_d(Zq)
            dQ += cvec[:, None] * tl.dot(dZq, W2b)
            dc += tl.sum(dZq * QW, axis=1)
            dA2 -= tl.dot(dZq, tl.trans(DZ))
            tl.store(dst1 + b_in + o1, tl.dot(tl.trans(dOql * cvec[:, None]), Hq))
            tl.store(dst2 + b_in + o2, tl.dot(tl.trans(dZq * cvec[:, None]), Ql))
            if MOMENTUM:
                dQ += bvec[:, None] * tl.dot(dZq, S2b)
                db += tl.sum(dZq * QS, axis=1)
                tl.store(dss1 + b_in + o1, tl.dot(tl.trans(dOql * bvec[:, None]), Hq))
                tl.store(dss2 + b_in + o2, tl.dot(tl.trans(dZq * bvec[:, None]), Ql))
            # d/d(dz_i) and d/d(h_i) from the read, finished in B1b
            tl.store(scr_p + 8 * BT * SW + rows[:, None] * E + hh[None, :],
                     -tl.dot(tl.trans(tl.load(_sl(scr_p, 1, BT, BT, SW, BT))), dZq))
            tl.store(scr_p + 8 * BT * SW + BT * E + rows[:, None] * E + hh[None, :],
                     tl.dot(tl.trans(tl.load(_sl(scr_p, 5, BT, BT, SW, BT))), Hq))
        tl.debug_barrier()

        # ---- pass B1b: the chunk-end state's gradient and the inner-gradient chain dz = dh*gelu'(z)
        gDn = tl.load(_sl(scr_p, 7, BT, D, SW, BT))
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = _ld_tok(k + tb, tm, H, D, BT)
            Dnl = tl.load(_sl(scr_p, 0, BT, D, SW, BT))
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            dW2e = tl.load(dst2 + b_out + o2)
            dW1e = tl.load(dst1 + b_out + o1)
            Z = tl.dot(Kl, tl.trans(W2b))
            Hh = _gelu(Z)
            gz = _gelu_d(Z)
            dH = tl.dot(Dnl, W1b)
            DZ = dH * gz
            gDZ = tl.load(scr_p + 8 * BT * SW + rows[:, None] * E + hh[None, :])
            gH = tl.load(scr_p + 8 * BT * SW + BT * E + rows[:, None] * E + hh[None, :])
            # chunk-end state X' = cC X [+ bC S] - sum gam_i g_i
            KdW2 = tl.dot(Kl, tl.trans(dW2e))
            HdW1 = tl.dot(Hh, tl.trans(dW1e))
            gDZ -= gam[:, None] * KdW2
            gDn -= gam[:, None] * HdW1
            dK -= gam[:, None] * tl.dot(DZ, dW2e)
            gH -= gam[:, None] * tl.dot(Dnl, dW1e)
            dgam -= tl.sum(DZ * KdW2, axis=1) + tl.sum(Dnl * HdW1, axis=1)
            dcC += tl.sum(tl.sum(dW2e * W2b, axis=1), axis=0) + tl.sum(tl.sum(dW1e * W1b, axis=1), axis=0)
            dW1acc = tl.load(dst1 + b_in + o1) + cC * dW1e
            dW2acc = tl.load(dst2 + b_in + o2) + cC * dW2e
            if MOMENTUM:
                S2b = tl.load(ss2 + b_in + o2)
                S1b = tl.load(ss1 + b_in + o1)
                dS2e = tl.load(dss2 + b_out + o2)
                dS1e = tl.load(dss1 + b_out + o1)
                # S' = PC S - sum pi_i g_i ;  X' also holds bC S
                KdS2 = tl.dot(Kl, tl.trans(dS2e))
                HdS1 = tl.dot(Hh, tl.trans(dS1e))
                gDZ -= pi[:, None] * KdS2
                gDn -= pi[:, None] * HdS1
                dK -= pi[:, None] * tl.dot(DZ, dS2e)
                gH -= pi[:, None] * tl.dot(Dnl, dS1e)
                dpi -= tl.sum(DZ * KdS2, axis=1) + tl.sum(Dnl * HdS1, axis=1)
                dbC += tl.sum(tl.sum(dW2e * S2b, axis=1), axis=0) + tl.sum(tl.sum(dW1e * S1b, axis=1), axis=0)
                dPC += tl.sum(tl.sum(dS2e * S2b, axis=1), axis=0) + tl.sum(tl.sum(dS1e * S1b, axis=1), axis=0)
                tl.store(dss1 + b_in + o1, tl.load(dss1 + b_in + o1) + bC * dW1e + PC * dS1e)
                tl.store(dss2 + b_in + o2, tl.load(dss2 + b_in + o2) + bC * dW2e + PC * dS2e)
            # dz = dh * gelu'(z), dh = W1^T do
            gdH = gDZ * gz
            gDn += tl.dot(gdH, tl.trans(W1b))
            dW1acc += tl.dot(tl.trans(Dnl), gdH)
            # d/dz, partial (the LN-of-o part is added in B2)
            tl.store(scr_p + 8 * BT * SW + rows[:, None] * E + hh[None, :], gDZ * dH * _gelu_dd(Z) + gH * gz)
            tl.store(dst1 + b_in + o1, dW1acc)
            tl.store(dst2 + b_in + o2, dW2acc)

        # ---- A2 = Gam * (Q K^T): its gradient completes dQ
        la_c, et_c, dl_c, lm_c = _load_gates(la, eta, dlt, lmu, go, tm)
        cvec, cC, Dm, Gam, gam, bvec, bC, pi, PC = _chunk_coefs(la_c, lm_c, et_c, tm, BT, MOMENTUM)
        Q = _ld_tok(q + tb, tm, H, D, BT)
        K = _ld_tok(k + tb, tm, H, D, BT)
        dS2 = dA2 * Gam
        dQ += tl.dot(dS2, K) + _ld_tok(dy + tb, tm, H, D, BT)
        tl.store(dq + tb + _tok_off(H, D, BT), dQ, mask=tm[:, None])
        dK += tl.dot(tl.trans(dS2), Q)
        dGam = tl.load(_sl(scr_p, 6, BT, BT, SW, BT)) + dA2 * tl.dot(Q, tl.trans(K))

        # ---- through do = LN_bwd(o, u) (second order), the bias, and LN(o) itself
        xh = tl.load(_sl(scr_p, 2, BT, D, SW, BT))
        U = tl.load(_sl(scr_p, 3, BT, D, SW, BT))
        dU = _ln_bwd(xh, rstd, gDn, D)
        P = tl.sum(U * xh, axis=1) / D
        mgx = tl.sum(gDn * xh, axis=1) / D
        gx = -rstd[:, None] * (P[:, None] * gDn + mgx[:, None] * U)
        gr = tl.sum(gDn * tl.load(_sl(scr_p, 0, BT, D, SW, BT)), axis=1) / rstd
        dd_c = tl.zeros([BT], dtype=tl.float32)
        if BIAS == 0:
            dV = -dU
        else:
            Ein = K + xh - _ld_tok(v + tb, tm, H, D, BT)
            if BIAS == 1:
                dE = dU
            elif BIAS == 2:
                e2 = Ein * Ein + 1e-6
                dE = dU * p * tl.exp((p - 4.0) * 0.5 * tl.log(e2)) * ((p - 1.0) * Ein * Ein + 1e-6)
            else:
                e2 = Ein * Ein + 1e-6
                big = tl.sqrt(tl.sum(Ein * Ein, axis=1)) > dl_c
                inv = 1.0 / tl.sqrt(e2)
                dE = tl.where(big[:, None], dU * dl_c[:, None] * 1e-6 * inv / e2, dU)
                dd_c = tl.where(big, tl.sum(dU * Ein * inv, axis=1), 0.0)
            dK += dE
            dV = -dE
            gx += dE
        tl.store(dv + tb + _tok_off(H, D, BT), dV, mask=tm[:, None])
        tl.debug_barrier()
        tl.store(_sl(scr_p, 6, BT, BT, SW, BT), dGam)
        tl.store(_sl(scr_p, 7, BT, D, SW, BT), _ln_bwd(xh, rstd, gx, D) - (gr * rstd * rstd / D)[:, None] * xh)
        tl.debug_barrier()

        # ---- pass B2: finish d/dz and the first-layer weight gradients
        for jb in tl.range(0, E, BH, disable_licm=True):
            hh = jb + oh
            o2 = hh[:, None] * D + od[None, :]
            o1 = od[:, None] * E + hh[None, :]
            Kl = _ld_tok(k + tb, tm, H, D, BT)
            dOin = tl.load(_sl(scr_p, 7, BT, D, SW, BT))
            W2b = tl.load(st2 + b_in + o2)
            W1b = tl.load(st1 + b_in + o1)
            Z = tl.dot(Kl, tl.trans(W2b))
            dZt = tl.load(scr_p + 8 * BT * SW + rows[:, None] * E + hh[None, :]) + tl.dot(dOin, W1b) * _gelu_d(Z)
            tl.store(dst1 + b_in + o1, tl.load(dst1 + b_in + o1) + tl.dot(tl.trans(dOin), _gelu(Z)))
            tl.store(dst2 + b_in + o2, tl.load(dst2 + b_in + o2) + tl.dot(tl.trans(dZt), Kl))
            dK += tl.dot(dZt, W2b)
        tl.store(dk + tb + _tok_off(H, D, BT), dK, mask=tm[:, None])

        # ---- gate gradients (through L = cumsum log alpha and M = cumsum log mu)
        dGam = tl.load(_sl(scr_p, 6, BT, BT, SW, BT))
        wend = tl.where(tm, tl.exp(tl.sum(la_c, axis=0) - tl.cumsum(la_c, axis=0)), 0.0)
        if MOMENTUM:
            # Gam = eta_i E_ti, E = A B (A_ts = exp(L_t-L_s), B_si = exp(M_s-M_i));
            # gam_i = eta_i sum_s wend_s B_si ; b_t = sum_s A_ts exp(M_s) ; bC = sum_s wend_s exp(M_s)
            M = tl.cumsum(lm_c, axis=0)
            Mtot = tl.sum(lm_c, axis=0)
            Bm = tl.where(causal, tl.exp(tl.where(causal, M[:, None] - M[None, :], 0.0)), 0.0)
            eM = tl.exp(M)
            dEm = dGam * et_c[None, :]
            deta_c = tl.sum(dGam * tl.dot(Dm, Bm), axis=0)
            dA = tl.dot(dEm, tl.trans(Bm)) + db[:, None] * eM[None, :]
            dB = tl.dot(tl.trans(Dm), dEm)
            dgw = dgam * et_c
            deta_c += dgam * tl.sum(wend[:, None] * Bm, axis=0) + dpi * tl.exp(Mtot - M)
            dB += wend[:, None] * dgw[None, :]
            dwend = tl.sum(Bm * dgw[None, :], axis=1) + dbC * eM
            GA = dA * Dm
            GB = dB * Bm
            dL = tl.sum(GA, axis=1) - tl.sum(GA, axis=0) + dc * cvec
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
            G = dGam * Gam
            deta_c = tl.sum(dGam * Dm, axis=0) + dgam * wend
            dL = tl.sum(G, axis=1) - tl.sum(G, axis=0) + dc * cvec
            Hg = dgam * gam
            dLC = tl.sum(Hg, axis=0) + dcC * cC
            dL -= Hg
        dla_c = tl.sum(dL, axis=0) - tl.cumsum(dL, axis=0) + dL + dLC
        tl.store(dla + go, dla_c, mask=tm)
        tl.store(deta + go, deta_c, mask=tm)
        tl.store(ddlt + go, dd_c, mask=tm)
        # the previous chunk reads the d(state) this chunk just wrote (and reuses the scratch)
        tl.debug_barrier()
