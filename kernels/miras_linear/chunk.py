"""Chunk-parallel linear-memory Miras operator on Triton: autograd Function and public entry.

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
import triton

from kernels.common.tiles import BIAS_CODES
from kernels.common.varlen import chunk_indices, chunk_offsets
from kernels.configs import block_size, pick_config
from kernels.miras_linear.chunk_kernels import (
    miras_linear_chunk_bwd_dstate_kernel,
    miras_linear_chunk_bwd_du_kernel,
    miras_linear_chunk_bwd_grads_kernel,
    miras_linear_chunk_out_kernel,
    miras_linear_chunk_state_kernel,
)
from kernels.miras_linear.inputs import prepare

SMOOTH_ABS_EPS = 1e-6  # same constant as miras_pretrain.ops.spec.SMOOTH_ABS_EPS


def _launch_meta(spec, chunk_size: int, dk: int, kernel: str):
    cfg = pick_config(kernel, chunk_size, block_size(dk), 0, False, spec.learner)
    if cfg is None:
        raise ValueError(f"no shipped {kernel} config for chunk_size={chunk_size}, dk={dk} (see kernels.supports)")
    return cfg


def _slots(cu_seqlens, offs, B: int, T: int, chunk_size: int, dev) -> tuple[torch.Tensor, int]:
    """(first state slot of every sequence ``[N]`` int64, total slots NS): a sequence of n chunks
    owns n + 1 slots (chunk starts, then the final state)."""
    if cu_seqlens is None:
        per = (T + chunk_size - 1) // chunk_size + 1
        return torch.arange(B, device=dev, dtype=torch.int64) * per, B * per
    n = offs.numel() - 1
    first = offs[:-1].to(torch.int64) + torch.arange(n, device=dev, dtype=torch.int64)
    return first, int(offs[-1]) + n


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
        first, n_slots = _slots(cu_seqlens, offs, B, T, chunk_size, q.device)
        momentum = spec.learner == "momentum"
        huber = spec.bias == "huber"
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        y = torch.empty(B, T, H, dv, dtype=q.dtype, device=dev)
        hs = torch.empty(n_slots, H, dv, dk, **f32)
        ss = torch.empty(n_slots, H, dv, dk, **f32) if momentum else hs
        ebuf = torch.empty(B, T, H, dv, **f32) if spec.bias != "dot" else eta
        nbuf = torch.empty(B, T, H, **f32) if huber else eta
        dummy = eta
        gates = (la if la is not None else dummy, lmu if lmu is not None else dummy, eta,
                 delta if delta is not None else dummy)
        common = dict(K=dk, V=dv, BT=chunk_size, BIAS=BIAS_CODES[spec.bias], EPS=SMOOTH_ABS_EPS,
                      HAS_ALPHA=la is not None, MOMENTUM=momentum, IS_VARLEN=cu_seqlens is not None)
        cu = cu_seqlens if cu_seqlens is not None else dummy
        t_arg = T * B if cu_seqlens is not None else T

        # 1) sequential state pass (huber: one program per head loops over every value block)
        cfg = _launch_meta(spec, chunk_size, dk, "chunk_state")
        nv = triton.cdiv(dv, cfg.BV)
        nvb = nv if huber else 1
        miras_linear_chunk_state_kernel[(nv // nvb, n_seq * H)](
            k, v, *gates, h0 if h0 is not None else hs, s0 if s0 is not None else ss,
            hs, ss, ebuf, nbuf, cu, offs if offs is not None else dummy,
            t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, NVB=nvb, USE_H0=h0 is not None, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # 2) outputs, chunk-parallel
        cfg = _launch_meta(spec, chunk_size, dk, "chunk_out")
        idx = dummy if cu_seqlens is None else chunk_indices(cu_seqlens, chunk_size)
        grid = (triton.cdiv(dv, cfg.BV), triton.cdiv(T, chunk_size), B * H) if cu_seqlens is None \
            else (triton.cdiv(dv, cfg.BV), nt_total, H)
        if grid[1] > 0:
            miras_linear_chunk_out_kernel[grid](
                q, k, v, *gates, hs, ss, ebuf, nbuf, y, cu, idx, t_arg, H, float(spec.p),
                BK=cfg.BK, BV=cfg.BV, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        # final state = the last slot of every sequence (first slot + its chunk count)
        last = first + ((T + chunk_size - 1) // chunk_size if cu_seqlens is None else (offs[1:] - offs[:-1]).long())
        ht = hs[last]
        st = ss[last] if momentum else torch.empty(0, **f32)
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
        nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)[1]
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
        cu = cu_seqlens if cu_seqlens is not None else dummy
        t_arg = T * B if cu_seqlens is not None else T

        # 1) -(A^T dy), chunk-parallel (the state-independent part of du; not needed for dot)
        grid_c = (triton.cdiv(T, chunk_size), B * H) if cu_seqlens is None else (nt_total, H)
        dua = dummy
        if spec.bias != "dot" and grid_c[0] > 0:
            cfg = _launch_meta(spec, chunk_size, dk, "chunk_bwd_du")
            dua = torch.empty(B, T, H, dv, **f32)
            miras_linear_chunk_bwd_du_kernel[(triton.cdiv(dv, cfg.BV), *grid_c)](
                q, k, gates[0], gates[1], eta, dy, dua, cu, idx, t_arg, H, K=dk, V=dv, BT=chunk_size,
                BK=cfg.BK, BV=cfg.BV, HAS_ALPHA=la is not None, MOMENTUM=momentum,
                IS_VARLEN=cu_seqlens is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        # 2) adjoint of the state at every slot, sequential over chunks (reverse)
        cfg = _launch_meta(spec, chunk_size, dk, "chunk_bwd_dstate")
        dhs = torch.empty_like(hs)
        dss = torch.empty_like(ss) if momentum else dhs
        miras_linear_chunk_bwd_dstate_kernel[(triton.cdiv(dv, cfg.BV), n_seq * H)](
            q, k, v, *gates, ebuf, nbuf, dua, dy,
            dht if use_dht else dhs, dst if (use_dht and momentum) else dhs,
            dhs, dss, cu, offs if offs is not None else dummy,
            t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, USE_DHT=use_dht, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        dh0 = dhs[first]
        ds0 = dss[first] if momentum else None

        # 3) every input gradient, one program per (value block, chunk, head), in up to four
        #    launches (PART 0: dq, d eta; 1: dk, dv, d delta; 2: d log alpha; 3: d log mu); q/k/gate
        #    partials are [NV, ...] (one per value block) and summed below.
        grads = {}
        launches = [(0, "chunk_bwd_dqg"), (1, "chunk_bwd_dkv")]
        if la is not None:
            launches.append((2, "chunk_bwd_dgate"))
        if momentum:
            launches.append((3, "chunk_bwd_dmu"))
        for part, name in launches:
            cfg = _launch_meta(spec, chunk_size, dk, name)
            nv = triton.cdiv(dv, cfg.BV)
            if part == 0:
                out = dict(dq=torch.zeros(nv, B, T, H, dk, **f32), deta=torch.zeros(nv, B, T, H, **f32))
            elif part == 1:
                out = dict(dk=torch.zeros(nv, B, T, H, dk, **f32), dv=torch.zeros(B, T, H, dv, **f32),
                           ddelta=torch.zeros(nv, B, T, H, **f32) if delta is not None else None)
            elif part == 2:
                out = dict(dla=torch.zeros(nv, B, T, H, **f32))
            else:
                out = dict(dlmu=torch.zeros(nv, B, T, H, **f32))
            grads.update(out)
            spare = next(t for t in out.values() if t is not None)  # pointer for outputs this part never writes
            ptr = {n: out.get(n) if out.get(n) is not None else spare
                   for n in ("dq", "dk", "dv", "dla", "dlmu", "deta", "ddelta")}
            grid = (nv, triton.cdiv(T, chunk_size), B * H) if cu_seqlens is None else (nv, nt_total, H)
            if grid[1] > 0:
                miras_linear_chunk_bwd_grads_kernel[grid](
                    q, k, v, *gates, hs, ss, dhs, dss, ebuf, nbuf, dy,
                    ptr["dq"], ptr["dk"], ptr["dv"], ptr["dla"], ptr["dlmu"], ptr["deta"], ptr["ddelta"],
                    cu, idx, t_arg, H, B * T, float(spec.p), BK=cfg.BK, BV=cfg.BV, PART=part, **common,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
        grads.setdefault("dla", None)
        grads.setdefault("dlmu", None)
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
    """Chunk-parallel linear-memory Miras rule (any bias, retention, learner) with every gradient
    on Triton (retention lq/kl: ``chunk_mat.py``; lq with q = 2 is the decay rule).

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
    fn = MirasLinearChunkFunction
    if spec.retention == "kl" or (spec.retention == "lq" and spec.q != 2.0):
        from kernels.miras_linear.chunk_mat import MirasLinearMatFunction as fn  # noqa: N813
    y, ht, st = fn.apply(
        x.q, x.k, x.v, x.la, x.lmu, x.eta, x.delta, x.h0, x.s0, x.cu_seqlens, spec, chunk_size
    )
    if not output_final_state:
        return y, None
    state = {"W": ht}
    if spec.learner == "momentum":
        state["S_W"] = st
    return y, state
