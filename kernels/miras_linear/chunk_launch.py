"""Host-side launches shared by the two autograd Functions of the linear family (``chunk.py``: the
affine retentions; ``chunk_mat.py``: lq and kl): the per-call launch arguments, the sequential
state pass, the chunk-parallel output and input-gradient launches, and their shipped configs
(``miras_kernels.configs``). The jit code is ``chunk_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.fresh import fresh_empty
import triton

from miras_kernels.common.codes import BIAS_CODES
from miras_kernels.common.precision import dot_precision
from miras_kernels.common.varlen import chunk_indices, chunk_offsets
from miras_kernels.configs import KernelConfig, block_size, linear_config
from miras_kernels.miras_linear.chunk_kernels import (
    miras_linear_chunk_bwd_du_kernel,
    miras_linear_chunk_bwd_grads_kernel,
    miras_linear_chunk_out_kernel,
    miras_linear_chunk_state_kernel,
)


def launch_meta(spec, chunk_size: int, dk: int, kernel: str) -> KernelConfig:
    """The shipped config of one chunk kernel for this call (``supports`` checked it exists)."""
    cfg = linear_config(kernel, chunk_size, block_size(dk), 0, False, spec.learner)
    if cfg is None:
        raise ValueError(f"no shipped {kernel} config for chunk_size={chunk_size}, dk={dk}: "
                         "check miras_kernels.supports before launching")
    return cfg


def state_slots(cu_seqlens, offs, nt_total: int, B: int, T: int, chunk_size: int, dev) -> tuple[torch.Tensor, int]:
    """(first state slot of every sequence ``[N]`` int64, total slots NS): a sequence of n chunks
    owns n + 1 slots (chunk starts, then the final state). ``offs``/``nt_total``: the chunk offsets
    and the host chunk count of ``common.varlen.chunk_offsets`` (no device read here)."""
    if cu_seqlens is None:
        per = (T + chunk_size - 1) // chunk_size + 1
        return torch.arange(B, device=dev, dtype=torch.int64) * per, B * per
    n = offs.numel() - 1
    first = offs[:-1].to(torch.int64) + torch.arange(n, device=dev, dtype=torch.int64)
    return first, nt_total + n


@dataclass
class LaunchArgs:
    """What every launch of one call shares: the gate pointers (``la, lmu, eta, delta``; absent
    ones replaced by a never-read stand-in), the constexprs common to the chunk kernels, the
    cu_seqlens pointer, the token-count argument and the chunk-parallel grid (without its
    value-block axis). ``retained``: the kernels' ``RETAINED`` variant runs (``step_at="retained"``
    with mini-batch GD, decay gates and a state-dependent bias; for ``dot`` both orders agree)."""

    gates: tuple
    common: dict
    cu: torch.Tensor
    t_arg: int
    grid_rest: tuple[int, int]
    dummy: torch.Tensor
    retained: bool = False


def launch_args(spec, q, v, la, lmu, eta, delta, cu_seqlens, chunk_size: int) -> LaunchArgs:
    """The launch arguments every kernel of one call shares (q ``[B, T, H, dk]``, v ``[B, T, H, dv]``,
    gates ``[B, T, H]`` fp32 or None, ``cu_seqlens`` ``[N+1]`` int32 or None)."""
    B, T, H, dk = q.shape
    dummy = eta
    gates = tuple(x if x is not None else dummy for x in (la, lmu, eta, delta))
    common = dict(K=dk, V=v.shape[-1], BT=chunk_size, BIAS=BIAS_CODES[spec.bias], EPS=spec.bias_eps,
                  HAS_ALPHA=la is not None, MOMENTUM=spec.learner == "momentum",
                  IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=dot_precision())
    nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)[1]
    grid_rest = (triton.cdiv(T, chunk_size), B * H) if cu_seqlens is None else (nt_total, H)
    retained = (spec.steps_on_retained and spec.chunk_rule == "minibatch" and spec.bias != "dot"
                and la is not None)
    return LaunchArgs(gates, common, cu_seqlens if cu_seqlens is not None else dummy,
                      T * B if cu_seqlens is not None else T, grid_rest, dummy, retained)


def launch_input_grads(spec, chunk_size: int, a: LaunchArgs, q, k, v, hs, ss, dhs, dss, ebuf, nbuf, dy,
                       idx, *, hs_residual=None, dul=None, n0s=None) -> dict:
    """Every input gradient from the state adjoints, one program per (value block, chunk, head),
    in up to four launches (PART 0: dq, d eta; 1: dk, dv, d delta; 2: d log alpha; 3: d log mu),
    so none holds the whole backward live set. Per-value-block partials are summed here.

    ``hs_residual`` (lq/kl): the chunk-start weights for the residual's ``dk += dE W0`` (PART 1),
    ``dul``: the per-token reads' share of dL/du added in PART 1. ``a.retained``: PART 1 also
    adds the share of d log alpha through the retained gradient points (``n0s`` ``[NS, H]``: the
    chunk-start q-norms, lq only; ``hs`` is then the free variable). Returns fp32 ``dq, dk``
    ``[B,T,H,dk]``, ``dv`` ``[B,T,H,dv]``, ``deta`` and (None when unused) ``ddelta, dla, dlmu``
    ``[B,T,H]``."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    has_alpha, momentum = a.common["HAS_ALPHA"], a.common["MOMENTUM"]
    has_delta = a.gates[3] is not a.dummy
    grads = dict(dla=None, dlmu=None, ddelta=None)
    launches = [(0, "chunk_bwd_dqg"), (1, "chunk_bwd_dkv")]
    if has_alpha:
        launches.append((2, "chunk_bwd_dgate"))
    if momentum:
        launches.append((3, "chunk_bwd_dmu"))
    for part, name in launches:
        cfg = launch_meta(spec, chunk_size, dk, name)
        nv = triton.cdiv(dv, cfg.BV)
        if part == 0:
            out = dict(dq=torch.zeros(nv, B, T, H, dk, **f32), deta=torch.zeros(nv, B, T, H, **f32))
        elif part == 1:
            out = dict(dk=torch.zeros(nv, B, T, H, dk, **f32), dv=torch.zeros(B, T, H, dv, **f32),
                       ddelta=torch.zeros(nv, B, T, H, **f32) if has_delta else None,
                       dla_ret=torch.zeros(nv, B, T, H, **f32) if a.retained else None)
        elif part == 2:
            out = dict(dla=torch.zeros(nv, B, T, H, **f32))
        else:
            out = dict(dlmu=torch.zeros(nv, B, T, H, **f32))
        spare = next(t for t in out.values() if t is not None)  # pointer for outputs this part never writes
        ptr = {n: out.get(n) if out.get(n) is not None else spare
               for n in ("dq", "dk", "dv", "dla", "dlmu", "deta", "ddelta", "dla_ret")}
        if a.grid_rest[0] > 0:
            miras_linear_chunk_bwd_grads_kernel[(nv, *a.grid_rest)](
                q, k, v, *a.gates, hs_residual if (part == 1 and hs_residual is not None) else hs, ss, dhs, dss,
                ebuf, nbuf, dy,
                ptr["dq"], ptr["dk"], ptr["dv"], ptr["dla"], ptr["dlmu"], ptr["deta"], ptr["ddelta"],
                a.cu, idx, a.t_arg, H, B * T, float(spec.p), BK=cfg.BK, BV=cfg.BV, PART=part, **a.common,
                dul=dul, LOCAL_DU=part == 1 and dul is not None,
                dlr=ptr["dla_ret"] if part == 1 and a.retained else spare,
                n0s=n0s if n0s is not None else a.dummy, qexp=float(spec.q), lq_eps=float(spec.lq_eps),
                RETAINED=part == 1 and a.retained, LQ=part == 1 and a.retained and n0s is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        grads.update({n: (t if n == "dv" or t is None else t.sum(0)) for n, t in out.items()})
    if a.retained:
        grads["dla"] = grads["dla"] + grads["dla_ret"]  # retained implies alpha, so PART 2 ran
    grads.pop("dla_ret", None)
    return grads


@dataclass
class StatePass:
    """Result of the sequential state pass: states at every chunk start + final (``hs``, ``ss``
    ``[NS, H, dv, dk]``), residual ``E`` and huber norm (or stand-ins), varlen chunk offsets and
    indices, each sequence's first and last slot."""

    hs: torch.Tensor
    ss: torch.Tensor
    ebuf: torch.Tensor
    nbuf: torch.Tensor
    offs: torch.Tensor | None
    idx: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    def final_states(self, momentum: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_T, S_T)`` per sequence; S_T is an empty placeholder without momentum."""
        st = self.ss[self.last] if momentum else torch.zeros(0, dtype=torch.float32, device=self.hs.device)
        return self.hs[self.last], st


def run_state_pass(spec, chunk_size: int, a: LaunchArgs, q, k, v, h0, s0, cu_seqlens, mat: int = 0) -> StatePass:
    """The sequential pass over chunks (``chunk_state``): one program per (value-block group,
    sequence * head); huber and lq (``mat`` 1, whose chunk-start norm spans the state) loop over
    every value block in one program per head. ``mat`` 2 = kl (see ``chunk_mat_kernels``)."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offs, nt_total = chunk_offsets(cu_seqlens, B, T, chunk_size)
    first, n_slots = state_slots(cu_seqlens, offs, nt_total, B, T, chunk_size, q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    hs = fresh_empty(n_slots, H, dv, dk, **f32)
    ss = fresh_empty(n_slots, H, dv, dk, **f32) if spec.learner == "momentum" else hs
    ebuf = fresh_empty(B, T, H, dv, **f32) if spec.bias != "dot" else a.dummy
    nbuf = fresh_empty(B, T, H, **f32) if spec.bias == "huber" else a.dummy
    cfg = launch_meta(spec, chunk_size, dk, "chunk_state")
    nv = triton.cdiv(dv, cfg.BV)
    nvb = nv if (spec.bias == "huber" or (mat == 1 and spec.bias != "dot")) else 1
    miras_linear_chunk_state_kernel[(nv // nvb, n_seq * H)](
        k, v, *a.gates, h0 if h0 is not None else hs, s0 if s0 is not None else ss,
        hs, ss, ebuf, nbuf, a.cu, offs if offs is not None else a.dummy,
        a.t_arg, H, float(spec.p), BK=cfg.BK, BV=cfg.BV, NVB=nvb, USE_H0=h0 is not None,
        qexp=float(spec.q), lq_eps=float(spec.lq_eps), c=float(spec.c), MAT=mat, RETAINED=a.retained, **a.common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    idx = a.dummy if cu_seqlens is None else chunk_indices(cu_seqlens, chunk_size)
    # final state = the last slot of every sequence (first slot + its chunk count)
    last = first + ((T + chunk_size - 1) // chunk_size if cu_seqlens is None else (offs[1:] - offs[:-1]).long())
    return StatePass(hs, ss, ebuf, nbuf, offs, idx, first, last)


def launch_chunk_out(spec, chunk_size: int, a: LaunchArgs, q, k, v, sp: StatePass, out: torch.Tensor) -> None:
    """The affine reads ``exp(L) Q W0^T [+ c Q S0^T] - ((Q K^T) * G * eta) U`` into ``out``
    ``[B, T, H, dv]`` (any float dtype), chunk-parallel."""
    cfg = launch_meta(spec, chunk_size, q.shape[-1], "chunk_out")
    if a.grid_rest[0] > 0:
        miras_linear_chunk_out_kernel[(triton.cdiv(v.shape[-1], cfg.BV), *a.grid_rest)](
            q, k, v, *a.gates, sp.hs, sp.ss, sp.ebuf, sp.nbuf, out, a.cu, sp.idx, a.t_arg, q.shape[2],
            float(spec.p), BK=cfg.BK, BV=cfg.BV, **a.common, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def final_state_cotangents(dht, dst, momentum: bool, shape: tuple, device) -> tuple:
    """``(use_dht, dX_T, dS_T)``: whether the final states got a gradient, and the fp32
    cotangents (zeros for the one that got none) the adjoint pass starts from."""
    use = dht is not None or (momentum and dst is not None and dst.numel() > 0)
    if not use:
        return False, None, None
    zeros = dict(dtype=torch.float32, device=device)
    dht = torch.zeros(shape, **zeros) if dht is None else dht.float().contiguous()
    if momentum:
        dst = torch.zeros(shape, **zeros) if dst is None else dst.float().contiguous()
    return True, dht, dst


def launch_bwd_du(spec, chunk_size: int, a: LaunchArgs, q, k, dy, idx) -> torch.Tensor:
    """``-(A^T dy)`` ``[B, T, H, dv]`` fp32, the part of the residual's adjoint that does not depend
    on the carried state adjoint (chunk-parallel, so the sequential pass holds no [C, C] tile)."""
    B, T, H, dk = q.shape
    dv = dy.shape[-1]
    dua = fresh_empty(B, T, H, dv, dtype=torch.float32, device=q.device)
    if a.grid_rest[0] > 0:
        cfg = launch_meta(spec, chunk_size, dk, "chunk_bwd_du")
        miras_linear_chunk_bwd_du_kernel[(triton.cdiv(dv, cfg.BV), *a.grid_rest)](
            q, k, a.gates[0], a.gates[1], a.gates[2], dy, dua, a.cu, idx, a.t_arg, H, K=dk, V=dv, BT=chunk_size,
            BK=cfg.BK, BV=cfg.BV, HAS_ALPHA=a.common["HAS_ALPHA"], MOMENTUM=a.common["MOMENTUM"],
            IS_VARLEN=a.common["IS_VARLEN"], DOT_PRECISION=a.common["DOT_PRECISION"],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dua
