"""Token-recurrent linear-memory Miras kernel for decoding (forward only).

One program per (sequence, head) walks the tokens in order with the free variable ``X`` (and the
momentum ``S``) in registers; the weights ``W0 = materialize(X)`` are refreshed at every chunk
start (every ``chunk_size`` tokens from the start of the call) and each token's gradient is taken
at ``W0``; the read uses ``W_t = materialize(X_t)`` per token. With ``chunk_size=1`` (the default,
what one-token decoding steps give) this is the exact per-token rule (``docs/semantics.md``).
Covers every retention (none/decay/lq/kl), bias and learner of the linear memory.

No autograd: calls with inputs that require grad in grad mode raise (train with
:func:`miras_kernels.miras_linear.chunk_miras_linear`).
"""

from __future__ import annotations

import torch

from ..common.fresh import fresh_empty
import triton
import triton.language as tl

from miras_kernels.common.codes import BIAS_CODES, RETENTION_CODES
from miras_kernels.common.tiles import bias_map
from miras_kernels.configs import block_size, linear_config
from miras_kernels.dispatch import supports
from miras_kernels.inputs import linear_kernel_inputs, validate_inputs


@triton.jit
def _materialize(x, m_st, qexp, lq_eps, c, RET: tl.constexpr):
    """W from the free variable X (``[BV, BK]`` tile; ``m_st`` marks the real entries)."""
    if RET == 0:
        w = x
    elif RET == 1:
        ax = tl.where(m_st, tl.abs(x), 0.0)
        # ||X||_q over the whole matrix; |0|^q = exp(q * log 0) = 0
        # clamp before log: both tl.where branches are evaluated
        nq = tl.sum(tl.sum(tl.where(ax > 0, tl.exp(qexp * tl.log(tl.maximum(ax, 1e-30))), 0.0), axis=1), axis=0)
        norm = tl.where(nq > 0, tl.exp(tl.log(tl.maximum(nq, 1e-30)) / qexp), 0.0)
        w = x / tl.exp((qexp - 2.0) * tl.log(norm + lq_eps))
    else:
        z = tl.where(m_st, x, float("-inf"))
        z = z - tl.max(z, axis=1)[:, None]
        ez = tl.where(m_st, tl.exp(z), 0.0)
        w = c * ez / tl.maximum(tl.sum(ez, axis=1), 1e-30)[:, None]
    return w


@triton.jit
def miras_linear_recurrent_fwd_kernel(
    q, k, v, la, lmu, eta, delta, h0, s0, y, ht, st, cu_seqlens,
    T, H, p, qexp, lq_eps, c, CS,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIAS: tl.constexpr, EPS: tl.constexpr, RET: tl.constexpr,
    HAS_ALPHA: tl.constexpr, MOMENTUM: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
    RETAINED: tl.constexpr = False,
):
    """One program per (sequence, head). ``RETAINED`` (Gated DeltaNet's order, ``step_at="retained"``
    with the exact rule, so ``CS`` = 1): the residual is taken at the retained state ``alpha_t W``."""
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_st = m_v[:, None] & m_k[None, :]
    off_st = i_nh.to(tl.int64) * V * K + o_v[:, None] * K + o_k[None, :]
    b_x = tl.zeros([BV, BK], dtype=tl.float32)
    b_s = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_H0:
        b_x = tl.load(h0 + off_st, mask=m_st, other=0.0)
        if MOMENTUM:
            b_s = tl.load(s0 + off_st, mask=m_st, other=0.0)
    b_w0 = b_x
    for t in range(0, seq_len):
        if t % CS == 0:
            b_w0 = _materialize(b_x, m_st, qexp, lq_eps, c, RET)
        row = bos + t
        b_q = tl.load(q + row * H * K + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + row * H * K + i_h * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + row * H * V + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_eta = tl.load(eta + row * H + i_h)
        if HAS_ALPHA:
            b_alpha = tl.exp(tl.load(la + row * H + i_h))
        else:
            b_alpha = 1.0
        if RETAINED:
            b_e = b_alpha * tl.sum(b_w0 * b_k[None, :], axis=1) - b_v
        else:
            b_e = tl.sum(b_w0 * b_k[None, :], axis=1) - b_v
        if BIAS == 3:
            b_delta = tl.zeros([1], dtype=tl.float32) + tl.load(delta + row * H + i_h)
        else:
            b_delta = tl.zeros([1], dtype=tl.float32)
        b_u = tl.sum(bias_map(b_e[None, :], b_v[None, :], b_delta, p, BIAS, EPS), axis=0)
        b_g = b_eta * b_u[:, None] * b_k[None, :]
        if MOMENTUM:
            b_s = tl.exp(tl.load(lmu + row * H + i_h)) * b_s - b_g
            b_x = b_alpha * b_x + b_s
        else:
            b_x = b_alpha * b_x - b_g
        b_w = _materialize(b_x, m_st, qexp, lq_eps, c, RET)
        b_y = tl.sum(b_w * b_q[None, :], axis=1)
        tl.store(y + row * H * V + i_h * V + o_v, b_y.to(y.dtype.element_ty), mask=m_v)
    tl.store(ht + off_st, b_x, mask=m_st)
    if MOMENTUM:
        tl.store(st + off_st, b_s, mask=m_st)


def fused_recurrent_miras_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec,
    chunk_size: int = 1,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Token-recurrent linear-memory Miras rule (decoding; forward only).

    Same arguments and returns as :func:`miras_kernels.miras_linear.chunk_miras_linear` (shapes
    ``q, k [B,T,H,dk]``, ``v [B,T,H,dv]``, gates ``[B,T,H]``, state ``{"W": X[, "S_W": S]}``
    ``[N,H,dv,dk]``), but any ``chunk_size >= 1`` and every retention. Chunk boundaries are at
    multiples of ``chunk_size`` from the start of this call (one-token steps: exact per-token
    rule); the initial state must be a chunk-start state. ``spec.chunk_rule="exact"`` (DeltaNet,
    Gated DeltaNet) is the per-token rule whatever ``chunk_size`` says, in ``spec.step_at``'s order.
    """
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, alpha, eta, delta, mu, *(initial_state or {}).values())
    ):
        raise ValueError("fused_recurrent_miras_linear is forward-only (decoding): call it under "
                         "torch.no_grad() or train with chunk_miras_linear")
    checked = validate_inputs(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                              initial_state=initial_state, output_final_state=output_final_state,
                              cu_seqlens=cu_seqlens)
    if spec.memory != "linear":
        raise ValueError(f"fused_recurrent_miras_linear handles memory='linear' only (got {spec.memory!r}): "
                         "use miras_kernels.miras_mlp.fused_recurrent_miras_mlp")
    ok, reason = supports(spec, q, k, v, kernel="recurrent", alpha=alpha)
    if not ok:
        raise ValueError(f"fused_recurrent_miras_linear cannot run this call: {reason}")
    x = linear_kernel_inputs(checked)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    cfg = linear_config("recurrent_fwd", 1, block_size(dk), block_size(dv), True)
    f32 = dict(dtype=torch.float32, device=q.device)
    y = fresh_empty(B, T, H, dv, dtype=q.dtype, device=q.device)
    ht = fresh_empty(x.n_seq, H, dv, dk, **f32)
    momentum = spec.learner == "momentum"
    st = fresh_empty(x.n_seq, H, dv, dk, **f32) if momentum else ht
    dummy = x.eta
    miras_linear_recurrent_fwd_kernel[(x.n_seq * H,)](
        x.q, x.k, x.v, x.la if x.la is not None else dummy, x.lmu if x.lmu is not None else dummy,
        x.eta, x.delta if x.delta is not None else dummy,
        x.h0 if x.h0 is not None else ht, x.s0 if x.s0 is not None else st,
        y, ht, st, x.cu_seqlens if x.cu_seqlens is not None else dummy,
        T * B if x.cu_seqlens is not None else T, H, float(spec.p), float(spec.q), float(spec.lq_eps),
        float(spec.c), 1 if spec.chunk_rule == "exact" else int(chunk_size),
        K=dk, V=dv, BK=cfg.BK, BV=cfg.BV, BIAS=BIAS_CODES[spec.bias], EPS=spec.bias_eps,
        RET=RETENTION_CODES[spec.retention], HAS_ALPHA=x.la is not None, MOMENTUM=momentum,
        USE_H0=x.h0 is not None, IS_VARLEN=x.cu_seqlens is not None,
        RETAINED=spec.chunk_rule == "exact" and spec.step_at == "retained" and x.la is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not output_final_state:
        return y, None
    state = {"W": ht}
    if momentum:
        state["S_W"] = st
    return y, state
