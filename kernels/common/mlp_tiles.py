"""``@triton.jit`` maths of the MLP memory ``M(x) = x + LN(W1 gelu(W2 x))`` (``docs/semantics.md``),
shared by the MLP family's chunk kernels (``miras_mlp/chunk*_kernels.py``) and its decoding
kernel (``miras_mlp/fused_recurrent.py``): the exact erf gelu and its derivatives, the
attentional-bias map ``u = dl/dM``, the affine-free layer norm and its VJP, the lq retention's
q-norm pieces and the kl retention's online-softmax steps. All math in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def gelu_d(z):
    # d/dz [z Phi(z)] = Phi(z) + z phi(z)
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327


@triton.jit
def gelu_dd(z):
    # d2/dz2 [z Phi(z)] = phi(z) (2 - z^2)
    return tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)


@triton.jit
def bias_grad(e, v, dlt, p, BIAS: tl.constexpr):
    """u = dl/dM for the attentional bias; e = M(k) - v, rows = tokens. [BT, D].

    ``p`` is the bias's scalar: the exponent for lp, the smooth-sign eps ``huber_eps`` for huber
    (the host passes ``bias_scalar(spec)``)."""
    if BIAS == 0:
        u = -v
    elif BIAS == 1:
        u = e
    elif BIAS == 2:
        u = p * e * tl.exp((p - 2.0) * 0.5 * tl.log(e * e + 1e-6))
    else:
        nrm = tl.sqrt(tl.sum(e * e, axis=1))
        big = nrm > dlt
        u = tl.where(big[:, None], dlt[:, None] * e / tl.sqrt(e * e + p), e)
    return u


@triton.jit
def ln_rows(x, D: tl.constexpr):
    """Plain layer norm of each row: returns (xhat, rstd)."""
    mean = tl.sum(x, axis=1) / D
    xc = x - mean[:, None]
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + 1e-5)
    return xc * rstd[:, None], rstd


@triton.jit
def ln_bwd(xh, rstd, g, D: tl.constexpr):
    """VJP of xhat = LN(x) for cotangent g (rows)."""
    mg = tl.sum(g, axis=1) / D
    mgx = tl.sum(g * xh, axis=1) / D
    return rstd[:, None] * (g - mg[:, None] - xh * mgx[:, None])


@triton.jit
def absq2(x, LQQ: tl.constexpr):
    """|x|^(q-2) elementwise (q = 4: x*x; 0 where x = 0 for other q)."""
    if LQQ == 4.0:
        return x * x
    else:
        ax = tl.abs(x)
        return tl.where(ax > 0, tl.exp2((LQQ - 2.0) * tl.log2(tl.where(ax > 0, ax, 1.0))), 0.0)


@triton.jit
def qroot(ssum, LQQ: tl.constexpr):
    """||X||_q from sum |X|^q (>= 0)."""
    if LQQ == 4.0:
        return tl.sqrt(tl.sqrt(ssum))
    else:
        return tl.where(ssum > 0, tl.exp2(tl.log2(tl.where(ssum > 0, ssum, 1.0)) / LQQ), 0.0)


@triton.jit
def lq_scale(n, lqe, LQQ: tl.constexpr):
    """s = (n + eps)^(2-q)."""
    return tl.exp2((2.0 - LQQ) * tl.log2(n + lqe))


@triton.jit
def row_stats(rm, rl, Z):
    """Online row max ``rm`` [R] and row sum ``rl`` [R] of ``exp(Z - rm)``, updated with one column
    block ``Z`` [R, BH] (softmax rows that span several hidden blocks)."""
    mn = tl.maximum(rm, tl.max(Z, axis=1))
    return mn, rl * tl.exp(rm - mn) + tl.sum(tl.exp(Z - mn[:, None]), axis=1)


@triton.jit
def softmax_read_step(rm, rl, o, Z, h):
    """One column block of an online softmax read ``softmax_rows(Z) h``: row max ``rm`` [R], row
    sum ``rl`` [R] and numerator ``o = sum_j exp(Z_rj - rm) h_j`` [R], updated with the block
    ``Z`` [R, BH] and ``h`` [BH] (flash-attention style rescaling by ``exp(rm_old - rm_new)``)."""
    mn = tl.maximum(rm, tl.max(Z, axis=1))
    sc = tl.exp(rm - mn)
    P = tl.exp(Z - mn[:, None])
    return mn, rl * sc + tl.sum(P, axis=1), o * sc + tl.sum(P * h[None, :], axis=1)
