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
import triton

from kernels.common.tiles import BIAS_CODES
from kernels.common.varlen import chunk_indices, chunk_offsets
from kernels.configs import block_size
from kernels.miras_linear.chunk import SMOOTH_ABS_EPS, _launch_meta, _slots
from kernels.miras_linear.chunk_kernels import (
    miras_linear_chunk_bwd_du_kernel,
    miras_linear_chunk_bwd_grads_kernel,
    miras_linear_chunk_out_kernel,
    miras_linear_chunk_state_kernel,
)
from kernels.miras_linear.chunk_mat_kernels import (
    MAT_CODES,
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
    """Same inputs/outputs as ``chunk.MirasLinearChunkFunction`` for retention lq/kl."""

    @staticmethod
    def forward(ctx, q, k, v, la, lmu, eta, delta, h0, s0, cu_seqlens, spec, chunk_size):
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        offs, nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)
        first, n_slots = _slots(cu_seqlens, offs, B, T, chunk_size, q.device)
        momentum = spec.learner == "momentum"
        mat = MAT_CODES[spec.retention]
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        hs = torch.empty(n_slots, H, dv, dk, **f32)
        ss = torch.empty(n_slots, H, dv, dk, **f32) if momentum else hs
        ebuf = torch.empty(B, T, H, dv, **f32) if spec.bias != "dot" else eta
        nbuf = torch.empty(B, T, H, **f32) if spec.bias == "huber" else eta
        dummy = eta
        gates = (la, lmu if lmu is not None else dummy, eta, delta if delta is not None else dummy)
        common = dict(K=dk, V=dv, BT=chunk_size, BIAS=BIAS_CODES[spec.bias], EPS=SMOOTH_ABS_EPS,
                      HAS_ALPHA=True, MOMENTUM=momentum, IS_VARLEN=cu_seqlens is not None)
        cu = cu_seqlens if cu_seqlens is not None else dummy
        t_arg = T * B if cu_seqlens is not None else T
        qexp, lq_eps, c = float(spec.q), float(spec.lq_eps), float(spec.c)

        # 1) sequential state pass; lq needs the whole state's norm per chunk: one program per head
        cfg = _launch_meta(spec, chunk_size, dk, "chunk_state")
        nv = triton.cdiv(dv, cfg.BV)
        nvb = nv if (spec.bias == "huber" or (mat == 1 and spec.bias != "dot")) else 1
        miras_linear_chunk_state_kernel[(nv // nvb, n_seq * H)](
            k, v, *gates, h0 if h0 is not None else hs, s0 if s0 is not None else ss,
            hs, ss, ebuf, nbuf, cu, offs if offs is not None else dummy,
            t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, NVB=nvb, USE_H0=h0 is not None,
            qexp=qexp, lq_eps=lq_eps, c=c, MAT=mat, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        idx = dummy if cu_seqlens is None else chunk_indices(cu_seqlens, chunk_size)
        n_chunks = triton.cdiv(T, chunk_size) if cu_seqlens is None else nt_total
        grid_rest = (n_chunks, B * H) if cu_seqlens is None else (nt_total, H)
        scfg = _launch_meta(spec, chunk_size, dk, "chunk_scan_fwd")
        nvs = triton.cdiv(dv, scfg.BV)
        scan_common = dict(BT=chunk_size, BKP=block_size(dk), BV=scfg.BV, BIAS=BIAS_CODES[spec.bias],
                           EPS=SMOOTH_ABS_EPS, HAS_ALPHA=True, MOMENTUM=momentum,
                           IS_VARLEN=cu_seqlens is not None, MAT=mat)
        r = nrm = None
        if mat == 1:
            # 2) the affine read r_t (fp32) and the per-token q-norms; y = s_t r_t
            r = torch.empty(B, T, H, dv, **f32)
            ocfg = _launch_meta(spec, chunk_size, dk, "chunk_out")
            if n_chunks > 0:
                miras_linear_chunk_out_kernel[(triton.cdiv(dv, ocfg.BV), *grid_rest)](
                    q, k, v, *gates, hs, ss, ebuf, nbuf, r, cu, idx, t_arg, H, float(spec.p),
                    BK=ocfg.BK, BV=ocfg.BV, **common, num_warps=ocfg.num_warps, num_stages=ocfg.num_stages,
                )
            part = torch.zeros(nvs, B, T, H, **f32)
            out = part
        else:
            y = torch.empty(B, T, H, dv, dtype=q.dtype, device=dev)
            out = y
        if n_chunks > 0:
            miras_linear_chunk_scan_fwd_kernel[(nvs, *grid_rest)](
                q, k, v, *gates, hs, ss, ebuf, nbuf, out, cu, idx, t_arg, H, B * T, float(spec.p), qexp, c,
                dk, dv, **scan_common, num_warps=scfg.num_warps, num_stages=scfg.num_stages,
            )
        if mat == 1:
            nrm = part.sum(0).pow(1.0 / qexp)
            y = ((nrm + lq_eps).pow(2.0 - qexp)[..., None] * r).to(q.dtype)
        last = first + ((T + chunk_size - 1) // chunk_size if cu_seqlens is None else (offs[1:] - offs[:-1]).long())
        ht = hs[last]
        st = ss[last] if momentum else torch.empty(0, **f32)
        ctx.save_for_backward(q, k, v, la, lmu, eta, delta, hs, ss, ebuf, nbuf, cu_seqlens, offs, idx, first, r, nrm)
        ctx.spec = spec
        ctx.chunk_size = chunk_size
        ctx.has_h0 = h0 is not None
        ctx.has_s0 = s0 is not None
        if not momentum:
            ctx.mark_non_differentiable(st)
        return y, ht, st

    @staticmethod
    def backward(ctx, dy, dht, dst):
        q, k, v, la, lmu, eta, delta, hs, ss, ebuf, nbuf, cu_seqlens, offs, idx, first, r, nrm = ctx.saved_tensors
        spec, chunk_size = ctx.spec, ctx.chunk_size
        momentum = spec.learner == "momentum"
        mat = MAT_CODES[spec.retention]
        B, T, H, dk = q.shape
        dv = v.shape[-1]
        n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)[1]
        dev = q.device
        f32 = dict(dtype=torch.float32, device=dev)
        qexp, lq_eps, c = float(spec.q), float(spec.lq_eps), float(spec.c)
        use_dht = dht is not None or (momentum and dst is not None and dst.numel() > 0)
        if use_dht:
            dht = torch.zeros(n_seq, H, dv, dk, **f32) if dht is None else dht.float().contiguous()
            if momentum:
                dst = torch.zeros(n_seq, H, dv, dk, **f32) if dst is None else dst.float().contiguous()
        dy = dy.contiguous()
        dummy = eta
        gates = (la, lmu if lmu is not None else dummy, eta, delta if delta is not None else dummy)
        common = dict(K=dk, V=dv, BT=chunk_size, BIAS=BIAS_CODES[spec.bias], EPS=SMOOTH_ABS_EPS,
                      HAS_ALPHA=True, MOMENTUM=momentum, IS_VARLEN=cu_seqlens is not None)
        cu = cu_seqlens if cu_seqlens is not None else dummy
        t_arg = T * B if cu_seqlens is not None else T
        n_chunks = triton.cdiv(T, chunk_size) if cu_seqlens is None else nt_total
        grid_rest = (n_chunks, B * H) if cu_seqlens is None else (nt_total, H)

        # the reads' cotangent on the affine machinery: lq scales it by s_t, kl has none
        if mat == 1:
            s_tok = (nrm + lq_eps).pow(2.0 - qexp)
            dy_eff = (dy.float() * s_tok[..., None]).contiguous()
            ds = (dy.float() * r).sum(-1)
            gam_c = (ds * (2.0 - qexp) * (nrm + lq_eps).pow(1.0 - qexp)).contiguous()
            gam_n = (1.0 / nrm.clamp_min(_TINY)).contiguous()
        else:
            dy_eff = torch.zeros(B, T, H, dv, **f32)
            gam_c = gam_n = dummy

        # 1) per-token adjoints, forward-accumulated per chunk (writes the local chunk-start
        #    adjoints into dhs/dss at every chunk slot; the final slots come from dstate)
        nvs = triton.cdiv(dv, _launch_meta(spec, chunk_size, dk, "chunk_scan_bwd").BV)
        nvk = triton.cdiv(dv, _launch_meta(spec, chunk_size, dk, "chunk_scan_bwd_dk").BV)
        dhs = torch.zeros_like(hs)
        dss = torch.zeros_like(ss) if momentum else dhs
        dul = torch.zeros(B, T, H, dv, **f32)
        dcx = torch.zeros(nvs, B, T, H, **f32)
        dkl = torch.zeros(nvk, B, T, H, dk, **f32)  # per-value-block partials of each launch
        dql = torch.zeros(nvs, B, T, H, dk, **f32) if mat == 2 else dcx  # lq never writes dq
        # gd: the sweep maps its terms to d log alpha / d eta itself (dcx / dcs); momentum writes
        # <Gam, X0>, <Gam, S0> and the H rows for the host (_momentum_gate_grads)
        hrow = torch.zeros(nvs, B, T, H, chunk_size, **f32) if momentum else dcx
        dcs = torch.zeros(nvs, B, T, H, **f32)
        for part, name in ((0, "chunk_scan_bwd"), (1, "chunk_scan_bwd_dk")):
            scfg = _launch_meta(spec, chunk_size, dk, name)
            if n_chunks > 0:
                miras_linear_chunk_scan_bwd_kernel[(triton.cdiv(dv, scfg.BV), *grid_rest)](
                    q, k, v, *gates, hs, ss, ebuf, nbuf, dy, gam_c, gam_n,
                    dul, dkl, dql, hrow, dcx, dcs, dhs, dss, cu, idx, t_arg, H, B * T, float(spec.p), qexp, c,
                    dk, dv, BT=chunk_size, BKP=block_size(dk), BV=scfg.BV, BIAS=BIAS_CODES[spec.bias],
                    EPS=SMOOTH_ABS_EPS, HAS_ALPHA=True, MOMENTUM=momentum, IS_VARLEN=cu_seqlens is not None,
                    MAT=mat, PART=part, num_warps=scfg.num_warps, num_stages=scfg.num_stages,
                )
        # 2) du: the affine read's share (lq) plus the local one; dstate overwrites it with dE
        if spec.bias != "dot":
            if mat == 1 and n_chunks > 0:
                dcfg = _launch_meta(spec, chunk_size, dk, "chunk_bwd_du")
                dua = torch.empty(B, T, H, dv, **f32)
                miras_linear_chunk_bwd_du_kernel[(triton.cdiv(dv, dcfg.BV), *grid_rest)](
                    q, k, la, gates[1], eta, dy_eff, dua, cu, idx, t_arg, H, K=dk, V=dv, BT=chunk_size,
                    BK=dcfg.BK, BV=dcfg.BV, HAS_ALPHA=True, MOMENTUM=momentum,
                    IS_VARLEN=cu_seqlens is not None, num_warps=dcfg.num_warps, num_stages=dcfg.num_stages,
                )
                dua += dul
            else:
                dua = dul.clone()
        else:
            dua = dummy
        # 3) sequential adjoint pass with the Jacobian of materialize
        if mat == 1:
            s_slot, g_slot, n_slot = _lq_slot_terms(spec, hs)
        else:
            s_slot = g_slot = n_slot = None
        cfg = _launch_meta(spec, chunk_size, dk, "chunk_bwd_dstate_mat")
        nv = triton.cdiv(dv, cfg.BV)
        nvb = nv if (mat == 1 and spec.bias != "dot") else 1
        miras_linear_chunk_bwd_dstate_mat_kernel[(nv // nvb, n_seq * H)](
            q, k, v, *gates, hs, ebuf, nbuf, dua, dy_eff,
            dht if use_dht else dhs, dst if (use_dht and momentum) else dhs,
            dhs, dss, s_slot if s_slot is not None else dummy, g_slot if g_slot is not None else dummy,
            n_slot if n_slot is not None else dummy, cu, offs if offs is not None else dummy,
            t_arg, H, float(spec.p), qexp, c, BK=cfg.BK, BV=cfg.BV, NVB=nvb, USE_DHT=use_dht,
            MAT=mat, HAS_DY=mat == 1, **common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        dh0 = dhs[first]
        ds0 = dss[first] if momentum else None

        # 4) input gradients from the state adjoints (chunk.py's launches; PART 1 reads the
        #    chunk-start weights for the residual and adds the local du)
        hw = _materialized(spec, hs, s_slot)
        grads = {}
        launches = [(0, "chunk_bwd_dqg"), (1, "chunk_bwd_dkv"), (2, "chunk_bwd_dgate")]
        if momentum:
            launches.append((3, "chunk_bwd_dmu"))
        for part, name in launches:
            gcfg = _launch_meta(spec, chunk_size, dk, name)
            nvg = triton.cdiv(dv, gcfg.BV)
            if part == 0:
                out = dict(dq=torch.zeros(nvg, B, T, H, dk, **f32), deta=torch.zeros(nvg, B, T, H, **f32))
            elif part == 1:
                out = dict(dk=torch.zeros(nvg, B, T, H, dk, **f32), dv=torch.zeros(B, T, H, dv, **f32),
                           ddelta=torch.zeros(nvg, B, T, H, **f32) if delta is not None else None)
            elif part == 2:
                out = dict(dla=torch.zeros(nvg, B, T, H, **f32))
            else:
                out = dict(dlmu=torch.zeros(nvg, B, T, H, **f32))
            grads.update(out)
            spare = next(t for t in out.values() if t is not None)
            ptr = {n: out.get(n) if out.get(n) is not None else spare
                   for n in ("dq", "dk", "dv", "dla", "dlmu", "deta", "ddelta")}
            if n_chunks > 0:
                miras_linear_chunk_bwd_grads_kernel[(nvg, *grid_rest)](
                    q, k, v, *gates, hw if part == 1 else hs, ss, dhs, dss, ebuf, nbuf, dy_eff,
                    ptr["dq"], ptr["dk"], ptr["dv"], ptr["dla"], ptr["dlmu"], ptr["deta"], ptr["ddelta"],
                    cu, idx, t_arg, H, B * T, float(spec.p), BK=gcfg.BK, BV=gcfg.BV, PART=part, **common,
                    dul=dul, LOCAL_DU=part == 1, num_warps=gcfg.num_warps, num_stages=gcfg.num_stages,
                )
        # 5) the local terms' gate gradients, through the chunk coefficients (host)
        if momentum:
            dla_l, deta_l, dlmu_l = _momentum_gate_grads(la, lmu, eta, hrow.sum(0), dcx.sum(0), dcs.sum(0),
                                                         cu_seqlens, chunk_size)
        else:
            dla_l, deta_l, dlmu_l = dcx.sum(0), dcs.sum(0), None
        dq = grads["dq"].sum(0)
        if mat == 2:
            dq = dq + dql.sum(0)
        dk_ = grads["dk"].sum(0) + dkl.sum(0)
        dla = grads["dla"].sum(0) + dla_l
        dlmu = grads["dlmu"].sum(0) + dlmu_l if momentum else None
        deta = grads["deta"].sum(0) + deta_l
        ddelta = grads["ddelta"].sum(0) if delta is not None else None
        return (
            dq.to(q.dtype), dk_.to(k.dtype), grads["dv"].to(v.dtype), dla, dlmu, deta, ddelta,
            dh0 if ctx.has_h0 else None, ds0 if (momentum and ctx.has_s0) else None,
            None, None, None,
        )
