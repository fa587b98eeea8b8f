"""Host side of the MLP-memory Triton kernels: input checks, the autograd Function, the public
``chunk_miras_mlp`` entry and ``supports`` (the dispatcher's fallback test)."""

from __future__ import annotations

import os

import torch

from .chunk import BIAS_CODES, BWD_KERNELS, FWD_KERNELS, MOMENTUM_ONLY, bias_scalar, scratch_floats
from .chunk_kl import KL_ARG_KERNELS, W0_PHASES, kl_phases
from .chunk_lq import BWD_LQ_KERNELS, FWD_LQ_KERNELS, LQ_ARG_KERNELS

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_EXPANSIONS = (1, 2, 4)
SUPPORTED_CHUNKS = (16, 32, 64)
SUPPORTED_RETENTIONS = ("none", "decay", "lq", "kl")
# Candidate GPU configurations (head dim, expansion, chunk size); 340M: D = 64, e = 4, C = 64.
CANDIDATES = [(d, e, c) for d in (32, 64, 128) for e in (2, 4) for c in (16, 64)]
SHIPPED_ARCHS = (80, 90)
# Candidates the AOT report found spilling (on either arch): not shipped, supports() falls back
# on a GPU naming the reason (dict value). Empty: d = 128 with C = 64 spilled 48-4820 bytes in
# fwd hidden and bwd readout2 / state_dk / mid / first / lq_adj1 ([64, 128] fp32 tiles, 32
# registers per thread each at 8 warps) until those phases were restructured (CTA-barrier splits,
# a second hidden-block loop for dk, see chunk.py) and given per-phase warps (phase_warps).
NOT_SHIPPED: dict[tuple[int, int, int], str] = {}
# Configurations compiled and checked ahead of time (kernels.miras_mlp.aot, tools/kernel_report.py
# --family mlp): every phase kernel is spill-free with shared memory in bounds on sm_80 and sm_90.
SHIPPED = [c for c in CANDIDATES if c not in NOT_SHIPPED]
# No software pipelining: the hidden-block loops are compute bound and every pipeline stage would
# buffer weight tiles in shared memory and keep extra registers live (spills on sm_80/sm_90).
NUM_STAGES = 1


def hidden_block(d: int, e: int, chunk: int) -> int:
    """Tile of the hidden dimension ``e*d`` kept on chip at once. Smaller for wide heads and big
    chunks so the ``[C, BH]`` tiles of the backward fit in registers (checked by the AOT report)."""
    hidden = d * e
    bh = 16 if (d >= 64 or chunk >= 64) else 32
    return max(16, min(bh, hidden))


def num_warps_for(d: int, chunk: int) -> int:
    """Default warps of the phase kernels (see :func:`phase_warps`)."""
    return 8 if (d >= 64 or chunk >= 64) else 4


def phase_warps(name: str, d: int, chunk: int, lq: bool = False) -> int:
    """Warps of one phase kernel (``name`` as in ``chunk.FWD_KERNELS``/``BWD_KERNELS`` or
    ``chunk_lq.FWD_LQ_KERNELS``/``BWD_LQ_KERNELS``; ``lq``: compiled with ``LQ=True``); chosen
    with the AOT report so that no phase spills on sm_80/sm_90."""
    if name in ("mlp_bwd_read", "mlp_fwd_read"):
        # at 8 warps ptxas held this phase to 128 registers on sm_80 and spilled (d = 64, C = 64)
        return 4
    if name == "mlp_bwd_lq_adj2k":
        # at 8 warps ptxas spilled 40 bytes at 80 registers on sm_80 (d = 64, C = 64, gd); 4: none
        return 4
    if name in ("mlp_fwd_kl_o1", "mlp_bwd_kl_o1", "mlp_bwd_kl_adj2q"):
        # kl token sweeps: at 8 warps ptxas held them to 64-128 registers and spilled 8-32 bytes
        # (d = 64: kl_o1 on sm_80/sm_90; d = 32, C = 64: kl_adj2q on sm_90); 4 warps: none. d = 128,
        # C = 64: at 4 warps kl_o1 spilled 2.1-2.3 KB (its three [C, D] online-softmax tiles) and
        # kl_adj2q 64-72 bytes (momentum, sm_80); 8 warps: none
        return 8 if (d >= 128 and chunk >= 64) else 4
    if name == "mlp_bwd_kl_adj2":
        # d = 64, C = 16, momentum: at 8 warps ptxas held it to 128 registers on sm_90 and spilled
        # 48 bytes; 4 warps: none for d = 64 (d = 128: 4 warps spilled 48 bytes, 8 none)
        return 4 if d == 64 else num_warps_for(d, chunk)
    if name == "mlp_bwd_kl_adj2k":
        # d = 64, C = 64: at 8 warps 72-88 bytes spilled at 80 registers on sm_80; d = 32 and
        # d = 128: at 4 warps 8-32 bytes spilled (64-205 registers); 8 warps: none
        return 4 if d == 64 else 8
    if d >= 128 and chunk >= 64:
        # d = 128, C = 64: [64, 128] fp32 tiles; measured per phase (AOT report, sm_80/sm_90)
        if name in ("mlp_fwd_hidden", "mlp_bwd_first"):
            # 8 warps spilled 128-200 (hidden, sm_90) / 56-288 bytes (first's dz loop); 4: none
            return 4
        if name == "mlp_bwd_mid":
            # lp/huber: 8 warps spilled 16-264 bytes even with the bias and LN parts split by
            # barriers; 16 warps (128 registers each): none
            return 16
    if name == "mlp_bwd_first" and d == 64 and chunk == 16:
        # with the dk loop split off, 8 warps held it to 128 registers on sm_80 and spilled 24
        # bytes (l2, gd and momentum); 4 warps: none (at d = 64, C = 64 4 warps spill with lq/kl)
        return 4
    if lq and name == "mlp_bwd_state_dk":
        # LQ (lq, and kl's backward): 8 warps everywhere since the momentum terms moved to their
        # own hidden-block loop (4 warps spilled 8 bytes on sm_90 at d = 32, C = 16 with momentum
        # and 104-140 bytes at d = 128, C = 64; before the split 8 warps spilled 24 bytes at
        # d = 64, C = 16 on sm_80)
        return 8
    return num_warps_for(d, chunk)


def supports(spec, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
             chunk_size: int = 64, initial_state=None, **_) -> tuple[bool, str]:
    """Whether :func:`chunk_miras_mlp` covers this call; ``(False, reason)`` tells the dispatcher
    to fall back to the PyTorch chunked path (the reason names what is missing)."""
    if spec.memory != "mlp":
        return False, f"kernels.miras_mlp handles memory='mlp' only (got {spec.memory!r})"
    if spec.retention not in SUPPORTED_RETENTIONS:
        return False, (f"retention={spec.retention!r} has no MLP Triton kernel yet "
                       f"(covered: {', '.join(SUPPORTED_RETENTIONS)}); use the chunked backend")
    if q.dim() != 4:
        return False, f"q must be [B, T, H, D] (got {tuple(q.shape)})"
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    if q.device.type not in ("cpu", "cuda"):
        return False, f"device {q.device.type!r} is not supported (CUDA, or CPU in the interpreter)"
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return False, f"head dim {d} not in {SUPPORTED_HEAD_DIMS}"
    if int(spec.expansion) not in SUPPORTED_EXPANSIONS:
        return False, f"expansion {spec.expansion} not in {SUPPORTED_EXPANSIONS}"
    if d * int(spec.expansion) < 16:
        return False, "hidden width e*d must be >= 16 (tl.dot dims)"
    if chunk_size not in SUPPORTED_CHUNKS:
        return False, f"chunk_size {chunk_size} not in {SUPPORTED_CHUNKS}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"dtype {q.dtype} not supported by the kernels (float32/bfloat16/float16)"
    if initial_state is None:
        return False, "memory='mlp' needs initial_state (the model's learned initial weights)"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        lq_q = float(spec.q) if spec.retention == "lq" and float(spec.q) != 2.0 else None
        return gpu_config_supported(d, int(spec.expansion), chunk_size, 10 * major + minor, lq_q=lq_q,
                                    kl=spec.retention == "kl")
    return True, ""


# exponents q of the lq retention compiled and checked ahead of time (aot.LQ_VARIANTS)
SHIPPED_LQ_Q = (4.0,)


# Configurations where the kl phases spill although the shared phases may ship (AOT report, checked
# with the kl entries of aot.aot_specs); kl falls back there on a GPU. Empty: d = 128 with C = 64
# spilled (kl_adj1 with momentum 128 bytes on sm_80 at 8 warps; kl_o1 2.1-2.3 KB and kl_adj2q
# 64-72 bytes at 4 warps) until kl_adj1's d(h_i) / d Gam part moved to kl_adj1h and kl_o1 /
# kl_adj2q got 8 warps there (phase_warps).
KL_NOT_SHIPPED: dict[tuple[int, int, int], str] = {}
# (head dim, expansion, chunk) where the kl (Memora) phases, gd and momentum, are compiled and
# checked ahead of time (aot.aot_specs, aot.KL_VARIANTS; 0 spills on sm_80/sm_90): every shipped
# config but KL_NOT_SHIPPED. (d = 128, C = 16 spilled 592-720 bytes in kl_adj2 until its dk part
# moved to kl_adj2k.)
SHIPPED_KL = tuple(c for c in SHIPPED if c not in KL_NOT_SHIPPED)


def gpu_config_supported(d: int, e: int, chunk: int, arch: int, lq_q: float | None = None,
                         kl: bool = False) -> tuple[bool, str]:
    """On a GPU only the AOT-checked configurations run (zero register spills, shared memory in
    bounds); the interpreter (CPU) runs every supported shape. ``lq_q``: the exponent of the lq
    retention (its phases are compiled with q as a constexpr), None otherwise; ``kl``: the kl
    (Memora) phases, AOT-checked for :data:`SHIPPED_KL` only."""
    if arch not in SHIPPED_ARCHS:
        return False, (f"sm_{arch}: the MLP kernels are compiled and checked for "
                       f"{', '.join(f'sm_{a}' for a in SHIPPED_ARCHS)} only")
    why = NOT_SHIPPED.get((d, e, chunk))
    if why:
        return False, f"not shipped: {why}"
    if (d, e, chunk) not in SHIPPED:
        return False, (f"head dim {d}, expansion {e}, chunk_size {chunk} is not a shipped (AOT-checked) "
                       f"configuration: see kernels.miras_mlp.api.SHIPPED")
    if kl and (d, e, chunk) in KL_NOT_SHIPPED:
        return False, f"retention='kl' not shipped: {KL_NOT_SHIPPED[(d, e, chunk)]}"
    if kl and (d, e, chunk) not in SHIPPED_KL:
        return False, (f"retention='kl' is AOT-checked on a GPU for (head dim, expansion, chunk) in "
                       f"{list(SHIPPED_KL)} only (got {(d, e, chunk)})")
    if lq_q is not None and lq_q not in SHIPPED_LQ_Q:
        return False, (f"retention='lq' with q={lq_q:g} is not AOT-checked on a GPU "
                       f"(shipped q: {', '.join(f'{x:g}' for x in SHIPPED_LQ_Q)})")
    return True, ""


def _gate(x: torch.Tensor | None, like: torch.Tensor, fill: float) -> torch.Tensor:
    if x is None:
        return torch.full(like.shape[:3], fill, dtype=torch.float32, device=like.device)
    return x.float()


class _ChunkMirasMLP(torch.autograd.Function):
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
        st1 = torch.empty(J, H, D, E, dtype=torch.float32, device=dev)
        st2 = torch.empty(J, H, E, D, dtype=torch.float32, device=dev)
        st1[idx0] = W1
        st2[idx0] = W2
        if momentum:
            ss1 = torch.empty_like(st1)
            ss2 = torch.empty_like(st2)
            ss1[idx0] = S1
            ss2[idx0] = S2
        else:
            ss1, ss2 = st1, st2  # never read (MOMENTUM=False)
        y = torch.empty_like(qf)
        BH = hidden_block(D, E // D, chunk)
        SW = max(D, chunk)
        scr = torch.empty(N * H, scratch_floats(chunk, SW, E), dtype=torch.float32, device=dev)
        # forward phases only read q, k, v, gates and states; the gradient slots get stand-ins
        args = (qf, kf, vf, *gates, y, y, y, y, *gates, st1, st2, ss1, ss2, st1, st2, ss1, ss2, st1, st2, scr, cu, coff,
                float(p))
        # lq: per-token q-norms of X1, X2 ([T, H, 2], saved for the backward; else a stand-in)
        nrm = torch.empty(B * T, H, 2, dtype=torch.float32, device=dev) if lq else torch.zeros(0, device=dev)
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
            # per-program cotangent of the inner gradients' weights W_0 = s_0 X_0 (chunk_lq) or
            # W_0 = c softmax(Z_0) (chunk_kl)
            dw1 = torch.empty(N * H, D * E, dtype=torch.float32, device=dev)
            dw2 = torch.empty(N * H, D * E, dtype=torch.float32, device=dev)
        else:
            dw1, dw2 = dst1, dst2   # never read (LQ=False)
        dyf = dy.reshape(B * T, H, D).contiguous()
        dq = torch.zeros(B * T, H, D, dtype=torch.float32, device=dev)
        dk = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        dla, deta, ddlt, dlmu = (torch.zeros(B * T, H, dtype=torch.float32, device=dev) for _ in range(4))
        SW = max(D, chunk)
        BH = hidden_block(D, E // D, chunk)
        scr = torch.empty(N * H, scratch_floats(chunk, SW, E), dtype=torch.float32, device=dev)
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


def _run_steps(rev, args, nt_max, N, H, D, E, chunk, BH, SW, bias, momentum, lq, lqq, lqe, nrm, kl, kc):
    """Every chunk step of the forward (``rev=False``) or backward pass: the kl phase list
    (``chunk_kl``) or the affine / lq one (``chunk``, ``chunk_lq``); ``args`` as the kernels take them
    (``args[15]``, ``args[16]`` = the saved states ``st1``, ``st2``)."""
    if kl:
        # kl: the materialised chunk-start weights W_0 = c softmax(Z_0) (transient, per boundary)
        wst = (torch.empty_like(args[15]), torch.empty_like(args[16]))
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
                           REV=rev, LQ=lq, num_warps=phase_warps(name, D, chunk, lq), num_stages=NUM_STAGES, **kw)


def _run_kl_phases(kernels, args, wst, kc, nt_max, N, H, D, E, chunk, BH, SW, bias, rev, momentum):
    """The kl (Memora) phase list of every chunk step (``chunk_kl.kl_phases(rev, momentum)``):
    phases that take inner gradients at ``W_0`` get the materialised ``wst`` in place of the state
    ``Z``; the kl phases get ``(wst1, wst2, c)``; the shared phases run with ``LQ = rev`` (the
    backward keeps ``d W_0`` apart in ``dw1``/``dw2`` for ``kl_dw0``) and ``MOMENTUM = momentum``."""
    args_w = args[:15] + wst + args[17:]   # args[15:17] = (st1, st2)
    for step in range(nt_max):
        for name, kern in kernels:
            extra = (*wst, float(kc)) if kern in KL_ARG_KERNELS else ()
            kern[(N * H,)](*(args_w if name in W0_PHASES else args), step, *extra, H=H, D=D, E=E, BT=chunk, BH=BH,
                           SW=SW, BIAS=bias, MOMENTUM=momentum, REV=rev, LQ=rev,
                           num_warps=phase_warps(name, D, chunk, rev), num_stages=NUM_STAGES)


def chunk_miras_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                    eta: torch.Tensor, *, spec, chunk_size: int = 64, delta: torch.Tensor | None = None,
                    mu: torch.Tensor | None = None, initial_state: dict[str, torch.Tensor],
                    output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """Chunk-parallel MLP-memory Miras layer (Triton forward and backward).

    Args:
        q, k, v: ``[B, T, H, D]`` (fp32/bf16/fp16). alpha, eta, delta, mu: ``[B, T, H]``
            (alpha may be None for retention ``none``; delta for ``huber``; mu for momentum).
        spec: :class:`miras_kernels.spec.MirasSpec` with ``memory="mlp"``.
        initial_state: ``{"W1": [N|1, H, D, E] or [H, D, E], "W2": [.., E, D]}`` (+ ``S_W1``,
            ``S_W2`` for momentum); ``N`` = B, or the number of documents with ``cu_seqlens``.
            Gradients flow to it (broadcast dims are summed by autograd).
        cu_seqlens: ``[N+1]`` int with ``B == 1``: the state resets at each document start.
    Returns:
        ``(y [B, T, H, D] in q's dtype, final_state)`` where ``final_state`` is a dict of
        ``[N, H, ..]`` fp32 tensors when ``output_final_state`` else ``None``.
    """
    ok, why = supports(spec, q, k, v, chunk_size=chunk_size, initial_state=initial_state)
    if not ok:
        raise ValueError(f"chunk_miras_mlp: {why}")
    B, T, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [B, T, H, D] (got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    E = D * int(spec.expansion)
    dev = q.device
    if spec.retention == "none":
        la = torch.zeros(B, T, H, dtype=torch.float32, device=dev)
    else:
        if alpha is None:
            raise ValueError(f"retention={spec.retention!r} needs alpha [B, T, H]")
        la = torch.log(alpha.float())
    if spec.needs_delta and delta is None:
        raise ValueError("bias='huber' needs delta [B, T, H]")
    if spec.needs_mu and mu is None:
        raise ValueError("learner='momentum' needs mu [B, T, H]")
    dlt = _gate(delta if spec.needs_delta else None, q, 1.0)
    lmu = torch.log(mu.float()) if spec.needs_mu else _gate(None, q, 0.0)
    eta = eta.float()
    if cu_seqlens is None:
        N = B
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (got B={B}): pack the documents along T")
        cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        N = cu.numel() - 1
        if int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}")
    lens = (cu[1:] - cu[:-1]).long()
    counts = (lens + chunk_size - 1) // chunk_size
    coff64 = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    coff64[1:] = torch.cumsum(counts, 0)
    nt_total = int(coff64[-1])
    nt_max = int(counts.max()) if N > 0 else 0
    coff = coff64.to(torch.int32)

    def _state(name: str, shape: tuple[int, int]) -> torch.Tensor:
        if name not in initial_state and name.startswith("S_"):
            # omitted momentum buffers start at zero (as in miras_memory)
            return torch.zeros(N, H, *shape, dtype=torch.float32, device=dev)
        if name not in initial_state:
            raise ValueError(f"initial_state lacks {name!r}: memory='mlp' needs keys {spec.state_keys()}")
        x = initial_state[name]
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[-2:] != shape or x.shape[1] != H or x.shape[0] not in (1, N):
            raise ValueError(f"initial_state[{name!r}] must be [{N}, {H}, {shape[0]}, {shape[1]}] or [{H}, ...] (got {tuple(initial_state[name].shape)})")
        return x.float().expand(N, H, *shape)

    W1 = _state("W1", (D, E))
    W2 = _state("W2", (E, D))
    momentum = spec.learner == "momentum"
    # lq with q = 2 is the identity map (MirasSpec.materialize): the decay kernels
    lq = spec.retention == "lq" and float(spec.q) != 2.0
    if momentum:
        S1, S2 = _state("S_W1", (D, E)), _state("S_W2", (E, D))
    else:
        S1 = S2 = None
    y, W1T, W2T, S1T, S2T = _ChunkMirasMLP.apply(
        q, k, v, la, eta, dlt, lmu, W1, W2, S1, S2, cu, coff, nt_total, nt_max, int(chunk_size),
        BIAS_CODES[spec.bias], bias_scalar(spec), momentum, lq, float(spec.q), float(spec.lq_eps),
        spec.retention == "kl", float(spec.c))
    final = None
    if output_final_state:
        final = {"W1": W1T, "W2": W2T}
        if momentum:
            final.update({"S_W1": S1T, "S_W2": S2T})
    return y, final


__all__ = ["chunk_miras_mlp", "supports", "gpu_config_supported", "hidden_block", "num_warps_for",
           "phase_warps", "CANDIDATES", "SHIPPED", "SHIPPED_ARCHS", "SHIPPED_LQ_Q", "SHIPPED_KL", "NOT_SHIPPED"]
