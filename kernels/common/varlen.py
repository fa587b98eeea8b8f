"""Host-side chunk bookkeeping for packed sequences (``cu_seqlens``; validated by
``miras_kernels.inputs.validate_inputs``): where each document's chunks sit in flat per-chunk buffers."""

from __future__ import annotations

import torch


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
