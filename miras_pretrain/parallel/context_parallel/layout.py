"""Where a rank's tokens sit when one sequence is split over a context-parallel (CP) group.

:func:`slice_batch_for_cp` turns the batch every rank of a CP group received whole into this
rank's slice, its local ``cu_seqlens``, its :class:`CPSlice` (the global layout the CP layers
need) and the loss scale of its tokens. :meth:`CPSlice.segments` cuts the slice into document
fragments, which the memory schemes run one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .rules import check_lengths


@dataclass(frozen=True)
class Segment:
    """One document fragment of a rank's slice (local token range ``[start, end)``).

    ``doc_start`` is the document's first token in global coordinates; ``continues_in`` means
    the document began on an earlier rank (its state arrives from rank r-1), ``continues_out``
    that it goes on past this rank's end (its state leaves for rank r+1)."""

    start: int
    end: int
    doc_start: int
    continues_in: bool
    continues_out: bool


@dataclass(frozen=True)
class CPSlice:
    """Where this rank's tokens sit in the global sequence.

    ``docs`` are the global document bounds ``[(s, e), ...]`` of a packed row (``B == 1``), or
    None for ``B`` independent sequences that each span the whole CP group."""

    cp_rank: int
    cp_size: int
    seq_len: int
    docs: tuple[tuple[int, int], ...] | None = None

    @property
    def local_len(self) -> int:
        return self.seq_len // self.cp_size

    @property
    def start(self) -> int:
        return self.cp_rank * self.local_len

    @property
    def end(self) -> int:
        return self.start + self.local_len

    def segments(self) -> list[Segment]:
        """The document fragments of this rank, in order (empty documents are skipped)."""
        if self.docs is None:
            return [Segment(0, self.local_len, 0, self.cp_rank > 0, self.cp_rank < self.cp_size - 1)]
        out = []
        for s, e in self.docs:
            lo, hi = max(s, self.start), min(e, self.end)
            if lo < hi:
                out.append(Segment(lo - self.start, hi - self.start, s, s < self.start, e > self.end))
        return out

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position of every local token inside its document, [T_local] long (RoPE, conv mask)."""
        idx = torch.arange(self.start, self.end, device=device)
        if self.docs is None:
            return idx
        return idx - self.doc_start_of(idx)

    def doc_start_of(self, global_idx: torch.Tensor) -> torch.Tensor:
        """Global start of the document holding each global token index (same shape, long)."""
        starts = torch.tensor([s for s, _ in self.docs] if self.docs else [0], device=global_idx.device)
        ends = torch.tensor([e for _, e in self.docs] if self.docs else [self.seq_len], device=global_idx.device)
        which = torch.searchsorted(ends, global_idx.clamp_min(0), right=True).clamp_max(len(ends) - 1)
        return starts[which]

    def local_cu_seqlens(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Local document offsets ``[n+1]`` (int32, on ``device``) of this slice, the model's
        ``cu_seqlens``."""
        if self.docs is None:
            return None
        segs = self.segments()
        return torch.tensor([0] + [s.end for s in segs], dtype=torch.int32, device=device)


def _docs_from_cu(cu: torch.Tensor, seq_len: int) -> tuple[tuple[int, int], ...]:
    offs = [int(x) for x in cu.tolist()]
    if cu.dim() != 1 or len(offs) < 2 or offs[0] != 0 or offs[-1] != seq_len or any(
        b < a for a, b in zip(offs, offs[1:])
    ):
        raise ValueError(
            f"batch['cu_seqlens'] must be 1-D offsets starting at 0, non-decreasing and ending at the "
            f"sequence length {seq_len} (got {offs[:4]}...{offs[-2:]})"
        )
    return tuple(zip(offs[:-1], offs[1:]))


def slice_batch_for_cp(
    batch: dict[str, Any], cp_rank: int, cp_size: int, *, chunk_size: int | None = None
) -> dict[str, Any]:
    """This CP rank's part of a batch that every rank of the CP group received whole.

    Args:
        batch: ``{"input_ids": [B, T] long, "labels": [B, T] long (aligned targets, -100 =
            ignore), optional "cu_seqlens": [N+1] int (B == 1)}``; other keys are kept as they are.
        cp_rank, cp_size: position in and size of the CP group.
        chunk_size: the model's chunk size; when given, ``T / cp_size`` must be a multiple of it.

    Returns:
        ``{"input_ids": [B, T/cp], "labels": [B, T/cp], "cu_seqlens": local [n+1] int32 (only
        when given: the documents of this slice, a document crossing a boundary split in two),
        "cp_slice": CPSlice (the global layout; pass it to ``ContextParallel.batch``),
        "cp_loss_scale": float (this rank's share of the batch's counted labels: multiply the
        model's local mean loss by it so the sum over the CP group is the global mean)}``.
    """
    if not (isinstance(cp_size, int) and cp_size >= 1 and isinstance(cp_rank, int) and 0 <= cp_rank < cp_size):
        raise ValueError(f"slice_batch_for_cp: need 0 <= cp_rank < cp_size (got cp_rank={cp_rank}, cp_size={cp_size})")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"slice_batch_for_cp: batch has no {key!r} (got keys {sorted(batch)})")
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.dim() != 2 or labels.shape != ids.shape:
        raise ValueError(
            f"slice_batch_for_cp: input_ids and labels must both be [B, T] (got {tuple(ids.shape)} and {tuple(labels.shape)})"
        )
    T = ids.shape[1]
    check_lengths(T, cp_size, chunk_size)
    docs = None
    cu = batch.get("cu_seqlens")
    if cu is not None:
        if ids.shape[0] != 1:
            raise ValueError(f"slice_batch_for_cp: cu_seqlens needs batch size 1 (packed documents), got {ids.shape[0]}")
        docs = _docs_from_cu(cu, T)
    layout = CPSlice(cp_rank, cp_size, T, docs)
    lo, hi = layout.start, layout.end
    out = dict(batch)
    out["input_ids"] = ids[:, lo:hi]
    out["labels"] = labels[:, lo:hi]
    if cu is not None:
        out["cu_seqlens"] = layout.local_cu_seqlens(cu.device)
    total = int((labels != -100).sum())
    local = int((out["labels"] != -100).sum())
    out["cp_slice"] = layout
    out["cp_loss_scale"] = local / total if total else 0.0
    return out
