"""Fresh (uninitialised) kernel buffers, optionally NaN-filled so that an unwritten output fails.

The kernel hosts allocate outputs and scratch with ``torch.empty``: memory the kernels are meant
to write in full before anything reads it. On a GPU a fresh allocation often holds zeros or an
earlier result of the same shape, so a kernel that skips part of its output (a masked tile, an
off-by-one grid) can still pass its tests. With ``MIRAS_NAN_EMPTY=1`` (``tools/gpu_check.sh`` sets
it for the GPU test run) every buffer from :func:`fresh_empty` / :func:`fresh_empty_like` is filled
with NaN (integer buffers with -1), so such an output shows up as NaN in the comparison. It costs
one fill per buffer: debugging and tests only.
"""

from __future__ import annotations

import os

import torch

# MIRAS_NAN_EMPTY=1: fill fresh kernel buffers with NaN (-1 for integer dtypes)
NAN_EMPTY_ENV = "MIRAS_NAN_EMPTY"


def nan_empty_enabled() -> bool:
    """True when ``MIRAS_NAN_EMPTY=1`` asks for NaN-filled fresh buffers (read at every call, so a
    test can set it with ``monkeypatch.setenv``)."""
    value = os.environ.get(NAN_EMPTY_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{NAN_EMPTY_ENV}={value!r} is not valid: use 1 (NaN-filled buffers) or 0")
    return value == "1"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if nan_empty_enabled():
        t.fill_(float("nan") if t.dtype.is_floating_point or t.dtype.is_complex else -1)
    return t


def fresh_empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty(*shape, dtype=dtype, device=device)``, NaN-filled under ``MIRAS_NAN_EMPTY=1``.
    For buffers the kernels write in full before any read."""
    return _poison(torch.empty(*shape, dtype=dtype, device=device))


def fresh_empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)``, NaN-filled under ``MIRAS_NAN_EMPTY=1``."""
    return _poison(torch.empty_like(t))
