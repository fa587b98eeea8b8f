"""Triton kernels for the non-affine retentions of the linear memory: ``lq`` (Moneta's l_q
normalisation) and ``kl`` (Memora's row softmax). Semantics: ``docs/semantics.md`` (the
lq/kl retentions, chunk semantics) and ``kernels/pytorch/chunked.py`` (the PyTorch reference of the same chunking).

The free variable ``X`` (the state the kernels carry) follows the same affine chunk recurrence as
for ``decay`` (``chunk_kernels.py``); only the *weights* differ: ``W = s(X) X`` with one scalar
``s(X) = (||X||_q + eps)^(2-q)`` per head (lq), or ``W = c softmax_rows(X)`` (kl). Inner
gradients of a chunk are taken at ``W0 = materialize(X0)`` (the chunk-start weights), reads use
the per-token ``W_t = materialize(X_t)``. So, compared with decay, three things change:

* the residual ``E = K W0^T - V`` of the sequential state pass (``chunk_state`` with ``MAT``),
* the reads need a per-token quantity of ``X_t`` (``scan_fwd`` below): its q-norm (lq: the read is
  then ``s_t`` times the affine read of ``chunk_out``) or its row softmax (kl: the read itself),
* the backward gets a per-token state adjoint ``Gam_t = dL/dX_t`` from those reads, and the
  chunk-start adjoint goes through the Jacobian of ``materialize`` (``bwd_dstate_mat``).

**Why the backward needs no reverse token scan.** Inside a chunk ``X_t = cX_t X0 + cS_t S0 -
sum_{i<=t} A_ti u_i k_i^T`` (``A = G * eta``, the coefficient matrix of ``chunk_kernels``), affine in
every factor. So the whole effect of ``Gam_t`` is a sum over ``t`` of terms each known at ``t``:

    du_i  += -sum_{t>=i} A_ti Gam_t k_i          dk_i += -sum_{t>=i} A_ti Gam_t^T u_i
    dX0   +=  sum_t cX_t Gam_t                    dS0  +=  sum_t cS_t Gam_t
    dA_ti  = -u_i^T Gam_t k_i                     dcX_t = <Gam_t, X0>,  dcS_t = <Gam_t, S0>

``scan_bwd`` accumulates these in one *forward* sweep over the chunk's tokens (recomputing
``X_t`` from the saved chunk-start state), with no division by decay products (alpha may be ~0);
the host maps ``dA, dcX, dcS`` to the gate gradients through the chunk coefficients.

Tiles: a program owns ``BV`` value rows and the whole (padded) key width ``BKP`` of the state
(a kl row softmax needs every column; ``BKP <= 128``), so ``X_t`` lives in registers during the
token sweep.
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
    store_state_block,
    store_token_tile,
)
from miras_kernels.common.tiles import bias_map_n, chunk_rev_cumsum, dot32, pick, pick_row
from miras_kernels.miras_linear.chunk_kernels import retained_scale


@triton.jit
def _pow_abs(x, e):
    """``|x|^e`` (0 at x = 0) for ``e > 0``."""
    ax = tl.abs(x)
    return tl.where(ax > 0.0, tl.exp(e * tl.log(tl.maximum(ax, 1e-36))), 0.0)


@triton.jit
def _lq_dnorm(x, ninv, qexp):
    """``sign(x) |x / n|^(q-1)`` = ``d||X||_q / dX`` (``ninv = 1 / max(n, tiny)``; |x| <= n so no
    overflow, and 0 where the state is 0)."""
    r = _pow_abs(x * ninv, qexp - 1.0)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _ld_rows(base, i_v, K, V, BKP: tl.constexpr, BV: tl.constexpr):
    """Rows ``i_v*BV ..`` x every column of a ``[V, K]`` fp32 state (zero padded)."""
    return load_state_block(base, i_v, 0, K, V, BKP, BV)


@triton.jit
def _ld_vec(base, c0, D, BD: tl.constexpr):
    o = c0 + tl.arange(0, BD)
    return tl.load(base + o, mask=o < D, other=0.0).to(tl.float32)


@triton.jit
def _chunk_u(v, ebuf, nbuf, eta, delta, t0, seq_len, H, p, i_v, V,
             BT: tl.constexpr, BV: tl.constexpr, BIAS: tl.constexpr, EPS: tl.constexpr):
    """``U = f(E)`` of the chunk's tokens for value block ``i_v``: ``[BT, BV]`` (0 past the end)."""
    b_vv = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    if BIAS != 0:
        b_e = load_token_tile(ebuf, t0, seq_len, H * V, i_v * BV, V, BT, BV)
    else:
        b_e = b_vv
    if BIAS == 3:
        b_delta = load_gate(delta, t0, seq_len, H, BT)
        b_nrm = load_gate(nbuf, t0, seq_len, H, BT)
    else:
        b_delta = load_gate(eta, t0, seq_len, H, BT)
        b_nrm = b_delta
    return bias_map_n(b_e, b_vv, b_nrm, b_delta, p, BIAS, EPS)


@triton.jit
def _softmax_rows(x, o_k, K):
    """Row softmax numerator and denominator of ``x`` ``[BV, BKP]`` over the first ``K`` columns
    (padding columns get probability 0)."""
    z = tl.where((o_k < K)[None, :], x, float("-inf"))
    m = tl.max(z, axis=1)
    pz = tl.exp(z - m[:, None])
    return pz, tl.sum(pz, axis=1)


# ----------------------------------------------------------------------------- forward: token sweep
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_scan_fwd_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ss, ebuf, nbuf,
    out,  # kl: y [B*T, H, V] (q's dtype); lq: per-block partial sum_{rows} |X_t|^q [NV, B*T, H] fp32
    cu_seqlens, chunk_indices,
    T, H, NTOK, p, qexp, c,
    K, V,
    BT: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr, IS_VARLEN: tl.constexpr, MAT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (value block, chunk, sequence * head): runs the chunk's token recurrence on
    its ``[BV, BKP]`` rows of ``X`` (and ``S``) and writes, per token, the kl read or the lq
    partial q-norm."""
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    hs += (slot * H + i_h) * V * K
    ss += (slot * H + i_h) * V * K
    if MAT == 2:
        out += (bos * H + i_h) * V
    else:
        out += (i_v.to(tl.int64) * NTOK + bos) * H + i_h
    t0 = i_t * BT
    n_tok = tl.minimum(seq_len - t0, BT)

    b_u = _chunk_u(v, ebuf, nbuf, eta, delta, t0, seq_len, H, p, i_v, V, BT, BV, BIAS, EPS)
    b_eta = load_gate(eta, t0, seq_len, H, BT)
    if HAS_ALPHA:
        b_a = tl.exp(load_gate(la, t0, seq_len, H, BT))
    else:
        b_a = b_eta * 0.0 + 1.0
    if MOMENTUM:
        b_mu = tl.exp(load_gate(lmu, t0, seq_len, H, BT))
        b_s = _ld_rows(ss, i_v, K, V, BKP, BV)
    b_x = _ld_rows(hs, i_v, K, V, BKP, BV)
    o_k = tl.arange(0, BKP)
    o_v = i_v * BV + tl.arange(0, BV)
    for j in tl.range(0, n_tok):
        row = (t0 + j).to(tl.int64) * H
        b_k = _ld_vec(k + row * K, 0, K, BKP)
        b_upd = (-pick(b_eta, j, BT) * pick_row(b_u, j, BT))[:, None] * b_k[None, :]
        if MOMENTUM:
            b_s = pick(b_mu, j, BT) * b_s + b_upd
            b_x = pick(b_a, j, BT) * b_x + b_s
        else:
            b_x = pick(b_a, j, BT) * b_x + b_upd
        if MAT == 2:
            b_q = _ld_vec(q + row * K, 0, K, BKP)
            pz, den = _softmax_rows(b_x, o_k, K)
            b_y = c * tl.sum(pz * b_q[None, :], axis=1) / den
            tl.store(out + row * V + o_v, b_y.to(out.dtype.element_ty), mask=o_v < V)
        else:
            tl.store(out + (t0 + j) * H, tl.sum(tl.sum(_pow_abs(b_x, qexp), axis=1), axis=0))


# ----------------------------------------------------------------------------- backward: token sweep
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_scan_bwd_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ss, ebuf, nbuf,
    dy,  # kl: dy [B*T, H, V]
    gam_c, gam_n,  # lq: per-token coefficient of d s_t / d X_t and 1 / ||X_t||_q  [B*T, H] fp32
    dul,  # out: local dL/du [B*T, H, V] fp32
    dkl, dql,  # out: local dk, dq (kl) partials [NV, B*T, H, K] fp32
    hrow,  # out (momentum): H[t, i] = u_i^T Gam_t k_i, partials [NV, B*T, H, BT] fp32 (row t)
    dcx, dcs,  # out, partials [NV, B*T, H] fp32: momentum <Gam_t, X0>, <Gam_t, S0> (the host maps
               # them and H to the gates); gd: the local d log alpha and d eta themselves
    dhs, dss,  # out: local adjoint of the chunk-start state (this program's rows) [NS, H, V, K]
    cu_seqlens, chunk_indices,
    T, H, NTOK, p, qexp, c,
    K, V,
    BT: tl.constexpr, BKP: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr, IS_VARLEN: tl.constexpr, MAT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PART: tl.constexpr,
):
    """One program per (value block, chunk, sequence * head): the forward-accumulation of the
    per-token adjoints ``Gam_t`` (module docstring), in two launches that each redo the sweep
    (one accumulator set live at a time; together they spilled at dk = 128): ``PART`` 0 du, the
    ``H`` rows, dX0/dS0, dcX/dcS (and kl's dq), 1 the ``[BKP, BT]`` dk accumulator."""
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_h = i_nh % H
    i_n, i_t, bos, seq_len, slot = chunk_of(cu_seqlens, chunk_indices, i_c, i_nh // H, T, BT, IS_VARLEN)
    part = i_v.to(tl.int64) * NTOK
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    dy += (bos * H + i_h) * V
    ebuf += (bos * H + i_h) * V
    dul += (bos * H + i_h) * V
    nbuf += bos * H + i_h
    eta += bos * H + i_h
    delta += bos * H + i_h
    la += bos * H + i_h
    lmu += bos * H + i_h
    gam_c += bos * H + i_h
    gam_n += bos * H + i_h
    dkl += ((part + bos) * H + i_h) * K
    dql += ((part + bos) * H + i_h) * K
    hrow += ((part + bos) * H + i_h) * BT
    dcx += (part + bos) * H + i_h
    dcs += (part + bos) * H + i_h
    hs += (slot * H + i_h) * V * K
    ss += (slot * H + i_h) * V * K
    dhs += (slot * H + i_h) * V * K
    dss += (slot * H + i_h) * V * K
    t0 = i_t * BT
    n_tok = tl.minimum(seq_len - t0, BT)

    b_u = _chunk_u(v, ebuf, nbuf, eta, delta, t0, seq_len, H, p, i_v, V, BT, BV, BIAS, EPS)
    b_ut = tl.trans(b_u)  # [BV, BT]
    if PART == 0:
        b_kt = tl.trans(load_token_tile(k, t0, seq_len, H * K, 0, K, BT, BKP))  # [BKP, BT]
    b_eta = load_gate(eta, t0, seq_len, H, BT)
    b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
    if MOMENTUM:
        b_dl, b_g, b_c = chunk_coefficients(b_L, b_M, BT, MOMENTUM, DOT_PRECISION)
        b_A = b_g * b_eta[None, :]
    b_eL = tl.exp(b_L)
    if HAS_ALPHA:
        b_a = tl.exp(load_gate(la, t0, seq_len, H, BT))
    else:
        b_a = b_eta * 0.0 + 1.0
    if MOMENTUM:
        b_mu = tl.exp(load_gate(lmu, t0, seq_len, H, BT))
        b_s = _ld_rows(ss, i_v, K, V, BKP, BV)
        if PART == 0:
            b_ds0 = tl.zeros([BV, BKP], dtype=tl.float32)
    if MAT == 1:
        b_gc = load_gate(gam_c, t0, seq_len, H, BT)
        b_gn = load_gate(gam_n, t0, seq_len, H, BT)
    b_x = _ld_rows(hs, i_v, K, V, BKP, BV)
    if PART == 0:
        b_dx0 = tl.zeros([BV, BKP], dtype=tl.float32)
        b_du = tl.zeros([BV, BT], dtype=tl.float32)
        if not MOMENTUM:
            b_gl = tl.zeros([BT], dtype=tl.float32)  # dL/dL_m (L = in-chunk cumsum of log alpha)
            b_ge = tl.zeros([BT], dtype=tl.float32)  # dL/d eta_i
    else:
        b_dk = tl.zeros([BKP, BT], dtype=tl.float32)
    o_k = tl.arange(0, BKP)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    for j in tl.range(0, n_tok):
        row = (t0 + j).to(tl.int64) * H
        b_k = _ld_vec(k + row * K, 0, K, BKP)
        b_upd = (-pick(b_eta, j, BT) * pick_row(b_u, j, BT))[:, None] * b_k[None, :]
        if MOMENTUM:
            b_s = pick(b_mu, j, BT) * b_s + b_upd
            b_x = pick(b_a, j, BT) * b_x + b_s
        else:
            b_x = pick(b_a, j, BT) * b_x + b_upd
        if MAT == 2:
            # y_r = c sum_c P_rc q_c  =>  dL/dX_rc = dy_r P_rc (c q_c - y_r);  dq = c P^T dy
            b_q = _ld_vec(q + row * K, 0, K, BKP)
            pz, den = _softmax_rows(b_x, o_k, K)
            b_p = pz / den[:, None]
            b_y = c * tl.sum(b_p * b_q[None, :], axis=1)
            b_dyj = tl.load(dy + row * V + o_v, mask=o_v < V, other=0.0).to(tl.float32)
            b_gam = b_dyj[:, None] * b_p * (c * b_q[None, :] - b_y[:, None])
            if PART == 0:
                b_dq = c * tl.sum(b_p * b_dyj[:, None], axis=0)
                tl.store(dql + (t0 + j) * H * K + o_k, b_dq, mask=o_k < K)
        else:
            # s_t = (n_t + eps)^(2-q):  dL/dX = ds_t (2-q) (n_t+eps)^(1-q) sign(X) |X/n_t|^(q-1)
            b_gam = pick(b_gc, j, BT) * _lq_dnorm(b_x, pick(b_gn, j, BT), qexp)
        # A[j, :] (zero for i > j): gd builds the row from the gates in O(BT) per token instead of
        # keeping and picking from a [BT, BT] tile; momentum's G = D_L D_M has no such closed row
        if MOMENTUM:
            b_arow = pick_row(b_A, j, BT)
        else:
            b_drow = tl.where(o_t <= j, tl.exp(tl.minimum(pick(b_L, j, BT) - b_L, 0.0)), 0.0)
            b_arow = b_eta * b_drow
        if PART == 0:
            b_pk = dot32(b_gam, b_kt, DOT_PRECISION)  # [BV, BT]: Gam_j k_i
            b_du -= b_pk * b_arow[None, :]
            if MOMENTUM:
                tl.store(hrow + (t0 + j) * H * BT + o_t, tl.sum(b_ut * b_pk, axis=0))  # H[j, :]
                b_dx0 += pick(b_eL, j, BT) * b_gam
                tl.store(dcx + (t0 + j) * H, tl.sum(tl.sum(b_gam * _ld_rows(hs, i_v, K, V, BKP, BV), axis=1), axis=0))
                b_ds0 += pick(b_c, j, BT) * b_gam
                tl.store(dcs + (t0 + j) * H, tl.sum(tl.sum(b_gam * _ld_rows(ss, i_v, K, V, BKP, BV), axis=1), axis=0))
            else:
                b_h = tl.sum(b_ut * b_pk, axis=0)  # H[j, :]
                b_dx0 += pick(b_eL, j, BT) * b_gam
                b_dcx = tl.sum(tl.sum(b_gam * _ld_rows(hs, i_v, K, V, BKP, BV), axis=1), axis=0)
                # through A_ji = eta_i exp(L_j - L_i) (dL/dA_ji = -H_ji) and cX_j = exp(L_j)
                b_ha = b_h * b_arow
                b_gl += b_ha + tl.where(o_t == j, pick(b_eL, j, BT) * b_dcx - tl.sum(b_ha, axis=0), 0.0)
                b_ge -= b_h * b_drow
        else:
            b_dk -= dot32(tl.trans(b_gam), b_ut, DOT_PRECISION) * b_arow[None, :]
    if PART == 0:
        if not MOMENTUM:
            o_g = t0 + o_t
            tl.store(dcx + o_g * H, chunk_rev_cumsum(b_gl, BT), mask=o_g < seq_len)
            tl.store(dcs + o_g * H, b_ge, mask=o_g < seq_len)
        store_token_tile(dul, tl.trans(b_du), t0, seq_len, H * V, i_v * BV, V, BT, BV)
        store_state_block(dhs, b_dx0, i_v, 0, K, V, BKP, BV)
        if MOMENTUM:
            store_state_block(dss, b_ds0, i_v, 0, K, V, BKP, BV)
    else:
        store_token_tile(dkl, tl.trans(b_dk), t0, seq_len, H * K, 0, K, BT, BKP)


# ----------------------------------------------------------------------------- backward: state adjoints
@triton.jit(do_not_specialize=RUNTIME_INTS)
def miras_linear_chunk_bwd_dstate_mat_kernel(
    q, k, v, la, lmu, eta, delta,
    hs, ebuf, nbuf,
    dua,  # in: -(A^T dy) + local du [B*T, H, V] fp32; overwritten with dE (this kernel's scratch)
    dy, dht, dst,
    dhs, dss,  # in: local chunk-start adjoints (scan_bwd); out: adjoint of the state at every slot
    s_slot, g_slot, n_slot,  # lq: s(X0), (2-q)(n0+eps)^(1-q), 1/max(n0, tiny) per slot [NS, H] fp32
    cu_seqlens, chunk_offsets,
    T, H, p, qexp, c,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr,
    USE_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, MAT: tl.constexpr, HAS_DY: tl.constexpr,
    DOT_PRECISION: tl.constexpr, lq_eps=1e-6, RETAINED: tl.constexpr = False,
):
    """``chunk_bwd_dstate`` for lq/kl: one program per (value-block group of ``NVB``, sequence *
    head), chunks in reverse. The chunk-start adjoint is

        dX0 = exp(L_last) dX_end [+ c_last dS_end] + (affine-read term, lq) + (local, scan_bwd)
              + J^T dW0,   dW0 = dE^T K  (the inner gradients were taken at W0 = materialize(X0))

    with ``J^T dW0 = s0 dW0 + <dW0, X0> ds/dX0`` (lq: a reduction over the whole state, hence one
    program per head: ``NVB`` = every value block) or ``W0 * (dW0 - <W0, dW0>_row / c)`` (kl).

    ``RETAINED`` (lq only; ``step_at="retained"``): token i's residual was taken at ``rho_i X0``
    (``chunk_kernels.retained_scale``), so ``dX0 += sum_i rho_i dE_i^T k_i + (sum_i d rho_i/d n0
    <dE_i, K_i X0^T>) d n0 / dX0`` in place of ``J^T dW0``."""
    tl.static_assert(not (RETAINED and MAT != 1), "RETAINED: lq only (kl has no per-token scalar form)")
    NK = tl.cdiv(K, BK)
    i_vg = tl.program_id(0)
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
    hs += (slot0 * H + i_h) * V * K
    dhs += (slot0 * H + i_h) * V * K
    dss += (slot0 * H + i_h) * V * K
    s_slot += slot0 * H + i_h
    g_slot += slot0 * H + i_h
    n_slot += slot0 * H + i_h
    dht += i_nh.to(tl.int64) * V * K
    dst += i_nh.to(tl.int64) * V * K
    slot_stride = H * V * K
    fin = (slot0 * 0 + n_chunks) * slot_stride

    for jv in tl.range(0, NVB, disable_licm=True):
        init_final_adjoint(dhs, dss, dht, dst, fin, i_vg * NVB + jv, K, V, BK, BV, USE_DHT, MOMENTUM)
    tl.debug_barrier()

    for i_r in tl.range(0, n_chunks, disable_licm=True):
        i_t = n_chunks - 1 - i_r
        t0 = i_t * BT
        cur = (slot0 * 0 + i_t) * slot_stride
        nxt = cur + slot_stride
        last = tl.minimum(seq_len - t0, BT) - 1
        b_eta = load_gate(eta, t0, seq_len, H, BT)
        b_L, b_M = chunk_log_gates(la, lmu, t0, seq_len, H, BT, HAS_ALPHA, MOMENTUM)
        b_b, b_bm, eL_last, eM_last, c_last = chunk_end_coefficients(b_L, b_M, b_eta, last, BT, MOMENTUM)
        # 1) dE of every value block (staged over dua); lq: <dW0, W0> = sum_i dE_i . (E_i + v_i)
        b_dw0x = 0.0
        if RETAINED:
            b_rho, b_fl, b_fn = retained_scale(b_L, 1.0 / tl.load(n_slot + (slot0 * 0 + i_t) * H), qexp, lq_eps, True)
        if BIAS != 0:
            for jv in tl.range(0, NVB, disable_licm=True):
                i_v = i_vg * NVB + jv
                b_de, b_e = residual_adjoint(dua, k, ebuf, nbuf, delta, dhs + nxt, dss + nxt, b_b, b_bm, b_eta,
                                              t0, seq_len, H, p, i_v, K, V, BT, BK, BV, BIAS, EPS, MOMENTUM,
                                              DOT_PRECISION)
                store_token_tile(dua, b_de, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if MAT == 1:
                    b_vv = load_token_tile(v, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                    if RETAINED:
                        # sum_i (d rho_i / d n0) <dE_i, K_i X0^T> = sum_i f_n <dE_i, E_i + v_i>
                        b_dw0x += tl.sum(b_fn * tl.sum(b_de * (b_e + b_vv), axis=1), axis=0)
                    else:
                        b_dw0x += tl.sum(tl.sum(b_de * (b_e + b_vv), axis=1), axis=0)
            tl.debug_barrier()
        if MAT == 1:
            if RETAINED:
                s0 = 1.0  # rho_i is already in dE (below)
                b_coef = b_dw0x
            else:
                s0 = tl.load(s_slot + (slot0 * 0 + i_t) * H)
                # <dW0, X0> = <dW0, W0> / s0; times ds/dX0 = g0 * sign(X0) |X0 / n0|^(q-1)
                b_coef = b_dw0x / s0 * tl.load(g_slot + (slot0 * 0 + i_t) * H)
            n0inv = tl.load(n_slot + (slot0 * 0 + i_t) * H)
        if HAS_DY:
            b_ydy_scale = tl.exp(b_L)
            if MOMENTUM:
                b_cc = tl.sum(tl.where(tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :],
                                       tl.exp(b_L[:, None] - b_L[None, :]), 0.0) * tl.exp(b_M)[None, :], axis=1)
        # 2) per value block: kl row statistics of X0 and <W0, dW0>_row, then the adjoints
        for jv in tl.range(0, NVB, disable_licm=True):
            i_v = i_vg * NVB + jv
            if BIAS != 0:
                b_de = load_token_tile(dua, t0, seq_len, H * V, i_v * BV, V, BT, BV)
                if RETAINED:
                    b_de = b_de * b_rho[:, None]
            if HAS_DY:
                b_dy = load_token_tile(dy, t0, seq_len, H * V, i_v * BV, V, BT, BV)
            if MAT == 2 and BIAS != 0:
                b_m, b_l = row_softmax_stats(hs + cur, i_v, K, V, BK, BV)
                b_rd = tl.zeros([BV], dtype=tl.float32)
                for i_k in tl.range(0, NK, disable_licm=True):
                    o_k = i_k * BK + tl.arange(0, BK)
                    z = tl.where((o_k < K)[None, :], load_state_block(hs + cur, i_v, i_k, K, V, BK, BV), float("-inf"))
                    b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                    b_rd += tl.sum(tl.exp(z - b_m[:, None]) * dot32(tl.trans(b_de), b_k, DOT_PRECISION), axis=1)
                b_rd = b_rd / b_l  # <P0, dW0>_row
            for i_k in tl.range(0, NK, disable_licm=True):
                b_dwn = load_state_block(dhs + nxt, i_v, i_k, K, V, BK, BV)
                b_dwp = eL_last * b_dwn + load_state_block(dhs + cur, i_v, i_k, K, V, BK, BV)
                if HAS_DY:
                    b_q = load_token_tile(q, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                    b_dwp += dot32(tl.trans(b_ydy_scale[:, None] * b_dy), b_q, DOT_PRECISION)
                if BIAS != 0:
                    b_k = load_token_tile(k, t0, seq_len, H * K, i_k * BK, K, BT, BK)
                    b_dw0 = dot32(tl.trans(b_de), b_k, DOT_PRECISION)
                    b_x0 = load_state_block(hs + cur, i_v, i_k, K, V, BK, BV)
                    if MAT == 1:
                        b_dwp += s0 * b_dw0 + b_coef * _lq_dnorm(b_x0, n0inv, qexp)
                    else:
                        o_k = i_k * BK + tl.arange(0, BK)
                        b_p0 = tl.where((o_k < K)[None, :], tl.exp(b_x0 - b_m[:, None]), 0.0) / b_l[:, None]
                        b_dwp += c * b_p0 * (b_dw0 - b_rd[:, None])
                if MOMENTUM:
                    b_dsp = c_last * b_dwn + eM_last * load_state_block(dss + nxt, i_v, i_k, K, V, BK, BV)
                    b_dsp += load_state_block(dss + cur, i_v, i_k, K, V, BK, BV)
                    if HAS_DY:
                        b_dsp += dot32(tl.trans(b_cc[:, None] * b_dy), b_q, DOT_PRECISION)
                    store_state_block(dss + cur, b_dsp, i_v, i_k, K, V, BK, BV)
                store_state_block(dhs + cur, b_dwp, i_v, i_k, K, V, BK, BV)
        tl.debug_barrier()
