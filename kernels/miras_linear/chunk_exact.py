"""Exact delta rule (``MirasSpec.chunk_rule="exact"``: DeltaNet, Gated DeltaNet) on Triton, host
side: the autograd Function ``chunk_miras_linear`` runs for those specs. Kernels and math:
``chunk_exact_kernels.py``; the gated-linear-attention part (reads, state update, their
gradients) reuses the dot-bias launches of ``chunk_launch.py`` with the new values ``u`` as values
and eta = 1.

Launches: forward 3 (wy_fwd, state, out); backward 7 (bwd_du, bwd_dstate, the dot-bias dq / dk /
dgate launches, wy_bwd_da, wy_bwd_dk; dgate only with alpha).

Memory kept for the backward (fp32): ``T`` ``[B, T, H, C]``, ``W`` ``[B, T, H, dk]``, ``u``
``[B, T, H, dv]`` and the state at every chunk start (as the mini-batch kernels). ``U`` is not
kept (only the forward state pass reads it). The backward adds transient fp32 ``dW`` ``[B, T, H,
dk]`` and ``-T^T dT`` ``[B, T, H, C]``.
"""

from __future__ import annotations

import torch

from ..common.fresh import fresh_empty, fresh_empty_like
import triton

from miras_kernels.common.precision import dot_precision
from miras_kernels.common.varlen import chunk_indices, chunk_offsets
from miras_kernels.miras_linear.chunk_exact_kernels import (
    miras_delta_bwd_dstate_kernel,
    miras_delta_state_kernel,
    miras_delta_wy_bwd_da_kernel,
    miras_delta_wy_bwd_dk_kernel,
    miras_delta_wy_fwd_kernel,
)
from miras_kernels.miras_linear.chunk_launch import (
    StatePass,
    state_slots,
    launch_args,
    launch_bwd_du,
    launch_chunk_out,
    launch_input_grads,
    launch_meta,
)
from miras_kernels.spec import MirasSpec


def gla_spec(spec: MirasSpec) -> MirasSpec:
    """The spec whose dot-bias kernels compute the reads and state update with values ``u``."""
    return MirasSpec(memory="linear", bias="dot", retention=spec.retention, learner="gd")


class MirasDeltaExactFunction(torch.autograd.Function):
    """Inputs: q, k ``[B,T,H,dk]``, v ``[B,T,H,dv]``, la (log alpha, or None) / eta ``[B,T,H]`` fp32,
    h0 ``[N,H,dv,dk]`` fp32 or None, cu_seqlens ``[N+1]`` int32 or None. Outputs: y
    ``[B,T,H,dv]`` (q's dtype), final state ``[N,H,dv,dk]`` fp32."""

    @staticmethod
    def forward(ctx, q, k, v, la, eta, h0, cu_seqlens, spec, chunk_size):
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        C = chunk_size
        retained = spec.step_at == "retained"
        prec = dot_precision()
        g = gla_spec(spec)
        f32 = dict(dtype=torch.float32, device=q.device)
        ones = torch.ones(B, T, H, **f32)  # eta of the dot-bias launches
        a = launch_args(g, q, v, la, None, ones, None, cu_seqlens, C)
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        offs, nt_total = chunk_offsets(cu_seqlens, B, T, C)
        idx = a.dummy if cu_seqlens is None else chunk_indices(cu_seqlens, C)
        first, n_slots = state_slots(cu_seqlens, offs, nt_total, B, T, C, q.device)
        la_p = la if la is not None else eta
        common = dict(K=dk, V=dv, BT=C, HAS_ALPHA=la is not None, IS_VARLEN=cu_seqlens is not None,
                      DOT_PRECISION=prec)

        tinv = fresh_empty(B, T, H, C, **f32)
        wbuf = fresh_empty(B, T, H, dk, **f32)
        ubuf = fresh_empty(B, T, H, dv, **f32)
        if a.grid_rest[0] > 0:
            cfg = launch_meta(g, C, dk, "delta_wy_fwd")
            miras_delta_wy_fwd_kernel[a.grid_rest](
                k, v, la_p, eta, tinv, wbuf, ubuf, a.cu, idx, a.t_arg, H, BK=cfg.BK, BV=cfg.BV,
                RETAINED=retained, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        hs = fresh_empty(n_slots, H, dv, dk, **f32)
        vnew = fresh_empty(B, T, H, dv, **f32)
        cfg = launch_meta(g, C, dk, "delta_state")
        miras_delta_state_kernel[(triton.cdiv(dv, cfg.BV), n_seq * H)](
            k, wbuf, ubuf, la_p, h0 if h0 is not None else hs, hs, vnew, a.cu,
            offs if offs is not None else a.dummy, a.t_arg, H, BK=cfg.BK, BV=cfg.BV,
            USE_H0=h0 is not None, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        last = first + ((T + C - 1) // C if cu_seqlens is None else (offs[1:] - offs[:-1]).long())
        sp = StatePass(hs, hs, a.dummy, a.dummy, offs, idx, first, last)
        y = fresh_empty(B, T, H, dv, dtype=q.dtype, device=q.device)
        launch_chunk_out(g, C, a, q, k, vnew, sp, y)
        ctx.save_for_backward(q, k, v, la, eta, tinv, wbuf, vnew, hs, cu_seqlens, offs, idx, first)
        ctx.spec, ctx.chunk_size, ctx.has_h0 = spec, C, h0 is not None
        return y, hs[last]

    @staticmethod
    def backward(ctx, dy, dht):
        q, k, v, la, eta, tinv, wbuf, vnew, hs, cu_seqlens, offs, idx, first = ctx.saved_tensors
        spec, C = ctx.spec, ctx.chunk_size
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        g = gla_spec(spec)
        f32 = dict(dtype=torch.float32, device=q.device)
        ones = torch.ones(B, T, H, **f32)
        a = launch_args(g, q, v, la, None, ones, None, cu_seqlens, C)
        la_p = la if la is not None else eta
        common = dict(K=dk, V=dv, BT=C, HAS_ALPHA=la is not None, IS_VARLEN=cu_seqlens is not None,
                      DOT_PRECISION=dot_precision())
        dy = dy.contiguous()
        use_dht = dht is not None
        dht = dht.float().contiguous() if use_dht else None

        # 1) -(A^T dy) with A = (Q K^T) * D_L, chunk-parallel
        dua = launch_bwd_du(g, C, a, q, k, dy, idx)
        # 2) state adjoints and dL/du, sequential over chunks (reverse)
        dhs = fresh_empty_like(hs)
        dvnew = fresh_empty(B, T, H, dv, **f32)
        cfg = launch_meta(g, C, dk, "delta_bwd_dstate")
        miras_delta_bwd_dstate_kernel[(triton.cdiv(dv, cfg.BV), n_seq * H)](
            q, k, wbuf, la_p, dua, dy, dht if use_dht else dhs, dhs, dvnew, a.cu,
            offs if offs is not None else a.dummy, a.t_arg, H, BK=cfg.BK, BV=cfg.BV, USE_DHT=use_dht,
            **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # 3) dq, and the reads' / state update's share of dk and d log alpha (dot bias, values u)
        gg = launch_input_grads(g, C, a, q, k, vnew, hs, hs, dhs, dhs, a.dummy, a.dummy, dy, idx)
        # 4) through u = U - W S0^T and the WY form to k, v, eta, log alpha
        dk_wy = fresh_empty(B, T, H, dk, **f32)
        dwbuf = fresh_empty(B, T, H, dk, **f32)
        dabuf = fresh_empty(B, T, H, C, **f32)
        dv_ = fresh_empty(B, T, H, dv, **f32)
        dla_wy = fresh_empty(B, T, H, **f32) if la is not None else a.dummy
        deta = fresh_empty(B, T, H, **f32)
        if a.grid_rest[0] > 0:
            retained = spec.step_at == "retained"
            cfg = launch_meta(g, C, dk, "delta_wy_bwd_da")
            miras_delta_wy_bwd_da_kernel[a.grid_rest](
                v, la_p, eta, tinv, hs, dvnew, dwbuf, dabuf, dv_, deta, a.cu, idx,
                a.t_arg, H, BK=cfg.BK, BV=cfg.BV, RETAINED=retained, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            cfg = launch_meta(g, C, dk, "delta_wy_bwd_dk")
            miras_delta_wy_bwd_dk_kernel[a.grid_rest](
                k, la_p, eta, tinv, dwbuf, dabuf, dk_wy, dla_wy, deta, a.cu, idx,
                a.t_arg, H, BK=cfg.BK, BV=cfg.BV, RETAINED=retained, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        dla = gg["dla"] + dla_wy if la is not None else None
        return ((gg["dq"]).to(q.dtype), (gg["dk"] + dk_wy).to(k.dtype), dv_.to(v.dtype), dla, deta,
                dhs[first] if ctx.has_h0 else None, None, None, None)


def chunk_delta_exact(x, spec: MirasSpec, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the exact delta rule on ``LinearKernelInputs`` ``x`` (``miras_kernels.inputs``): returns
    ``y [B, T, H, dv]`` in q's dtype and the final state ``[N, H, dv, dk]`` fp32."""
    return MirasDeltaExactFunction.apply(x.q, x.k, x.v, x.la, x.eta, x.h0, x.cu_seqlens, spec, chunk_size)
