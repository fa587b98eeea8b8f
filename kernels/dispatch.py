"""Can the Triton kernels run a call? The one place that decides, for both kernel families; used by
``miras_memory(backend="auto"|"triton")`` to fall back to the PyTorch chunked path with a
one-time warning naming the reason, and by the families' entry points, which refuse (ValueError
with the reason) what it refuses. The coverage data are the shipped-config tables of
``miras_kernels.configs``; this module imports neither triton nor a kernel family.

Linear memory (``miras_kernels.miras_linear``), ``kernel="chunk"`` (training, forward + backward):
bias dot, l2, lp, huber; retention none, decay, lq, kl; learner gd, momentum; chunk_rule exact
(the delta rule: l2, none/decay, gd; DeltaNet, Gated DeltaNet) in either step_at order;
chunk_rule minibatch in either step_at order, except ``retention="kl"`` with ``step_at="retained"``
(a non-dot bias), which falls back (its gradient points are per-token softmax blocks), and on a GPU
``step_at="retained"`` at the (learner, chunk) pairs of ``configs.LINEAR_RETAINED_UNSHIPPED``
(momentum at chunk 64: no spill-free config under Triton 3.7.1); chunk sizes 16, 32, 64; head
dims dk, dv <= 128 (independently: dv may differ from dk); fp32/fp16/bf16 inputs;
``[B, T, H]`` gates; ``initial_state``, final state, varlen -- every shape has a spill-free shipped
config. ``kernel="recurrent"`` (decoding, forward only) covers the same grid (the exact rule per
token in either step_at order), dims <= 64.

MLP memory (``miras_kernels.miras_mlp``), ``kernel="chunk"``: head dims 16/32/64/128, expansion
1/2/4, chunk sizes 16/32/64, every bias, retention and learner; an ``initial_state`` (the model's
learned weights) is required. In the interpreter every such shape runs; on a GPU only the
AOT-checked (head dim, expansion, chunk) triples of ``configs.MLP_SHIPPED`` on sm_80/sm_90.

Everything else falls back with the reason (other chunk sizes, wider heads, float64 inputs,
per-channel alpha, devices other than CUDA or the CPU interpreter).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch

from miras_kernels.configs import (LINEAR_CHUNK_SIZES, MLP_CHUNK_SIZES, MLP_EXPANSIONS, MLP_HEAD_DIMS,
                                   MLP_RETENTIONS, block_size, linear_config, linear_kernels_for,
                                   linear_retained_shipped,
                                   mlp_config_shipped)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(spec, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
             chunk_size: int = 64, kernel: str = "chunk", alpha: torch.Tensor | None = None,
             initial_state: Mapping[str, torch.Tensor] | None = None, **_unused) -> tuple[bool, str]:
    """``(True, "")`` when the Triton kernels can run this call, else ``(False, reason)``.

    Args:
        spec: a ``MirasSpec``. q: ``[B, T, H, dk]``; k like q; v: ``[B, T, H, dv]`` (k and v
            default to q's shape). chunk_size: the chunk length C. kernel: ``"chunk"``
            (training) or ``"recurrent"`` (token-by-token decoding, forward only).
        alpha: the retention gate when known (``[B, T, H, dk]`` per-channel gates have no kernel).
        initial_state: the state dict when known (memory ``mlp`` requires one).
        Other keyword arguments of ``miras_memory`` are accepted and ignored.
    """
    if kernel not in ("chunk", "recurrent"):
        raise ValueError(f"kernel={kernel!r} is not valid: use 'chunk' or 'recurrent'")
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    elif q.device.type != "cuda":
        return False, f"device {q.device.type!r} is not supported (CUDA, or CPU in the interpreter)"
    if alpha is not None and alpha.dim() == 4:
        return False, "alpha is per-channel [B, T, H, dk]: the Triton kernels take [B, T, H] gates"
    if spec.retention_chunking != "per_token":
        return False, f"retention_chunking={spec.retention_chunking!r} has no Triton kernel (the PyTorch paths compute it)"
    if spec.memory == "mlp" and (spec.chunk_rule != "minibatch" or spec.step_at != "previous"):
        return False, (f"chunk_rule={spec.chunk_rule!r}, step_at={spec.step_at!r} have no MLP Triton kernel "
                       "(the PyTorch paths compute them)")
    if (spec.memory == "linear" and spec.chunk_rule == "minibatch" and spec.steps_on_retained
            and spec.retention == "kl" and spec.bias != "dot"):
        # kl's retained gradient points c * softmax(gamma_i Z0) are a weight block per token, not
        # a per-token multiple of the chunk-start state as for decay / lq
        return False, ("retention='kl' with step_at='retained' and chunk_rule='minibatch' has no Triton kernel "
                       "(its per-token softmax gradient points; the PyTorch paths compute it)")
    if spec.memory == "mlp":
        if kernel != "chunk":
            return False, "memory='mlp': no token-recurrent Triton kernel here"
        return _mlp_chunk_supports(spec, q, chunk_size, initial_state)
    return _linear_supports(spec, q, k, v, chunk_size, kernel)


def _linear_supports(spec, q, k, v, chunk_size: int, kernel: str) -> tuple[bool, str]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dtype not in _DTYPES:
            return False, f"{name}.dtype={t.dtype}: the kernels take float32/float16/bfloat16"
    dk = q.shape[-1]
    dv = (v if v is not None else q).shape[-1]
    if dk > 128 or dv > 128:
        return False, f"head dims dk={dk}, dv={dv}: the kernels cover dims <= 128 (configs for padded dk 32/64/128)"
    if kernel == "chunk":
        if chunk_size not in LINEAR_CHUNK_SIZES:
            return False, f"chunk_size={chunk_size}: the chunk kernels cover {LINEAR_CHUNK_SIZES}"
        if (q.device.type == "cuda" and spec.chunk_rule == "minibatch" and spec.steps_on_retained
                and not linear_retained_shipped(spec.learner, chunk_size)):
            return False, (f"step_at='retained' with learner={spec.learner!r} at chunk_size={chunk_size} has no "
                           "spill-free kernel config on GPUs (kernels/configs.py LINEAR_RETAINED_UNSHIPPED)")
        for name in linear_kernels_for(spec.learner, spec.retention, spec.chunk_rule):
            if linear_config(name, chunk_size, block_size(dk), block_size(dv), False, spec.learner) is None:
                return False, (f"no spill-free shipped {name} config for chunk_size={chunk_size}, dk={dk}, dv={dv}, "
                               f"bias={spec.bias}, learner={spec.learner} (kernels/configs.py)")
    elif linear_config("recurrent_fwd", 1, block_size(dk), block_size(dv), True) is None:
        return False, f"no spill-free shipped recurrent_fwd config for dk={dk}, dv={dv} (kernels/configs.py)"
    return True, ""


def _mlp_chunk_supports(spec, q, chunk_size: int, initial_state) -> tuple[bool, str]:
    if spec.retention not in MLP_RETENTIONS:
        return False, (f"retention={spec.retention!r} has no MLP Triton kernel yet "
                       f"(covered: {', '.join(MLP_RETENTIONS)}); use the chunked backend")
    if q.dim() != 4:
        return False, f"q must be [B, T, H, D] (got {tuple(q.shape)})"
    d = q.shape[-1]
    if d not in MLP_HEAD_DIMS:
        return False, f"head dim {d} not in {MLP_HEAD_DIMS}"
    if int(spec.expansion) not in MLP_EXPANSIONS:
        return False, f"expansion {spec.expansion} not in {MLP_EXPANSIONS}"
    if d * int(spec.expansion) < 16:
        return False, "hidden width e*d must be >= 16 (tl.dot dims)"
    if chunk_size not in MLP_CHUNK_SIZES:
        return False, f"chunk_size {chunk_size} not in {MLP_CHUNK_SIZES}"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} not supported by the kernels (float32/bfloat16/float16)"
    if initial_state is None:
        return False, "memory='mlp' needs initial_state (the model's learned initial weights)"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        lq_q = float(spec.q) if spec.retention == "lq" and float(spec.q) != 2.0 else None
        return mlp_config_shipped(d, int(spec.expansion), chunk_size, 10 * major + minor, lq_q=lq_q,
                                  kl=spec.retention == "kl")
    return True, ""
