"""Host-side helpers for packed sequences (``cu_seqlens``) and chunk bookkeeping."""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> torch.Tensor:
    """Validate ``cu_seqlens`` (``[N+1]`` int, starts at 0, non-decreasing, ends at ``T``) for a
    ``B == 1`` packed batch; returns it as contiguous int32 on the inputs' device."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a packed batch with B == 1 (got B={batch}): concatenate the documents along T")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int tensor [N+1] with N >= 1 documents")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64 (got {cu_seqlens.dtype})")
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at T={total} (got {cu.tolist()})"
        )
    return cu_seqlens.to(torch.int32).contiguous()


def chunk_offsets(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int) -> tuple[torch.Tensor | None, int]:
    """Start index of each sequence's chunks in a flat ``[NT_total, ...]`` per-chunk buffer.

    Returns ``(offsets [N+1] int32 or None, NT_total)``. Without ``cu_seqlens`` every sequence has
    ``ceil(T / C)`` chunks and the offsets are implicit (``None``).
    """
    if cu_seqlens is None:
        return None, batch * ((seq_len + chunk_size - 1) // chunk_size)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lens + chunk_size - 1) // chunk_size
    offs = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=cu_seqlens.device)
    offs[1:] = torch.cumsum(counts, 0)
    return offs.to(torch.int32), int(offs[-1])


def chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[NT_total, 2]`` int32 rows ``(document, chunk within the document)`` for every chunk of a
    packed batch, in the order of :func:`chunk_offsets` (the chunk-parallel grid of varlen)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lens + chunk_size - 1) // chunk_size
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(doc.numel(), device=cu_seqlens.device) - starts[doc]
    return torch.stack([doc, within], dim=1).to(torch.int32).contiguous()
