"""The Miras memory operator (issue 2).

    from miras_pretrain.ops import miras_memory, MirasSpec

Backends (one module per form, like flash-linear-attention):

* ``recurrent`` -- the plain token loop, the definition of the semantics (``ops/recurrent.py``);
* ``chunked``   -- the chunk-parallel torch form, same semantics (``ops/chunked.py``);
* ``triton``    -- GPU kernels from the top-level ``kernels`` package (same signature);
* ``auto``      -- currently ``chunked``; see :func:`resolve_backend`, the ONE place where
  backend names map to implementations.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable

import torch

from .chunked import miras_memory_chunked
from .recurrent import miras_memory_recurrent
from .spec import MirasSpec

__all__ = ["miras_memory", "MirasSpec", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "recurrent", "chunked", "triton")

Backend = Callable[..., tuple[torch.Tensor, "dict[str, torch.Tensor] | None"]]


def resolve_backend(backend: str) -> Backend:
    """Map a backend name to its implementation (all share ``miras_memory``'s signature minus
    ``backend``). This is the single dispatch point: wire new backends here."""
    if backend == "auto":
        # The lead switches "auto" to triton for CUDA inputs once kernels/ lands; on CPU the
        # chunked torch form is the fast path.
        return miras_memory_chunked
    if backend == "chunked":
        return miras_memory_chunked
    if backend == "recurrent":
        return miras_memory_recurrent
    if backend == "triton":
        try:
            kernels = importlib.import_module("kernels")
        except ImportError as err:
            raise ValueError(
                f"backend='triton' is not available: the 'kernels' package cannot be imported ({err}); "
                "use backend='chunked' or 'auto'"
            ) from None
        fn = getattr(kernels, "miras_memory", None)
        if fn is None:
            raise ValueError(
                "backend='triton' is not available: 'kernels' has no miras_memory yet; use backend='chunked'"
            )
        return fn
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
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Run a Miras associative memory over a sequence (test-time training, read after write).

    Semantics: mini-batch GD with chunks of ``chunk_size`` tokens from each document start;
    every inner gradient of a chunk is taken at the weights frozen at the chunk start (see
    ``ops/recurrent.py``; chunk_size=1 is the exact per-token rule of the notes, section 2).

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
            chunk grid restart at every document start.
        backend: ``"auto"``, ``"chunked"``, ``"recurrent"`` or ``"triton"``.

    Returns:
        y ``[B, T, H, dv]`` in the input dtype, and the final state (dict of ``[B|N, H, r, c]``
        tensors in at least float32) or None.
    """
    impl = resolve_backend(backend)
    return impl(
        q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
