"""``@triton.jit`` helpers used inside the Miras kernels (all math in fp32).

Why a helper for ``tl.dot``: the Triton interpreter silently returns garbage for bf16 ``tl.dot``
operands, and a GPU build rejects dot dimensions below 16. Every kernel calls :func:`dot32`
instead of ``tl.dot``; it upcasts both operands to fp32 (on a GPU fp32 dots run as TF32).
``tests/test_kernels_linear.py`` checks that no kernel source calls ``tl.dot`` directly and that
every ``tt.dot`` in the compiled TTIR has fp32 operands and dims >= 16.

Bias codes (``BIAS`` constexpr): 0 dot, 1 l2, 2 lp, 3 huber (``miras_kernels.common.codes``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot32(a, b, DOT_PRECISION: tl.constexpr = None):
    """``a @ b`` with both tiles upcast to fp32 (see module docstring). ``DOT_PRECISION``: the
    fp32 dot precision, ``"tf32"`` or ``"ieee"`` (``miras_kernels.common.precision``); None is
    Triton's default (TF32 on sm_80/sm_90)."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)


@triton.jit
def chunk_cumsum(x, BT: tl.constexpr, z=0):
    """Inclusive cumulative sum of a ``[BT]`` tile along the chunk.

    A masked ``[BT, BT]`` reduction rather than ``tl.cumsum``: BT <= 64, so it is cheap, and it
    has identical semantics in the interpreter and on every GPU backend. ``z`` is a runtime zero
    (see :func:`loop_zero`).
    """
    o = z + tl.arange(0, BT)
    return tl.sum(tl.where(o[:, None] >= o[None, :], x[None, :], 0.0), axis=1)


@triton.jit
def chunk_rev_cumsum(x, BT: tl.constexpr, z=0):
    """Reverse inclusive cumulative sum ``out[t] = sum_{s >= t} x[s]`` of a ``[BT]`` tile (the
    adjoint of :func:`chunk_cumsum`)."""
    o = z + tl.arange(0, BT)
    return tl.sum(tl.where(o[None, :] >= o[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def decay_matrix(cum, BT: tl.constexpr, z=0):
    """``D[t, i] = exp(cum[t] - cum[i])`` for ``i <= t`` else 0 (``cum`` = cumulative log gate,
    non-increasing, so every kept exponent is <= 0 and cannot overflow)."""
    o = z + tl.arange(0, BT)
    return tl.where(o[:, None] >= o[None, :], tl.exp(cum[:, None] - cum[None, :]), 0.0)


@triton.jit
def loop_zero(seq_len, t0):
    """A zero the compiler cannot prove is zero (``t0 < seq_len`` inside a chunk loop).

    Index and mask tiles built from ``tl.arange`` alone are loop-invariant, so the compiler
    hoists them out of the chunk loop and keeps every one of them live in registers for the
    whole loop (measured: the main cause of spills). Adding this loop-variant zero to the
    aranges keeps them inside the loop body, where they die right after use.
    """
    return tl.minimum(seq_len - t0, 0)


@triton.jit
def pick(x, idx, BT: tl.constexpr):
    """``x[idx]`` of a ``[BT]`` tile as a scalar (``idx`` may be a runtime value)."""
    o = tl.arange(0, BT)
    return tl.sum(tl.where(o == idx, x, 0.0), axis=0)


@triton.jit
def pick_row(x, idx, BT: tl.constexpr):
    """Row ``idx`` of a ``[BT, N]`` tile as a ``[N]`` tile."""
    o = tl.arange(0, BT)
    return tl.sum(tl.where((o == idx)[:, None], x, 0.0), axis=0)


@triton.jit
def bias_map(e, v, delta, p, BIAS: tl.constexpr, EPS: tl.constexpr):
    """``u = dl/dM`` per token from the residual ``e = W k - v`` (``[BT, BV]``) when the tile
    holds the whole value row: huber's row norm ``||e||_2`` is reduced here, then
    :func:`bias_map_n` applies the rule (dot ``-v``; l2 ``e``; lp ``p e (e^2+eps)^((p-2)/2)``;
    huber ``e`` where ``||e||_2 <= delta`` else ``delta e (e^2+eps)^(-1/2)``)."""
    nrm = tl.sqrt(tl.sum(e * e, axis=1))
    return bias_map_n(e, v, nrm, delta, p, BIAS, EPS)


@triton.jit
def bias_map_n(e, v, nrm, delta, p, BIAS: tl.constexpr, EPS: tl.constexpr):
    """:func:`bias_map` for a value *block* of the residual: huber takes the row norm
    ``nrm = ||e||_2`` over the whole dv (``[BT]``, reduced over every value block beforehand)
    instead of reducing the tile, so dv may be split into blocks."""
    if BIAS == 0:
        u = -v
    elif BIAS == 1:
        u = e
    elif BIAS == 2:
        s = e * e + EPS
        u = p * e * tl.exp((p - 2.0) * 0.5 * tl.log(s))
    else:
        s = e * e + EPS
        u = tl.where((nrm <= delta)[:, None], e, delta[:, None] * e * tl.rsqrt(s))
    return u


@triton.jit
def bias_map_grad_n(e, nrm, du, delta, p, BIAS: tl.constexpr, EPS: tl.constexpr):
    """Adjoint of :func:`bias_map_n` for l2/lp/huber, with the precomputed huber row norm ``nrm``
    (the branch test is piecewise constant, so only the taken branch is differentiated);
    ``ddelta`` (``[BT]``) is this block's partial sum (the caller adds the blocks)."""
    if BIAS == 1:
        de = du
        dd = tl.sum(du * 0.0, axis=1)
    elif BIAS == 2:
        s = e * e + EPS
        de = du * p * tl.exp((p - 4.0) * 0.5 * tl.log(s)) * ((p - 1.0) * e * e + EPS)
        dd = tl.sum(du * 0.0, axis=1)
    else:
        small = nrm <= delta
        s = e * e + EPS
        r = tl.rsqrt(s)
        de = tl.where(small[:, None], du, du * delta[:, None] * EPS * r * r * r)
        dd = tl.where(small, 0.0, tl.sum(du * e * r, axis=1))
    return de, dd
