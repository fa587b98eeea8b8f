"""The Miras memory operator's entry point: ``miras_memory`` and the backend dispatch.

    from miras_kernels import miras_memory, MirasSpec

Backends (one module per form, like flash-linear-attention):

* ``recurrent`` -- the plain token loop, the definition of the semantics (``kernels/pytorch/recurrent.py``);
* ``chunked``   -- the chunk-parallel torch form, same semantics (``kernels/pytorch/chunked.py``);
* ``triton``    -- the Triton kernel families ``miras_linear`` / ``miras_mlp`` (same signature);
* ``auto``      -- ``triton`` for CUDA tensors, ``chunked`` for every other device; see
  :func:`resolve_backend`, the ONE place where backend names map to implementations.

``triton`` (and so ``auto`` on CUDA) runs the kernels only for calls ``miras_kernels.supports``
accepts and falls back to ``chunked`` otherwise, with a one-time warning naming the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Callable

import torch

from .pytorch.chunked import miras_memory_chunked
from .pytorch.recurrent import miras_memory_recurrent
from .common.varlen import VarlenMeta
from .dispatch import supports
from .spec import MirasSpec

__all__ = ["miras_memory", "MirasSpec", "VarlenMeta", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "recurrent", "chunked", "triton")

Backend = Callable[..., tuple[torch.Tensor, "dict[str, torch.Tensor] | None"]]


_warned_fallbacks: set[str] = set()


def _warn_fallback_once(reason: str) -> None:
    """One warning per distinct reason: a model calls the op once per layer and step."""
    if reason not in _warned_fallbacks:
        _warned_fallbacks.add(reason)
        warnings.warn(f"miras_memory: Triton kernels not used, falling back to 'chunked': {reason}",
                      RuntimeWarning, stacklevel=3)


def _miras_memory_triton(q, k, v, alpha, eta, *, spec, chunk_size, delta, mu, initial_state,
                         output_final_state, cu_seqlens):
    """Run the Triton kernels when they cover the call, else the chunked PyTorch path (same
    semantics) with a one-time warning naming why."""
    ok, reason = supports(spec, q, k, v, chunk_size=chunk_size, alpha=alpha, initial_state=initial_state)
    if ok:
        # imported here: the kernel families import triton, which a CPU install may lack
        if spec.memory == "linear":
            from .miras_linear import chunk_miras_linear as impl
        else:
            from .miras_mlp import chunk_miras_mlp as impl
        return impl(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                    initial_state=initial_state, output_final_state=output_final_state,
                    cu_seqlens=cu_seqlens)
    _warn_fallback_once(reason)
    return miras_memory_chunked(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta,
                                mu=mu, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def resolve_backend(backend: str, device: torch.device | None = None) -> Backend:
    """Map a backend name to its implementation (all share ``miras_memory``'s signature minus
    ``backend``). This is the single dispatch point: wire new backends here.

    ``auto`` picks the Triton kernels for CUDA tensors and the chunked PyTorch path elsewhere;
    ``triton`` on CPU runs the kernels in the Triton interpreter (``TRITON_INTERPRET=1``). Both
    fall back to ``chunked`` for calls the kernels do not cover, with a one-time warning."""
    if backend == "auto":
        if device is not None and device.type == "cuda":
            return _miras_memory_triton
        return miras_memory_chunked
    if backend == "chunked":
        return miras_memory_chunked
    if backend == "recurrent":
        return miras_memory_recurrent
    if backend == "triton":
        return _miras_memory_triton
    raise ValueError(f"backend={backend!r} is not valid: choose one of {', '.join(BACKENDS)}")


def miras_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec: MirasSpec,
    chunk_size: int = 64,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | VarlenMeta | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Run a Miras associative memory over a sequence (test-time training, read after write).

    Semantics: mini-batch GD with chunks of ``chunk_size`` tokens from each document start;
    every inner gradient of a chunk is taken at the weights frozen at the chunk start (see
    ``kernels/pytorch/recurrent.py``; chunk_size=1 is the exact per-token rule, ``docs/semantics.md``).

    Args:
        q, k: ``[B, T, H, dk]`` queries and keys.
        v: ``[B, T, H, dv]`` values (``dv == dk`` for ``memory="mlp"``).
        alpha: ``[B, T, H]`` retention gate in (0, 1] (required unless ``retention="none"``,
            where it is ignored); ``[B, T, H, dk]`` for a per-key-channel decay of a linear memory.
        eta: ``[B, T, H]`` inner learning rate >= 0.
        spec: the grid point (``MirasSpec``).
        chunk_size: C >= 1 (the paper uses 16 or 64).
        delta: ``[B, T, H]`` Huber threshold > 0 (``bias="huber"`` only).
        mu: ``[B, T, H]`` momentum gate in (0, 1] (``learner="momentum"`` only).
        initial_state: dict (keys ``spec.state_keys()``) of ``[B, H, r, c]`` or ``[H, r, c]``
            tensors holding the retention's free variable (``[N, H, r, c]`` with cu_seqlens);
            required for ``memory="mlp"``; zeros when omitted (also for omitted ``S_*`` keys).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N+1]`` int document offsets for packed input (B == 1); the state and the
            chunk grid restart at every document start. Either a tensor, which is read to the
            host once per call to validate it and size the chunk grid (one host sync at this API
            boundary), or a :class:`VarlenMeta` built once per batch where the offsets are still
            on the host (``VarlenMeta.from_host``; the model's data path does this), with which
            no backend reads device memory on the host (no sync, CUDA-graph friendly).
        backend: ``"auto"`` (Triton kernels for CUDA tensors, ``"chunked"`` elsewhere),
            ``"chunked"``, ``"recurrent"`` or ``"triton"`` (see :func:`resolve_backend`).

    Returns:
        y ``[B, T, H, dv]`` in the input dtype, and the final state (dict of ``[B|N, H, r, c]``
        tensors in at least float32) or None.
    """
    impl = resolve_backend(backend, q.device)
    return impl(
        q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
