"""Chunk-parallel linear-memory Miras operator on Triton, host side: the autograd Function of the
affine retentions (none, decay; lq/kl: ``chunk_mat.py``) and the public entry ``chunk_miras_linear``.
The launches both Functions share are ``chunk_launch.py``; the jit code ``chunk_kernels.py``.

Memory (the backward recomputes, the forward saves only what is cheaper to keep):
* the state at every chunk start plus the final state, ``[NS, H, dv, dk]`` fp32 with ``NS =
  sum(n_chunks + 1)`` (twice for momentum) = ``4 * dv * dk / C`` bytes per token and head (C = 64,
  d = 128: 1 KiB per token-head). Recomputing it would re-run the sequential pass in backward;
  storing it makes the gradient launches fully chunk-parallel.
* the residual ``E = K W0^T - V`` (fp32 ``[B, T, H, dv]``, O(T * D); not for the dot bias) and the
  huber row norm (``[B, T, H]``): keeping E saves a key-dim contraction per chunk in each of the
  three backward launches.
* everything else intra-chunk (Q K^T, the decay matrices, U = f(E), the products with the
  state) is recomputed in the backward. The backward adds a transient state-adjoint buffer of
  the state buffer's size and fp32 per-value-block partial dq/dk/gate gradients (``NV = dv / BV``
  copies, summed on the host).
"""

from __future__ import annotations

import torch

from ..common.fresh import fresh_empty, fresh_empty_like
import triton

from miras_kernels.dispatch import supports
from miras_kernels.inputs import linear_kernel_inputs, validate_inputs
from miras_kernels.miras_linear.chunk_exact import chunk_delta_exact
from miras_kernels.miras_linear.chunk_kernels import miras_linear_chunk_bwd_dstate_kernel
from miras_kernels.miras_linear.chunk_launch import (
    final_state_cotangents,
    launch_args,
    launch_bwd_du,
    launch_chunk_out,
    launch_input_grads,
    launch_meta,
    run_state_pass,
)
from miras_kernels.miras_linear.chunk_mat import MirasLinearMatFunction


class MirasLinearChunkFunction(torch.autograd.Function):
    """Inputs: q, k ``[B,T,H,dk]``, v ``[B,T,H,dv]``, la/lmu/eta/delta ``[B,T,H]`` fp32 (or None),
    h0/s0 ``[N,H,dv,dk]`` fp32 (or None). Outputs: y ``[B,T,H,dv]`` (q's dtype), final X and S
    ``[N,H,dv,dk]`` fp32 (S is an empty tensor unless momentum)."""

    @staticmethod
    def forward(ctx, q, k, v, la, lmu, eta, delta, h0, s0, cu_seqlens, spec, chunk_size):
        momentum = spec.learner == "momentum"
        a = launch_args(spec, q, v, la, lmu, eta, delta, cu_seqlens, chunk_size)
        # 1) sequential state pass, 2) outputs, chunk-parallel
        sp = run_state_pass(spec, chunk_size, a, q, k, v, h0, s0, cu_seqlens)
        y = fresh_empty(*v.shape, dtype=q.dtype, device=q.device)
        launch_chunk_out(spec, chunk_size, a, q, k, v, sp, y)
        ht, st = sp.final_states(momentum)
        hs, ss, ebuf, nbuf, offs, idx, first = sp.hs, sp.ss, sp.ebuf, sp.nbuf, sp.offs, sp.idx, sp.first
        ctx.save_for_backward(q, k, v, la, lmu, eta, delta, hs, ss, ebuf, nbuf, cu_seqlens, offs, idx, first)
        ctx.spec = spec
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        ctx.has_s0 = s0 is not None
        if not momentum:
            # no momentum state: an empty placeholder that takes no gradient
            ctx.mark_non_differentiable(st)
        return y, ht, st

    @staticmethod
    def backward(ctx, dy, dht, dst):
        q, k, v, la, lmu, eta, delta, hs, ss, ebuf, nbuf, cu_seqlens, offs, idx, first = ctx.saved_tensors
        spec, chunk_size = ctx.spec, ctx.chunk_size
        momentum = spec.learner == "momentum"
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        use_dht, dht, dst = final_state_cotangents(dht, dst, momentum, (n_seq, H, dv, dk), q.device)
        dy = dy.contiguous()
        a = launch_args(spec, q, v, la, lmu, eta, delta, cu_seqlens, chunk_size)

        # 1) -(A^T dy), chunk-parallel (the state-independent part of du; not needed for dot)
        dua = launch_bwd_du(spec, chunk_size, a, q, k, dy, idx) if spec.bias != "dot" else a.dummy
        # 2) adjoint of the state at every slot, sequential over chunks (reverse)
        cfg = launch_meta(spec, chunk_size, dk, "chunk_bwd_dstate")
        dhs = fresh_empty_like(hs)
        dss = fresh_empty_like(ss) if momentum else dhs
        miras_linear_chunk_bwd_dstate_kernel[(triton.cdiv(dv, cfg.BV), n_seq * H)](
            q, k, v, *a.gates, ebuf, nbuf, dua, dy,
            dht if use_dht else dhs, dst if (use_dht and momentum) else dhs,
            dhs, dss, a.cu, offs if offs is not None else a.dummy,
            a.t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, USE_DHT=use_dht, RETAINED=a.retained, **a.common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # 3) every input gradient
        g = launch_input_grads(spec, chunk_size, a, q, k, v, hs, ss, dhs, dss, ebuf, nbuf, dy, idx)
        return (
            g["dq"].to(q.dtype), g["dk"].to(k.dtype), g["dv"].to(v.dtype), g["dla"], g["dlmu"], g["deta"],
            g["ddelta"], dhs[first] if ctx.has_h0 else None,
            dss[first] if (momentum and ctx.has_s0) else None,
            None, None, None,
        )


def chunk_miras_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec,
    chunk_size: int = 64,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Chunk-parallel linear-memory Miras rule (any bias, retention, learner) with every gradient
    on Triton (retention lq/kl: ``chunk_mat.py``; lq with q = 2 is the decay rule;
    ``spec.chunk_rule="exact"``, the delta rule per token in ``spec.step_at``'s order -- DeltaNet,
    Gated DeltaNet -- : ``chunk_exact.py``).

    Args:
        q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]`` (fp32, fp16 or bf16; state math in fp32).
        alpha: ``[B, T, H]`` in (0, 1] (ignored, may be None, for retention ``none``).
        eta: ``[B, T, H]`` >= 0. delta: ``[B, T, H]`` > 0 (huber). mu: ``[B, T, H]`` (momentum).
        spec: a ``MirasSpec`` with memory ``linear``; check :func:`miras_kernels.supports` first.
        chunk_size: a chunk size with a shipped config (see :func:`miras_kernels.supports`).
        initial_state: ``{"W": X0[, "S_W": S0]}``, each ``[N, H, dv, dk]`` or ``[H, dv, dk]``.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N+1]`` document boundaries for a packed batch (B == 1).

    Returns:
        ``y [B, T, H, dv]`` in q's dtype and ``{"W": X_T[, "S_W": S_T]}`` (``[N, H, dv, dk]``
        fp32) or ``None`` when ``output_final_state`` is False.
    """
    checked = validate_inputs(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                              initial_state=initial_state, output_final_state=output_final_state,
                              cu_seqlens=cu_seqlens)
    if spec.memory != "linear":
        raise ValueError(f"chunk_miras_linear handles memory='linear' only (got {spec.memory!r}): "
                         "use miras_kernels.miras_mlp.chunk_miras_mlp")
    ok, reason = supports(spec, q, k, v, chunk_size=chunk_size, alpha=alpha)
    if not ok:
        raise ValueError(f"chunk_miras_linear cannot run this call: {reason}")
    x = linear_kernel_inputs(checked)
    if spec.chunk_rule == "exact":
        # the delta rule chunked exactly (WY form): DeltaNet / Gated DeltaNet
        y, ht = chunk_delta_exact(x, spec, chunk_size)
        return y, ({"W": ht} if output_final_state else None)
    # lq with q = 2 is the identity map (MirasSpec.materialize): the affine kernels
    affine = spec.weights_are_state
    fn = MirasLinearChunkFunction if affine else MirasLinearMatFunction
    y, ht, st = fn.apply(
        x.q, x.k, x.v, x.la, x.lmu, x.eta, x.delta, x.h0, x.s0, x.cu_seqlens, spec, chunk_size
    )
    if not output_final_state:
        return y, None
    state = {"W": ht}
    if spec.learner == "momentum":
        state["S_W"] = st
    return y, state
