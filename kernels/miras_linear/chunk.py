"""Chunk-parallel linear-memory Miras operator on Triton: autograd Function and public entry.

Memory: besides the inputs, the forward saves the state at every chunk start for the backward,
``[NT_total, H, dv, dk]`` fp32 (twice for momentum) = ``4 * dv * dk / C`` bytes per token and
head (C = 64, d = 128: 1 KiB per token-head, about 4x a bf16 q/k/v token). The backward adds a
transient buffer of the same size (state adjoint per chunk) and fp32 per-value-block partial
dq/dk/gate gradients (``NV = dv / BV`` copies, summed on the host); every intra-chunk quantity is
recomputed, so activation memory is otherwise O(T * D).
"""

from __future__ import annotations

import torch
import triton

from kernels.common.tiles import BIAS_CODES
from kernels.common.varlen import chunk_indices, chunk_offsets
from kernels.configs import block_size, pick_config
from kernels.miras_linear.chunk_kernels import (
    miras_linear_chunk_bwd_dstate_kernel,
    miras_linear_chunk_bwd_grads_kernel,
    miras_linear_chunk_fwd_kernel,
)
from kernels.miras_linear.inputs import prepare

SMOOTH_ABS_EPS = 1e-6  # same constant as miras_pretrain.ops.spec.SMOOTH_ABS_EPS


def _launch_meta(spec, chunk_size: int, dk: int, dv: int, kernel: str):
    BK = block_size(dk)
    BVf = block_size(dv)
    cfg = pick_config(kernel, chunk_size, BK, BVf, spec.bias == "huber", spec.learner)
    if cfg is None:
        raise ValueError(f"no shipped {kernel} config for chunk_size={chunk_size}, dk={dk}, dv={dv} (see kernels.supports)")
    return cfg


class MirasLinearChunkFunction(torch.autograd.Function):
    """Inputs: q, k ``[B,T,H,dk]``, v ``[B,T,H,dv]``, la/lmu/eta/delta ``[B,T,H]`` fp32 (or None),
    h0/s0 ``[N,H,dv,dk]`` fp32 (or None). Outputs: y ``[B,T,H,dv]`` (q's dtype), final X and S
    ``[N,H,dv,dk]`` fp32 (S is an empty tensor unless momentum)."""

    @staticmethod
    def forward(ctx, q, k, v, la, lmu, eta, delta, h0, s0, cu_seqlens, spec, chunk_size):
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        offs, nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)
        cfg = _launch_meta(spec, chunk_size, dk, dv, "chunk_fwd")
        momentum = spec.learner == "momentum"
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        y = torch.empty(B, T, H, dv, dtype=q.dtype, device=dev)
        ht = torch.empty(n_seq, H, dv, dk, **f32)
        st = torch.empty(n_seq, H, dv, dk, **f32) if momentum else ht
        hs = torch.empty(nt_total, H, dv, dk, **f32)
        ss = torch.empty(nt_total, H, dv, dk, **f32) if momentum else hs
        grid = (triton.cdiv(dv, cfg.BV), n_seq * H)
        dummy = eta
        miras_linear_chunk_fwd_kernel[grid](
            q, k, v, la if la is not None else dummy, lmu if lmu is not None else dummy, eta,
            delta if delta is not None else dummy,
            h0 if h0 is not None else ht, s0 if s0 is not None else st,
            y, ht, st, hs, ss,
            cu_seqlens if cu_seqlens is not None else dummy, offs if offs is not None else dummy,
            T * B if cu_seqlens is not None else T, H, float(spec.p),
            K=dk, V=dv, BT=chunk_size, BK=cfg.BK, BV=cfg.BV,
            BIAS=BIAS_CODES[spec.bias], EPS=SMOOTH_ABS_EPS,
            HAS_ALPHA=la is not None, MOMENTUM=momentum,
            USE_H0=h0 is not None, STORE_FINAL=True, SAVE_STATES=True,
            IS_VARLEN=cu_seqlens is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        ctx.save_for_backward(q, k, v, la, lmu, eta, delta, hs, ss, cu_seqlens, offs)
        ctx.spec = spec
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        ctx.has_s0 = s0 is not None
        if not momentum:
            # no momentum state: return an empty placeholder that takes no gradient
            st = torch.empty(0, **f32)
            ctx.mark_non_differentiable(st)
        return y, ht, st

    @staticmethod
    def backward(ctx, dy, dht, dst):
        q, k, v, la, lmu, eta, delta, hs, ss, cu_seqlens, offs = ctx.saved_tensors
        spec, chunk_size = ctx.spec, ctx.chunk_size
        momentum = spec.learner == "momentum"
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        nt_total = hs.shape[0]
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        use_dht = dht is not None or (momentum and dst is not None and dst.numel() > 0)
        if use_dht:
            dht = torch.zeros(n_seq, H, dv, dk, **f32) if dht is None else dht.float().contiguous()
            if momentum:
                dst = torch.zeros(n_seq, H, dv, dk, **f32) if dst is None else dst.float().contiguous()
        dy = dy.contiguous()
        dummy = eta
        common = dict(K=dk, V=dv, BT=chunk_size, BIAS=BIAS_CODES[spec.bias], EPS=SMOOTH_ABS_EPS,
                      HAS_ALPHA=la is not None, MOMENTUM=momentum, IS_VARLEN=cu_seqlens is not None)
        gates = (la if la is not None else dummy, lmu if lmu is not None else dummy, eta,
                 delta if delta is not None else dummy)
        t_arg = T * B if cu_seqlens is not None else T

        # 1) adjoint of the state at every chunk end, sequential over chunks
        cfg = _launch_meta(spec, chunk_size, dk, dv, "chunk_bwd_dstate")
        dhs = torch.empty(nt_total, H, dv, dk, **f32)
        dss = torch.empty(nt_total, H, dv, dk, **f32) if momentum else dhs
        dh0 = torch.empty(n_seq, H, dv, dk, **f32)
        ds0 = torch.empty(n_seq, H, dv, dk, **f32) if momentum else dh0
        miras_linear_chunk_bwd_dstate_kernel[(triton.cdiv(dv, cfg.BV), n_seq * H)](
            q, k, v, *gates, hs, ss, dy,
            dht if use_dht else dh0, dst if (use_dht and momentum) else dh0,
            dhs, dss, dh0, ds0,
            cu_seqlens if cu_seqlens is not None else dummy, offs if offs is not None else dummy,
            t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, USE_DHT=use_dht, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

        # 2) every input gradient, one program per (value block, chunk, head), in two launches
        #    (PART 0: dq and gate gradients; PART 1: dk, dv, d delta); each launch has its own
        #    value block, so q/k/gate partials are [NV, ...] and summed below.
        idx = dummy if cu_seqlens is None else chunk_indices(cu_seqlens, chunk_size)
        grads = {}
        for part, name in ((0, "chunk_bwd_dqg"), (1, "chunk_bwd_dkv")):
            cfg = _launch_meta(spec, chunk_size, dk, dv, name)
            nv = triton.cdiv(dv, cfg.BV)
            if part == 0:
                out = dict(dq=torch.empty(nv, B, T, H, dk, **f32), deta=torch.empty(nv, B, T, H, **f32),
                           dla=torch.empty(nv, B, T, H, **f32) if la is not None else None,
                           dlmu=torch.empty(nv, B, T, H, **f32) if momentum else None)
            else:
                out = dict(dk=torch.empty(nv, B, T, H, dk, **f32), dv=torch.empty(B, T, H, dv, **f32),
                           ddelta=torch.empty(nv, B, T, H, **f32) if delta is not None else None)
            grads.update(out)
            spare = next(iter(out.values()))  # placeholder pointer for outputs this part never writes
            ptr = {n: out.get(n) if out.get(n) is not None else spare
                   for n in ("dq", "dk", "dv", "dla", "dlmu", "deta", "ddelta")}
            grid = (nv, triton.cdiv(T, chunk_size), B * H) if cu_seqlens is None else (nv, nt_total, H)
            miras_linear_chunk_bwd_grads_kernel[grid](
                q, k, v, *gates, hs, ss, dhs, dss, dy,
                ptr["dq"], ptr["dk"], ptr["dv"], ptr["dla"], ptr["dlmu"], ptr["deta"], ptr["ddelta"],
                cu_seqlens if cu_seqlens is not None else dummy, idx,
                t_arg, H, B * T, float(spec.p), BK=cfg.BK, BV=cfg.BV, PART=part, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        dq, dk_, dvv, deta = grads["dq"], grads["dk"], grads["dv"], grads["deta"]
        dla, dlmu, ddelta = grads["dla"], grads["dlmu"], grads["ddelta"]
        return (
            dq.sum(0).to(q.dtype), dk_.sum(0).to(k.dtype), dvv.to(v.dtype),
            dla.sum(0) if dla is not None else None,
            dlmu.sum(0) if dlmu is not None else None,
            deta.sum(0),
            ddelta.sum(0) if ddelta is not None else None,
            dh0 if ctx.has_h0 else None,
            ds0 if (momentum and ctx.has_s0) else None,
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
    """Chunk-parallel linear-memory Miras rule (retention none/decay, learner gd/momentum, any
    bias) with every gradient on Triton.

    Args:
        q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]`` (fp32, fp16 or bf16; state math in fp32).
        alpha: ``[B, T, H]`` in (0, 1] (ignored, may be None, for retention ``none``).
        eta: ``[B, T, H]`` >= 0. delta: ``[B, T, H]`` > 0 (huber). mu: ``[B, T, H]`` (momentum).
        spec: a ``MirasSpec`` with memory ``linear``; check :func:`kernels.supports` first.
        chunk_size: a chunk size with a shipped config (see :func:`kernels.supports`).
        initial_state: ``{"W": X0[, "S_W": S0]}``, each ``[N, H, dv, dk]`` or ``[H, dv, dk]``.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N+1]`` document boundaries for a packed batch (B == 1).

    Returns:
        ``y [B, T, H, dv]`` in q's dtype and ``{"W": X_T[, "S_W": S_T]}`` (``[N, H, dv, dk]``
        fp32) or ``None`` when ``output_final_state`` is False.
    """
    from kernels.dispatch import supports

    ok, reason = supports(spec, q, k, v, chunk_size=chunk_size)
    if not ok:
        raise ValueError(f"chunk_miras_linear cannot run this call: {reason}")
    x = prepare(spec, q, k, v, alpha, eta, delta, mu, initial_state, cu_seqlens)
    y, ht, st = MirasLinearChunkFunction.apply(
        x.q, x.k, x.v, x.la, x.lmu, x.eta, x.delta, x.h0, x.s0, x.cu_seqlens, spec, chunk_size
    )
    if not output_final_state:
        return y, None
    state = {"W": ht}
    if spec.learner == "momentum":
        state["S_W"] = st
    return y, state
