"""Host side of the MLP-memory Triton kernels (the jit code: ``chunk_kernels.py``, with the lq and kl
phases in ``chunk_lq_kernels.py`` / ``chunk_kl_kernels.py``, and the chunk-loop drivers that call
them in ``chunk_drivers.py``): the autograd Function that launches one driver for the forward and
one for the backward (grid ``(N * H,)``, the chunk loop inside the kernel; no host read of device
memory), and the public ``chunk_miras_mlp`` entry. Launch configs (hidden block, warps per driver)
come from ``miras_kernels.configs``; coverage from ``miras_kernels.supports``.
"""

from __future__ import annotations

import os

import torch

from miras_kernels.common.codes import BIAS_CODES, bias_scalar
from miras_kernels.common.fresh import fresh_empty, fresh_empty_like
from miras_kernels.common.mlp_scratch import scratch_floats
from miras_kernels.common.varlen import VarlenMeta
from miras_kernels.common.precision import dot_precision
from miras_kernels.configs import (MLP_NUM_STAGES, mlp_driver_shipped, mlp_driver_variant, mlp_driver_warps,
                                   mlp_hidden_block, mlp_phase_warps)
from miras_kernels.dispatch import supports
from miras_kernels.inputs import validate_inputs
from miras_kernels.miras_mlp.chunk_drivers import DRIVER_PHASES
from miras_kernels.miras_mlp.chunk_kernels import BWD_KERNELS, FWD_KERNELS, MOMENTUM_ONLY
from miras_kernels.miras_mlp.chunk_kl_kernels import KL_ARG_KERNELS, W0_PHASES, kl_phases
from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS, LQ_ARG_KERNELS


class ChunkMirasMLPFunction(torch.autograd.Function):
    """Inputs: q, k, v ``[B, T, H, D]``; la/eta/dlt/lmu ``[B, T, H]`` fp32 (log alpha, eta, Huber
    delta, log mu; stand-ins where the spec has no such gate); W1/W2 (S1/S2 with momentum)
    ``[N, H, D, E]`` / ``[N, H, E, D]`` fp32; ``cu`` ``[N+1]`` int32 token offsets, ``coff``
    ``[N+1]`` int32 chunk offsets, then the launch constants. Outputs: y ``[B, T, H, D]``, the
    final W1, W2 (and S1, S2, else empty placeholders)."""

    @staticmethod
    def forward(ctx, q, k, v, la, eta, dlt, lmu, W1, W2, S1, S2, cu, coff, nt_total, nt_max, chunk, bias, p, momentum,
                lq, lqq, lqe, kl, kc):
        B, T, H, D = q.shape
        E = W1.shape[-1]
        N = cu.numel() - 1
        J = nt_total + N
        dev = q.device
        qf, kf, vf = (x.reshape(B * T, H, D).contiguous() for x in (q, k, v))
        gates = [x.reshape(B * T, H).contiguous() for x in (la, eta, dlt, lmu)]
        idx0 = (coff[:-1].long() + torch.arange(N, device=dev))
        idx1 = (coff[1:].long() + torch.arange(N, device=dev))
        st1 = fresh_empty(J, H, D, E, dtype=torch.float32, device=dev)
        st2 = fresh_empty(J, H, E, D, dtype=torch.float32, device=dev)
        st1[idx0] = W1
        st2[idx0] = W2
        if momentum:
            ss1 = fresh_empty_like(st1)
            ss2 = fresh_empty_like(st2)
            ss1[idx0] = S1
            ss2[idx0] = S2
        else:
            ss1, ss2 = st1, st2  # never read (MOMENTUM=False)
        y = fresh_empty_like(qf)
        BH = mlp_hidden_block(D, E // D, chunk)
        SW = max(D, chunk)
        scr = fresh_empty(N * H, scratch_floats(chunk, SW, E), dtype=torch.float32, device=dev)
        # forward phases only read q, k, v, gates and states; the gradient slots get stand-ins
        args = (qf, kf, vf, *gates, y, y, y, y, *gates, st1, st2, ss1, ss2, st1, st2, ss1, ss2, st1, st2, scr, cu, coff,
                float(p))
        # lq: per-token q-norms of X1, X2 ([T, H, 2], saved for the backward; else a stand-in)
        nrm = fresh_empty(B * T, H, 2, dtype=torch.float32, device=dev) if lq else torch.zeros(0, device=dev)
        _run_steps(False, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, lq, lqq, lqe, nrm, kl, kc)
        ctx.save_for_backward(qf, kf, vf, *gates, st1, st2, ss1, ss2, cu, coff, idx0, idx1, nrm)
        ctx.meta = (B, T, H, D, E, chunk, bias, p, momentum, q.dtype, N, nt_max, lq, lqq, lqe, kl, kc)
        outs = [y.view(B, T, H, D), st1[idx1], st2[idx1]]
        if momentum:
            outs += [ss1[idx1], ss2[idx1]]
        else:
            # placeholders keep the output arity fixed; they carry no gradient
            empty = (torch.zeros(0, device=dev), torch.zeros(0, device=dev))
            ctx.mark_non_differentiable(*empty)
            outs += list(empty)
        return tuple(outs)

    @staticmethod
    def backward(ctx, dy, dW1, dW2, dS1, dS2):
        qf, kf, vf, la, eta, dlt, lmu, st1, st2, ss1, ss2, cu, coff, idx0, idx1, nrm = ctx.saved_tensors
        B, T, H, D, E, chunk, bias, p, momentum, dtype, N, nt_max, lq, lqq, lqe, kl, kc = ctx.meta
        dev = qf.device
        dst1 = torch.zeros_like(st1)
        dst2 = torch.zeros_like(st2)
        if dW1 is not None:
            dst1[idx1] = dW1.float()
        if dW2 is not None:
            dst2[idx1] = dW2.float()
        if momentum:
            dss1 = torch.zeros_like(ss1)
            dss2 = torch.zeros_like(ss2)
            if dS1 is not None:
                dss1[idx1] = dS1.float()
            if dS2 is not None:
                dss2[idx1] = dS2.float()
        else:
            dss1, dss2 = dst1, dst2
        if lq or kl:
            # per-program cotangent of the inner gradients' weights W_0 = s_0 X_0 (lq) or
            # W_0 = c softmax(Z_0) (kl)
            dw1 = fresh_empty(N * H, D * E, dtype=torch.float32, device=dev)
            dw2 = fresh_empty(N * H, D * E, dtype=torch.float32, device=dev)
        else:
            dw1, dw2 = dst1, dst2   # never read (LQ=False)
        dyf = dy.reshape(B * T, H, D).contiguous()
        dq = torch.zeros(B * T, H, D, dtype=torch.float32, device=dev)
        dk = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        dla, deta, ddlt, dlmu = (torch.zeros(B * T, H, dtype=torch.float32, device=dev) for _ in range(4))
        SW = max(D, chunk)
        BH = mlp_hidden_block(D, E // D, chunk)
        scr = fresh_empty(N * H, scratch_floats(chunk, SW, E), dtype=torch.float32, device=dev)
        args = (qf, kf, vf, la, eta, dlt, lmu, dyf, dq, dk, dv, dla, deta, ddlt, dlmu,
                st1, st2, ss1, ss2, dst1, dst2, dss1, dss2, dw1, dw2, scr, cu, coff, float(p))
        # chunk NTn-1-step of every sequence at launch step `step`
        _run_steps(True, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, lq, lqq, lqe, nrm, kl, kc)
        sh = (B, T, H, D)
        gsh = (B, T, H)
        grads = [dq.view(sh).to(dtype), dk.view(sh).to(dtype), dv.view(sh).to(dtype),
                 dla.view(gsh), deta.view(gsh), ddlt.view(gsh), dlmu.view(gsh),
                 dst1[idx0], dst2[idx0]]
        grads += [dss1[idx0], dss2[idx0]] if momentum else [None, None]
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None, None)


# bias code -> name (the driver variant tags of configs.MLP_DRIVER_SHIPPED)
_BIAS_NAMES = {code: name for name, code in BIAS_CODES.items()}
# MIRAS_MLP_PER_PHASE=1: launch every phase kernel once per chunk step from the host (the loop the
# drivers replace; same kernels, same order) -- kept to bisect a GPU difference between the two
PER_PHASE_ENV = "MIRAS_MLP_PER_PHASE"


def _per_phase() -> bool:
    value = os.environ.get(PER_PHASE_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{PER_PHASE_ENV}={value!r} is not valid: use 1 (host loop over phases) or 0")
    return value == "1"


def _arch(device: torch.device) -> int | None:
    """``sm_<arch>`` of a CUDA device as an int (80, 90; a cached property, no sync), None on CPU."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def driver_for(rev: bool, lq: bool, kl: bool, momentum: bool) -> str:
    """Name of the chunk-loop driver kernel (``chunk_drivers.DRIVER_PHASES``) of a path."""
    if kl:
        return ("mlp_bwd_kl_mom_driver" if momentum else "mlp_bwd_kl_driver") if rev else "mlp_fwd_kl_driver"
    return f"mlp_{'bwd' if rev else 'fwd'}{'_lq' if lq else ''}_driver"


def _run_steps(rev, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, lq, lqq, lqe, nrm, kl, kc):
    """Every chunk step of the forward (``rev=False``) or backward pass: the kl phase list
    (``chunk_kl_kernels``) or the affine / lq one (``chunk_kernels``, ``chunk_lq_kernels``); ``args`` as the kernels take them
    (``args[15]``, ``args[16]`` = the saved states ``st1``, ``st2``). One launch of the path's driver
    kernel (``chunk_drivers``: the chunk loop inside the kernel), or one launch per phase and step
    with ``MIRAS_MLP_PER_PHASE=1`` or on a GPU configuration whose drivers are not AOT-checked
    (``configs.mlp_driver_shipped``)."""
    # kl: the materialised chunk-start weights W_0 = c softmax(Z_0) (transient, per boundary)
    wst = (fresh_empty_like(args[15]), fresh_empty_like(args[16])) if kl else None
    variant = mlp_driver_variant(_BIAS_NAMES[bias], momentum, lq, kl)
    if not _per_phase() and mlp_driver_shipped(_arch(args[0].device), D, E // D, chunk, variant):
        name = driver_for(rev, lq, kl, momentum)
        kern = DRIVER_PHASES[name][0]
        # stand-ins for the extras a path does not read (never dereferenced there)
        w1, w2 = wst if kl else (args[15], args[16])
        kern[(N * H,)](*args, nt_max, float(lqe), nrm, w1, w2, float(kc), H=H, D=D, E=E, BT=chunk, BH=BH, SW=SW,
                       BIAS=bias, MOMENTUM=momentum, REV=rev, LQ=(rev if kl else lq), DOT_PRECISION=dot_precision(),
                       LQQ=float(lqq), num_warps=mlp_driver_warps(name, D, chunk), num_stages=MLP_NUM_STAGES)
    elif kl:
        _run_kl_phases(kl_phases(rev, momentum), args, wst, kc, nt_max, N, H, D, E, chunk, BH, SW, bias, rev, momentum)
    else:
        kernels = (BWD_LQ_KERNELS if lq else BWD_KERNELS) if rev else (FWD_LQ_KERNELS if lq else FWD_KERNELS)
        _run_phases(kernels, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, rev, lq, lqq, lqe, nrm)


def _run_phases(kernels, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, rev, lq, lqq, lqe, nrm):
    """Launch the phase kernels of every chunk step in order (grid (N*H,), one program per
    sequence and head); the lq phases also take the runtime eps, the per-token norms ``nrm``
    ([T, H, 2]) and the constexpr exponent q."""
    phases = [(n, kern) for n, kern in kernels if momentum or n not in MOMENTUM_ONLY]
    for step in range(nt_max):
        for name, kern in phases:
            extra, kw = ((lqe, nrm), {"LQQ": lqq}) if kern in LQ_ARG_KERNELS else ((), {})
            kern[(N * H,)](*args, step, *extra, H=H, D=D, E=E, BT=chunk, BH=BH, SW=SW, BIAS=bias, MOMENTUM=momentum,
                           REV=rev, LQ=lq, DOT_PRECISION=dot_precision(), num_warps=mlp_phase_warps(name, D, chunk, lq),
                           num_stages=MLP_NUM_STAGES, **kw)


def _run_kl_phases(kernels, args, wst, kc, nt_max, N, H, D, E, chunk, BH, SW, bias, rev, momentum):
    """The kl (Memora) phase list of every chunk step (``chunk_kl_kernels.kl_phases(rev, momentum)``):
    phases that take inner gradients at ``W_0`` get the materialised ``wst`` in place of the state
    ``Z``; the kl phases get ``(wst1, wst2, c)``; the shared phases run with ``LQ = rev`` (the
    backward keeps ``d W_0`` apart in ``dw1``/``dw2`` for ``kl_dw0``) and ``MOMENTUM = momentum``."""
    args_w = args[:15] + wst + args[17:]   # args[15:17] = (st1, st2)
    for step in range(nt_max):
        for name, kern in kernels:
            extra = (*wst, float(kc)) if kern in KL_ARG_KERNELS else ()
            kern[(N * H,)](*(args_w if name in W0_PHASES else args), step, *extra, H=H, D=D, E=E, BT=chunk, BH=BH,
                           SW=SW, BIAS=bias, MOMENTUM=momentum, REV=rev, LQ=rev,
                           DOT_PRECISION=dot_precision(), num_warps=mlp_phase_warps(name, D, chunk, rev),
                           num_stages=MLP_NUM_STAGES)


def chunk_miras_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                    eta: torch.Tensor, *, spec, chunk_size: int = 64, delta: torch.Tensor | None = None,
                    mu: torch.Tensor | None = None, initial_state: dict[str, torch.Tensor],
                    output_final_state: bool = False, cu_seqlens: torch.Tensor | VarlenMeta | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Chunk-parallel MLP-memory Miras layer (Triton forward and backward); same contract as
    :func:`miras_kernels.miras_memory` (checked by ``miras_kernels.inputs.validate_inputs``).

    Args:
        q, k, v: ``[B, T, H, D]`` (fp32/bf16/fp16). alpha, eta, delta, mu: ``[B, T, H]``
            (alpha may be None for retention ``none``; delta for ``huber``; mu for momentum).
        spec: :class:`miras_kernels.spec.MirasSpec` with ``memory="mlp"``.
        initial_state: ``{"W1": [N, H, D, E] or [H, D, E], "W2": [.., E, D]}`` (+ ``S_W1``,
            ``S_W2`` for momentum, zeros when left out); ``N`` = B, or the number of documents
            with ``cu_seqlens``. Gradients flow to it (broadcast dims are summed by autograd).
        cu_seqlens: ``[N+1]`` int with ``B == 1``, or a ``VarlenMeta`` (no host read; a bare tensor
            is read once in ``validate_inputs``): the state resets at each document start.
    Returns:
        ``(y [B, T, H, D] in q's dtype, final_state)`` where ``final_state`` is a dict of
        ``[N, H, ..]`` fp32 tensors when ``output_final_state`` else ``None``.
    """
    if spec.memory != "mlp":
        raise ValueError(f"chunk_miras_mlp handles memory='mlp' only (got {spec.memory!r}): "
                         "use miras_kernels.miras_linear.chunk_miras_linear")
    x = validate_inputs(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    ok, why = supports(spec, q, k, v, chunk_size=chunk_size, alpha=alpha, initial_state=initial_state)
    if not ok:
        raise ValueError(f"chunk_miras_mlp: {why}")
    B, T, H, D = q.shape
    E = D * int(spec.expansion)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    # gates the spec does not use get neutral stand-ins (log alpha = 0, delta = 1, log mu = 0)
    la = torch.zeros(B, T, H, **f32) if x.alpha is None else torch.log(x.alpha.float())
    dlt = torch.ones(B, T, H, **f32) if x.delta is None else x.delta.float()
    lmu = torch.zeros(B, T, H, **f32) if x.mu is None else torch.log(x.mu.float())
    # chunk bookkeeping from host integers and device tensors only: nothing here reads device
    # memory (no sync per layer call; the VarlenMeta holds the host copy of the offsets)
    if x.varlen is None:
        per = -(-T // chunk_size)
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
        coff = torch.arange(B + 1, dtype=torch.int32, device=dev) * per
        nt_total, nt_max = B * per, per
    else:
        cu = x.varlen.cu_seqlens
        coff = x.varlen.chunk_offsets(chunk_size)
        nt_total, nt_max = x.varlen.n_chunks(chunk_size)
    N = x.n_states

    W1, W2 = x.initial_state["W1"].float(), x.initial_state["W2"].float()
    momentum = spec.learner == "momentum"
    # lq with q = 2 is the identity map (MirasSpec.materialize): the decay kernels
    lq = spec.retention == "lq" and float(spec.q) != 2.0
    if momentum:
        # an omitted momentum state starts at zero (as on every backend)
        S1, S2 = x.state_or_zeros("S_W1").float(), x.state_or_zeros("S_W2").float()
    else:
        S1 = S2 = None
    y, W1T, W2T, S1T, S2T = ChunkMirasMLPFunction.apply(
        q, k, v, la, x.eta.float(), dlt, lmu, W1, W2, S1, S2, cu, coff, nt_total, nt_max, int(chunk_size),
        BIAS_CODES[spec.bias], bias_scalar(spec), momentum, lq, float(spec.q), float(spec.lq_eps),
        spec.retention == "kl", float(spec.c))
    final = None
    if output_final_state:
        final = {"W1": W1T, "W2": W2T}
        if momentum:
            final.update({"S_W1": S1T, "S_W2": S2T})
    return y, final
