"""Autograd Function of the linear memory with the non-affine retentions ``lq`` (Moneta) and
``kl`` (Memora) on Triton. The kernels and the math: ``chunk_mat_kernels.py``.

Launches (forward): ``chunk_state`` with ``MAT`` (residual at the chunk-start weights), then
lq: ``chunk_out`` (the affine read ``r``, fp32) and ``scan_fwd`` (per-token partial q-norms ->
``y = s_t r``); kl: ``scan_fwd`` (the per-token softmax read). Backward: ``scan_bwd`` (the
per-token adjoints, forward-accumulated), ``chunk_bwd_du`` (lq: the affine read's share of du),
``bwd_dstate_mat`` (sequential, with the Jacobian of ``materialize``), the four ``bwd_grads``
launches (with the scaled/zero read cotangent and the local du); the gate gradients of the local
terms go through the chunk coefficients inside the sweep (gd) or on the host (momentum,
:func:`_momentum_gate_grads`).

Memory beyond ``chunk.py``'s: lq saves the affine read ``r`` (fp32 ``[B, T, H, dv]``) and the
per-token norms (``[B, T, H]``). With momentum the backward adds fp32 ``[NV, B, T, H, C]`` rows of
the local ``dA`` and the host's ``[n_chunks, H, C, C]`` coefficient algebra (gd does that algebra
inside the sweep: ``[NV, B, T, H]`` partials only).
"""

from __future__ import annotations

import torch

from ..common.fresh import fresh_empty
import triton

from miras_kernels.common.codes import RETENTION_CODES
from miras_kernels.common.varlen import chunk_indices
from miras_kernels.miras_linear.chunk_launch import (
    LaunchArgs,
    StatePass,
    launch_meta,
    final_state_cotangents,
    launch_args,
    launch_bwd_du,
    launch_chunk_out,
    launch_input_grads,
    run_state_pass,
)
from miras_kernels.miras_linear.chunk_mat_kernels import (
    miras_linear_chunk_bwd_dstate_mat_kernel,
    miras_linear_chunk_scan_bwd_kernel,
    miras_linear_chunk_scan_fwd_kernel,
)

_TINY = torch.finfo(torch.float32).tiny


def _token_chunks(cu_seqlens, B: int, T: int, C: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Token row (into ``[B*T]``) of position j of every chunk, ``[NT, C]`` long (clamped), and
    its validity mask (positions past a sequence's end are padding)."""
    j = torch.arange(C, device=dev)
    if cu_seqlens is None:
        n = (T + C - 1) // C
        pos = torch.arange(n, device=dev)[:, None] * C + j  # [n, C]
        valid = (pos < T).expand(B, n, C).reshape(B * n, C)
        rows = (torch.arange(B, device=dev)[:, None, None] * T + pos).reshape(B * n, C)
    else:
        idx = chunk_indices(cu_seqlens, C).long()
        cu = cu_seqlens.long()
        bos, eos = cu[idx[:, 0]], cu[idx[:, 0] + 1]
        rows = bos[:, None] + idx[:, 1:2] * C + j
        valid = rows < eos[:, None]
    return rows.clamp_max(B * T - 1), valid


def _momentum_gate_grads(la, lmu, eta, hrow, dcx, dcs, cu_seqlens, C: int):
    """Gate gradients of the per-token terms with momentum: the sweep gives ``dL/dA_ti = -H[t, i]``,
    ``dL/dcX_t = dcx_t``, ``dL/dcS_t = dcs_t`` for the chunk coefficients ``A = (D_L D_M) * eta``,
    ``cX = exp(L)``, ``cS = D_L exp(M)``; differentiate those ``[C, C]`` formulas (autograd on a
    few ``[n_chunks, H, C, C]`` tensors; gd does this algebra inside the sweep). Inputs
    ``[B, T, H]`` (hrow ``[B, T, H, C]``); returns ``(dla, deta, dlmu)``, each ``[B, T, H]``."""
    B, T, H = eta.shape
    rows, valid = _token_chunks(cu_seqlens, B, T, C, eta.device)
    vm = valid[:, None, :]  # [NT, 1, C]

    def chunked(x):  # [B, T, H] -> [NT, H, C], zero at padding
        return torch.where(vm, x.reshape(B * T, H)[rows].transpose(1, 2), 0.0)

    la_c = chunked(la).requires_grad_(True)
    eta_c = chunked(eta).requires_grad_(True)
    lmu_c = chunked(lmu).requires_grad_(True)
    h_c = hrow.reshape(B * T, H, C)[rows].permute(0, 2, 1, 3)  # [NT, H, t, i]
    h_c = torch.where(valid[:, None, :, None], h_c, 0.0)
    mask = torch.ones(C, C, dtype=torch.bool, device=eta.device).tril()
    with torch.enable_grad():
        L = la_c.cumsum(-1)
        Mu = lmu_c.cumsum(-1)
        D = torch.exp(torch.where(mask, L[..., :, None] - L[..., None, :], float("-inf")))
        G = D @ torch.exp(torch.where(mask, Mu[..., :, None] - Mu[..., None, :], float("-inf")))
        obj = (chunked(dcx) * torch.exp(L)).sum() + (chunked(dcs) * (D @ torch.exp(Mu)[..., None]).squeeze(-1)).sum()
        obj = obj - (h_c * G * eta_c[..., None, :]).sum()
        grads = torch.autograd.grad(obj, [la_c, eta_c, lmu_c])

    def unchunk(g):  # [NT, H, C] -> [B, T, H]
        out = torch.zeros(B * T, H, dtype=torch.float32, device=eta.device)
        out.index_add_(0, rows[valid], g.transpose(1, 2)[valid])
        return out.view(B, T, H)

    dla, deta, dlmu = (unchunk(g) for g in grads)
    return dla, deta, dlmu


def _lq_slot_terms(spec, hs: torch.Tensor):
    """Per state slot ``[NS, H]``: ``s(X)``, ``(2-q)(n+eps)^(1-q)`` and ``1 / max(n, tiny)``
    (``n = ||X||_q``), the pieces of ``d s / d X`` the sequential adjoint pass needs."""
    qx = float(spec.q)
    n = hs.abs().pow(qx).sum(dim=(-2, -1)).pow(1.0 / qx)
    s = (n + spec.lq_eps).pow(2.0 - qx)
    g = (2.0 - qx) * (n + spec.lq_eps).pow(1.0 - qx)
    return s.contiguous(), g.contiguous(), (1.0 / n.clamp_min(_TINY)).contiguous()


def _materialized(spec, hs: torch.Tensor, s_slot: torch.Tensor | None) -> torch.Tensor:
    """Weights ``materialize(X)`` of every saved state slot (``[NS, H, dv, dk]``)."""
    if spec.retention == "lq":
        return (hs * s_slot[..., None, None]).contiguous()
    return (spec.c * torch.softmax(hs, dim=-1)).contiguous()


class MirasLinearMatFunction(torch.autograd.Function):
    """Same inputs/outputs as ``chunk.MirasLinearChunkFunction``, for retention lq/kl (q != 2)."""

    @staticmethod
    def forward(ctx, q, k, v, la, lmu, eta, delta, h0, s0, cu_seqlens, spec, chunk_size):
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        mat = RETENTION_CODES[spec.retention]
        f32 = dict(dtype=torch.float32, device=q.device)
        qexp, lq_eps = float(spec.q), float(spec.lq_eps)
        a = launch_args(spec, q, v, la, lmu, eta, delta, cu_seqlens, chunk_size)
        # 1) sequential state pass, residual at the chunk-start weights
        sp = run_state_pass(spec, chunk_size, a, q, k, v, h0, s0, cu_seqlens, mat=mat)
        # 2) lq: the affine read r_t (fp32) and per-token partial q-norms -> y = s_t r_t;
        #    kl: the per-token softmax read straight into y
        r = nrm = None
        if mat == 1:
            r = fresh_empty(B, T, H, dv, **f32)
            launch_chunk_out(spec, chunk_size, a, q, k, v, sp, r)
            cfg = launch_meta(spec, chunk_size, dk, "chunk_scan_fwd")
            out = torch.zeros(triton.cdiv(dv, cfg.BV), B, T, H, **f32)
        else:
            out = y = fresh_empty(B, T, H, dv, dtype=q.dtype, device=q.device)
        _launch_scan(spec, chunk_size, a, q, k, v, sp, "chunk_scan_fwd", miras_linear_chunk_scan_fwd_kernel, out)
        if mat == 1:
            nrm = out.sum(0).pow(1.0 / qexp)
            y = ((nrm + lq_eps).pow(2.0 - qexp)[..., None] * r).to(q.dtype)
        ht, st = sp.final_states(spec.learner == "momentum")
        ctx.save_for_backward(q, k, v, la, lmu, eta, delta, sp.hs, sp.ss, sp.ebuf, sp.nbuf, cu_seqlens, sp.offs,
                              sp.idx, sp.first, sp.last, r, nrm)
        ctx.spec = spec
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        ctx.has_s0 = s0 is not None
        if spec.learner != "momentum":
            ctx.mark_non_differentiable(st)
        return y, ht, st

    @staticmethod
    def backward(ctx, dy, dht, dst):
        q, k, v, la, lmu, eta, delta, hs, ss, ebuf, nbuf, cu_seqlens, offs, idx, first, last, r, nrm = ctx.saved_tensors
        spec, chunk_size = ctx.spec, ctx.chunk_size
        momentum = spec.learner == "momentum"
        mat = RETENTION_CODES[spec.retention]
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        f32 = dict(dtype=torch.float32, device=q.device)
        qexp, lq_eps = float(spec.q), float(spec.lq_eps)
        use_dht, dht, dst = final_state_cotangents(dht, dst, momentum, (n_seq, H, dv, dk), q.device)
        dy = dy.contiguous()
        a = launch_args(spec, q, v, la, lmu, eta, delta, cu_seqlens, chunk_size)
        sp = StatePass(hs, ss, ebuf, nbuf, offs, idx, first, last)

        # the reads' cotangent on the affine machinery: lq scales it by s_t, kl has none
        if mat == 1:
            s_tok = (nrm + lq_eps).pow(2.0 - qexp)
            dy_eff = (dy.float() * s_tok[..., None]).contiguous()
            ds = (dy.float() * r).sum(-1)
            gam_c = (ds * (2.0 - qexp) * (nrm + lq_eps).pow(1.0 - qexp)).contiguous()
            gam_n = (1.0 / nrm.clamp_min(_TINY)).contiguous()
        else:
            dy_eff = torch.zeros(B, T, H, dv, **f32)
            gam_c = gam_n = a.dummy

        # 1) per-token adjoints, forward-accumulated per chunk (writes the local chunk-start
        #    adjoints into dhs/dss at every chunk slot; the final slots come from dstate).
        #    gd: the sweep maps its terms to d log alpha / d eta itself (dcx / dcs); momentum
        #    writes <Gam, X0>, <Gam, S0> and the H rows for the host (_momentum_gate_grads)
        nvs = triton.cdiv(dv, launch_meta(spec, chunk_size, dk, "chunk_scan_bwd").BV)
        nvk = triton.cdiv(dv, launch_meta(spec, chunk_size, dk, "chunk_scan_bwd_dk").BV)
        dhs = torch.zeros_like(hs)
        dss = torch.zeros_like(ss) if momentum else dhs
        dul = torch.zeros(B, T, H, dv, **f32)
        dcx = torch.zeros(nvs, B, T, H, **f32)
        dcs = torch.zeros(nvs, B, T, H, **f32)
        dkl = torch.zeros(nvk, B, T, H, dk, **f32)  # per-value-block partials of each launch
        dql = torch.zeros(nvs, B, T, H, dk, **f32) if mat == 2 else dcx  # lq never writes dq
        hrow = torch.zeros(nvs, B, T, H, chunk_size, **f32) if momentum else dcx
        outs = (dy, gam_c, gam_n, dul, dkl, dql, hrow, dcx, dcs, dhs, dss)
        for part, name in ((0, "chunk_scan_bwd"), (1, "chunk_scan_bwd_dk")):
            _launch_scan(spec, chunk_size, a, q, k, v, sp, name, miras_linear_chunk_scan_bwd_kernel, *outs, PART=part)
        # 2) du: the affine read's share (lq) plus the local one; dstate overwrites it with dE
        if spec.bias == "dot":
            dua = a.dummy
        elif mat == 1:
            dua = launch_bwd_du(spec, chunk_size, a, q, k, dy_eff, idx)
            dua += dul
        else:
            dua = dul.clone()
        # 3) sequential adjoint pass with the Jacobian of materialize
        if mat == 1:
            s_slot, g_slot, n_slot = _lq_slot_terms(spec, hs)
        else:
            s_slot = g_slot = n_slot = a.dummy
        cfg = launch_meta(spec, chunk_size, dk, "chunk_bwd_dstate_mat")
        nv = triton.cdiv(dv, cfg.BV)
        nvb = nv if (mat == 1 and spec.bias != "dot") else 1
        miras_linear_chunk_bwd_dstate_mat_kernel[(nv // nvb, n_seq * H)](
            q, k, v, *a.gates, hs, ebuf, nbuf, dua, dy_eff,
            dht if use_dht else dhs, dst if (use_dht and momentum) else dhs,
            dhs, dss, s_slot, g_slot, n_slot, a.cu, offs if offs is not None else a.dummy,
            a.t_arg, H, float(spec.p), qexp, float(spec.c), BK=cfg.BK, BV=cfg.BV, NVB=nvb, USE_DHT=use_dht,
            MAT=mat, HAS_DY=mat == 1, **a.common, lq_eps=lq_eps, RETAINED=a.retained,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # 4) input gradients from the state adjoints (chunk.py's launches with the chunk-start
        #    weights for the residual and the local du)
        #    (retained, lq: the residuals were taken at rho_i X0 -- the kernel scales X0 itself)
        g = launch_input_grads(spec, chunk_size, a, q, k, v, hs, ss, dhs, dss, ebuf, nbuf, dy_eff, idx,
                               hs_residual=hs if a.retained else _materialized(spec, hs, s_slot), dul=dul,
                               n0s=(1.0 / n_slot).contiguous() if a.retained else None)
        # 5) the local terms' gate gradients (gd: from the sweep; momentum: on the host)
        if momentum:
            dla_l, deta_l, dlmu_l = _momentum_gate_grads(la, lmu, eta, hrow.sum(0), dcx.sum(0), dcs.sum(0),
                                                         cu_seqlens, chunk_size)
        else:
            dla_l, deta_l, dlmu_l = dcx.sum(0), dcs.sum(0), None
        dq = g["dq"] + dql.sum(0) if mat == 2 else g["dq"]
        return (
            dq.to(q.dtype), (g["dk"] + dkl.sum(0)).to(k.dtype), g["dv"].to(v.dtype), g["dla"] + dla_l,
            g["dlmu"] + dlmu_l if momentum else None, g["deta"] + deta_l, g["ddelta"],
            dhs[first] if ctx.has_h0 else None, dss[first] if (momentum and ctx.has_s0) else None,
            None, None, None,
        )


def _launch_scan(spec, chunk_size: int, a: LaunchArgs, q, k, v, sp: StatePass, name: str, kernel, *outs,
                 PART: int | None = None) -> None:
    """One of the per-token sweeps (``chunk_scan_fwd``, ``chunk_scan_bwd``, ``chunk_scan_bwd_dk``):
    grid (value block of 16 rows, chunk, sequence * head) over the padded key width."""
    B, T, H, dk = q.shape
    cfg = launch_meta(spec, chunk_size, dk, name)
    if a.grid_rest[0] == 0:
        return
    extra = {} if PART is None else dict(PART=PART)
    kernel[(triton.cdiv(v.shape[-1], cfg.BV), *a.grid_rest)](
        q, k, v, *a.gates, sp.hs, sp.ss, sp.ebuf, sp.nbuf, *outs, a.cu, sp.idx, a.t_arg, H, B * T,
        float(spec.p), float(spec.q), float(spec.c), dk, v.shape[-1], BT=chunk_size, BKP=cfg.BK, BV=cfg.BV,
        BIAS=a.common["BIAS"], EPS=a.common["EPS"], HAS_ALPHA=True, MOMENTUM=a.common["MOMENTUM"],
        IS_VARLEN=a.common["IS_VARLEN"], MAT=RETENTION_CODES[spec.retention],
        DOT_PRECISION=a.common["DOT_PRECISION"], **extra,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
