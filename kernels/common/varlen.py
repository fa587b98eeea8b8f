"""Packed-document bookkeeping (``cu_seqlens``) without host syncs inside a layer.

:class:`VarlenMeta` is the per-batch metadata of a packed batch: the document offsets as a tensor
on the batch's device *and* as host integers. It is built once per batch, where the offsets are
still on the host (the data path: ``miras_pretrain.train.data_bridge``), validated there, and then
handed to every layer and to :func:`miras_kernels.miras_memory` (its ``cu_seqlens`` argument takes
either form). Everything a backend needs per call is derived from it without reading device
memory on the host: sizes and loop bounds (number of documents, chunks per chunk size, the longest
document) come from the host integers, the per-chunk index tensors are computed on the device
from the device offsets with those sizes (``repeat_interleave(..., output_size=...)``), and both
are cached on the object, so 24 layers compute them once. A reading of device memory on the host
(``.item()``, ``.tolist()``, ``int(t)``) stalls the GPU until the queue drains and cannot be
captured in a CUDA graph.

A bare ``cu_seqlens`` tensor still works everywhere: :meth:`VarlenMeta.from_cu_seqlens` reads it
once (one sync at the API boundary) and validates it. :func:`chunk_offsets` and
:func:`chunk_indices` (the kernel families' helpers) recognise a tensor that belongs to a
``VarlenMeta`` (``lookup``) and then sync nothing either.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

# id(device offsets tensor) -> (weak reference to it, its metadata). Identity, not value: a
# kernel family receives the tensor (e.g. through ``CheckedInputs.cu_seqlens``) and finds the host
# integers of exactly that tensor; the entry dies with the tensor.
_REGISTRY: dict[int, tuple[weakref.ref, "VarlenMeta"]] = {}


def _register(meta: "VarlenMeta") -> None:
    key = id(meta.cu_seqlens)
    _REGISTRY[key] = (weakref.ref(meta.cu_seqlens, lambda _ref, key=key: _REGISTRY.pop(key, None)), meta)


def lookup(cu_seqlens: torch.Tensor) -> "VarlenMeta | None":
    """The :class:`VarlenMeta` whose device offsets are this very tensor object, else None."""
    entry = _REGISTRY.get(id(cu_seqlens))
    if entry is None or entry[0]() is not cu_seqlens:
        return None
    return entry[1]


@dataclass(frozen=True, eq=False)
class VarlenMeta:
    """Per-batch metadata of packed documents (one row ``[1, total]``, ``N`` documents).

    Fields:
        cu_seqlens: ``[N+1]`` int32 contiguous document offsets on the batch's device.
        offsets: the same offsets as host integers ``(0, ..., total)``.

    Build it with :meth:`from_host` (from a CPU tensor / list, no device read) or
    :meth:`from_cu_seqlens` (any tensor; one host read). Treat ``cu_seqlens`` as read-only: the
    host copy is not refreshed if the tensor is changed in place.
    """

    cu_seqlens: torch.Tensor
    offsets: tuple[int, ...]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _register(self)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def check_offsets(offsets: list[int] | tuple[int, ...], total: int | None = None) -> tuple[int, ...]:
        """Validate host offsets (``[0, ..., total]``, non-decreasing); one-line ValueError."""
        offs = tuple(int(x) for x in offsets)
        if len(offs) < 2:
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of document offsets (0, ..., T)")
        end = offs[-1] if total is None else total
        if offs[0] != 0 or offs[-1] != end or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(
                f"cu_seqlens must start at 0, end at T={end} and be non-decreasing "
                f"(got {list(offs[:4])}...{list(offs[-2:])})"
            )
        return offs

    @classmethod
    def from_host(cls, cu_seqlens, *, total: int | None = None,
                  device: torch.device | str | None = None) -> "VarlenMeta":
        """Metadata from host offsets (a CPU tensor, numpy array or list of ``N+1`` ints), validated;
        the device copy is made on ``device`` (default CPU). No device memory is read."""
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.device.type != "cpu":
                raise ValueError(f"VarlenMeta.from_host needs host offsets (got a tensor on {cu_seqlens.device}): "
                                 "use VarlenMeta.from_cu_seqlens, which reads them once")
            if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
                raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of document offsets (0, ..., T)")
            values = cu_seqlens.tolist()
        else:
            values = list(cu_seqlens)
        offs = cls.check_offsets(values, total)
        dev = torch.device("cpu") if device is None else torch.device(device)
        # one host -> device copy per batch, in the data path
        return cls(torch.tensor(offs, dtype=torch.int32).to(dev).contiguous(), offs)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, *, total: int | None = None) -> "VarlenMeta":
        """Metadata of any offsets tensor (or a ``VarlenMeta``, returned as is after the ``total``
        check). A tensor on an accelerator is read to the host once: the one sync of a call that
        passes a bare ``cu_seqlens`` (build the metadata in the data path to avoid it)."""
        if isinstance(cu_seqlens, VarlenMeta):
            if total is not None and cu_seqlens.total != total:
                raise ValueError(f"cu_seqlens must end at T={total} (the metadata ends at {cu_seqlens.total}): "
                                 "build it for this batch")
            return cu_seqlens
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1] of document offsets (0, ..., T)")
        known = lookup(cu_seqlens)
        if known is not None:
            return cls.from_cu_seqlens(known, total=total)
        offs = cls.check_offsets(cu_seqlens.tolist(), total)  # the one host read
        dev_offs = cu_seqlens.to(torch.int32).contiguous()
        return cls(dev_offs, offs)

    def to(self, device: torch.device | str) -> "VarlenMeta":
        """The same metadata with the device offsets on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.cu_seqlens.device == device or (device.index is None and self.cu_seqlens.device.type == device.type):
            return self
        return VarlenMeta(self.cu_seqlens.to(device), self.offsets)

    def with_device_offsets(self, cu_seqlens: torch.Tensor) -> "VarlenMeta":
        """The same metadata around an existing device copy of the offsets (e.g. the batch's
        ``cu_seqlens`` after the trainer moved it), converted to int32 on its device."""
        if tuple(cu_seqlens.shape) != (len(self.offsets),):
            raise ValueError(f"cu_seqlens has shape {tuple(cu_seqlens.shape)} but the metadata has "
                             f"{len(self.offsets)} offsets: pass this batch's offsets")
        return VarlenMeta(cu_seqlens.to(torch.int32).contiguous(), self.offsets)

    # ------------------------------------------------------------------ host integers
    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def n_docs(self) -> int:
        """Number of documents N (empty ones included)."""
        return len(self.offsets) - 1

    @property
    def total(self) -> int:
        """Number of tokens of the packed row (``cu_seqlens[-1]``)."""
        return self.offsets[-1]

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every document."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:])]

    @property
    def max_len(self) -> int:
        """Length of the longest document (0 without tokens)."""
        return max(self.lengths, default=0)

    def n_chunks(self, chunk_size: int) -> tuple[int, int]:
        """``(total chunks over all documents, chunks of the longest document)`` for chunk size C."""
        key = ("n_chunks", chunk_size)
        if key not in self._cache:
            counts = [-(-n // chunk_size) for n in self.lengths]
            self._cache[key] = (sum(counts), max(counts, default=0))
        return self._cache[key]

    # ------------------------------------------------------------------ device tensors
    def _counts(self, chunk_size: int) -> torch.Tensor:
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)
        return (lens + chunk_size - 1) // chunk_size

    def chunk_offsets(self, chunk_size: int) -> torch.Tensor:
        """``[N+1]`` int32 start of each document's chunks in a flat per-chunk buffer (device)."""
        key = ("chunk_offsets", chunk_size)
        if key not in self._cache:
            offs = torch.zeros(self.n_docs + 1, dtype=torch.int64, device=self.device)
            offs[1:] = torch.cumsum(self._counts(chunk_size), 0)
            self._cache[key] = offs.to(torch.int32)
        return self._cache[key]

    def chunk_indices(self, chunk_size: int) -> torch.Tensor:
        """``[NT_total, 2]`` int32 rows ``(document, chunk within it)`` (device), in the order of
        :meth:`chunk_offsets`."""
        key = ("chunk_indices", chunk_size)
        if key not in self._cache:
            counts = self._counts(chunk_size)
            nt = self.n_chunks(chunk_size)[0]
            # output_size from the host integers: without it repeat_interleave reads counts.sum()
            doc = torch.repeat_interleave(torch.arange(self.n_docs, device=self.device), counts, output_size=nt)
            starts = torch.cumsum(counts, 0) - counts
            within = torch.arange(nt, device=self.device) - starts[doc]
            self._cache[key] = torch.stack([doc, within], dim=1).to(torch.int32).contiguous()
        return self._cache[key]

    def positions(self) -> torch.Tensor:
        """``[total]`` int64 position of every token inside its document (device)."""
        if "positions" not in self._cache:
            t = torch.arange(self.total, device=self.device)
            cu = self.cu_seqlens.to(torch.int64)
            doc = torch.searchsorted(cu[1:], t, right=True).clamp_max(max(self.n_docs - 1, 0))
            self._cache["positions"] = t - cu[doc]
        return self._cache["positions"]


def chunk_offsets(cu_seqlens: torch.Tensor | VarlenMeta | None, batch: int, seq_len: int,
                  chunk_size: int) -> tuple[torch.Tensor | None, int]:
    """Start index of each sequence's chunks in a flat ``[NT_total, ...]`` per-chunk buffer.

    Returns ``(offsets [N+1] int32 or None, NT_total)``. Without ``cu_seqlens`` every sequence has
    ``ceil(T / C)`` chunks and the offsets are implicit (``None``). For a ``VarlenMeta`` (or its
    tensor) nothing is read from the device; for another tensor ``NT_total`` is read once.
    """
    if cu_seqlens is None:
        return None, batch * ((seq_len + chunk_size - 1) // chunk_size)
    meta = cu_seqlens if isinstance(cu_seqlens, VarlenMeta) else lookup(cu_seqlens)
    if meta is not None:
        return meta.chunk_offsets(chunk_size), meta.n_chunks(chunk_size)[0]
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lens + chunk_size - 1) // chunk_size
    offs = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=cu_seqlens.device)
    offs[1:] = torch.cumsum(counts, 0)
    return offs.to(torch.int32), int(offs[-1])  # host read: a bare tensor's API-boundary sync


def chunk_indices(cu_seqlens: torch.Tensor | VarlenMeta, chunk_size: int) -> torch.Tensor:
    """``[NT_total, 2]`` int32 rows ``(document, chunk within the document)`` for every chunk of a
    packed batch, in the order of :func:`chunk_offsets` (the chunk-parallel grid of varlen)."""
    meta = cu_seqlens if isinstance(cu_seqlens, VarlenMeta) else lookup(cu_seqlens)
    if meta is not None:
        return meta.chunk_indices(chunk_size)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lens + chunk_size - 1) // chunk_size
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(doc.numel(), device=cu_seqlens.device) - starts[doc]
    return torch.stack([doc, within], dim=1).to(torch.int32).contiguous()
