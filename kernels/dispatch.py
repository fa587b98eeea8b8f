"""Can the Triton kernels run a call? Used by ``miras_memory(backend="auto"|"triton")`` to fall
back to the PyTorch path with a one-time warning naming the reason.

Memory ``mlp`` is delegated to ``kernels.miras_mlp.supports`` (a separate kernel family).

Coverage (``kernel="chunk"``, training, forward + backward): memory ``linear``; bias dot, l2, lp,
huber; retention none, decay, lq, kl; learner gd, momentum; chunk sizes 16, 32, 64; head dims
dk, dv <= 128 (independently: dv may differ from dk); fp32/fp16/bf16 inputs; ``initial_state``,
final state, varlen; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` -- every shape has
a spill-free shipped config (``kernels/configs.py``). Everything else falls back with the reason:
other chunk sizes, head dims > 128, float64 inputs.

``kernel="recurrent"`` (decoding, forward only) covers the same grid.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from miras_kernels.configs import CHUNK_SIZES, block_size, kernels_for, pick_config

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(spec, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
             chunk_size: int = 64, kernel: str = "chunk", **kwargs) -> tuple[bool, str]:
    """``(True, "")`` when the Triton kernels can run this call, else ``(False, reason)``.

    Args:
        spec: a ``MirasSpec``. q: ``[B, T, H, dk]``; k like q; v: ``[B, T, H, dv]`` (k and v
        default to q's shape). chunk_size: the chunk length C. kernel: ``"chunk"`` (training)
        or ``"recurrent"`` (token-by-token decoding, forward only). Further keyword arguments
        (e.g. ``initial_state``) are passed to ``kernels.miras_mlp.supports`` for memory ``mlp``.
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
    if spec.memory == "mlp":
        # the MLP-memory kernels (kernels/miras_mlp, another family) decide for themselves
        if kernel != "chunk":
            return False, "memory='mlp': no token-recurrent Triton kernel here"
        from miras_kernels.miras_mlp import supports as mlp_supports

        return mlp_supports(spec, q, k, v, chunk_size=chunk_size, **kwargs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dtype not in _DTYPES:
            return False, f"{name}.dtype={t.dtype}: the kernels take float32/float16/bfloat16"
    dk = q.shape[-1]
    dv = (v if v is not None else q).shape[-1]
    if dk > 128 or dv > 128:
        return False, f"head dims dk={dk}, dv={dv}: the kernels cover dims <= 128 (configs for padded dk 32/64/128)"
    if kernel == "chunk":
        if chunk_size not in CHUNK_SIZES:
            return False, f"chunk_size={chunk_size}: the chunk kernels cover {CHUNK_SIZES}"
        for name in kernels_for(spec.learner, spec.retention):
            if pick_config(name, chunk_size, block_size(dk), block_size(dv), False, spec.learner) is None:
                return False, (f"no spill-free shipped {name} config for chunk_size={chunk_size}, dk={dk}, dv={dv}, "
                               f"bias={spec.bias}, learner={spec.learner} (kernels/configs.py)")
    else:
        if pick_config("recurrent_fwd", 1, block_size(dk), block_size(dv), True) is None:
            return False, f"no spill-free shipped recurrent_fwd config for dk={dk}, dv={dv} (kernels/configs.py)"
    return True, ""
