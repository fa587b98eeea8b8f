"""Context (sequence) parallelism: one sequence split into contiguous slices over a CP group.

Public API (see ``docs/context_parallel.md``):

* :func:`slice_batch_for_cp` -- the trainer's slicing helper: the loader feeds the SAME batch to
  every rank of a CP group; each rank keeps its slice of ``input_ids``/``labels``, local
  ``cu_seqlens``, the :class:`CPSlice` layout and the loss scale of its tokens.
* :class:`ContextParallel` -- the per-process runtime (group, scheme, tags, timers). Activate it
  around a forward with ``with cp.batch(batch["cp_slice"]): loss = model(...)``; call
  :meth:`ContextParallel.finish_step` after backward.
* :func:`active` -- what the model code consults: ``None`` (plain single-sequence path) or the
  active :class:`ActiveCP` whose ``miras_layer`` / ``positions`` / ``attention`` do the halo
  exchanges and the memory-state passing (``context_parallel_memory.py``,
  ``context_parallel_attention.py``, ``context_parallel_comm.py``).
* :func:`validate_cp_model` -- the layout rules (slice a multiple of the chunk size, halos fit).

Nothing here imports the model, megatron or DeepSpeed at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

SCHEMES = ("auto", "state_passing", "all_gather")


# ----------------------------------------------------------------------------- layout
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

    def local_cu_seqlens(self) -> torch.Tensor | None:
        """Local document offsets ``[n+1]`` (int32) of this slice, the model's ``cu_seqlens``."""
        if self.docs is None:
            return None
        segs = self.segments()
        return torch.tensor([0] + [s.end for s in segs], dtype=torch.int32)


def check_cp_lengths(seq_len: int, cp_size: int, chunk_size: int | None, *, where: str = "batch") -> None:
    """The layout rules: T divisible by the CP size and each slice a multiple of the chunk size
    (so the memory's chunk grid -- which restarts at every document start -- is the CP=1 grid)."""
    if seq_len % cp_size:
        raise ValueError(
            f"{where}: sequence length {seq_len} is not divisible by context_parallel_size={cp_size}: "
            f"use a sequence length that is a multiple of {cp_size} (CP does not pad)"
        )
    if chunk_size is not None and (seq_len // cp_size) % chunk_size:
        raise ValueError(
            f"{where}: the slice per CP rank ({seq_len} / {cp_size} = {seq_len // cp_size} tokens) is not a "
            f"multiple of the model's chunk_size={chunk_size}: use a sequence length that is a multiple of "
            f"{cp_size * chunk_size}, otherwise CP={cp_size} and CP=1 would use different chunk grids"
        )


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
    check_cp_lengths(T, cp_size, chunk_size)
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
        out["cu_seqlens"] = layout.local_cu_seqlens().to(device=cu.device)
    total = int((labels != -100).sum())
    local = int((out["labels"] != -100).sum())
    out["cp_slice"] = layout
    out["cp_loss_scale"] = local / total if total else 0.0
    return out


# ----------------------------------------------------------------------------- group
@dataclass
class CPGroup:
    """The ranks of one CP group, in sequence order. ``ranks[i]`` is the global rank holding
    slice i; ``group`` the process group (None only for a group of one); ``p2p`` the process
    group the point-to-point state/halo messages use (None = the default group).

    Why a separate ``p2p`` group: isolation. CP messages may still be in flight (non-blocking
    sends complete in ``finish_step``) while DeepSpeed and the trainer run collectives; on a
    group of their own they can never be confused with another library's traffic."""

    ranks: list[int]
    group: Any = None
    p2p: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        return self.ranks.index(dist.get_rank()) if self.size > 1 else 0

    @property
    def prev(self) -> int | None:
        r = self.rank
        return self.ranks[r - 1] if r > 0 else None

    @property
    def next(self) -> int | None:
        r = self.rank
        return self.ranks[r + 1] if r < self.size - 1 else None

    @classmethod
    def from_megatron(cls, *, dedicated_p2p: bool = True) -> "CPGroup":
        """The context-parallel group of megatron's ``parallel_state`` (see
        ``miras_pretrain.parallel.state.initialize_parallel(cp=...)``).

        ``dedicated_p2p``: give the point-to-point messages a process group of their own that
        carries nothing else (see the class docstring). Collective over ALL ranks (every rank
        creates every CP group's p2p group, in the same order)."""
        from . import state

        ranks = state.context_parallel_global_ranks()
        p2p = None
        if dedicated_p2p and dist.is_initialized() and dist.get_world_size() > 1:
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, ranks)
            for rs in sorted({tuple(r) for r in every}):
                g = dist.new_group(list(rs))
                if dist.get_rank() in rs:
                    p2p = g
        return cls(ranks, state.context_parallel_group(), p2p)


# ----------------------------------------------------------------------------- stats
@dataclass
class CPStats:
    """Counters since the last reset. ``wait_s``: time blocked on another rank's memory state
    (forward) or state gradient (backward) -- the wavefront bubble plus transfer; ``comm_s``: time
    in the other CP communication (halos, all-gathers); ``bytes_sent`` and ``messages`` sent by
    this rank; ``tokens``: local tokens run through the model."""

    wait_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    messages: int = 0
    tokens: int = 0

    def as_dict(self, prefix: str = "cp/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


# ----------------------------------------------------------------------------- runtime
class ContextParallel:
    """Per-process CP runtime: group, scheme, message tags, pending sends and timers.

    ``scheme``: ``"auto"`` (all-gather for affine memories -- ``spec.is_affine`` -- state passing
    for the rest), ``"state_passing"`` (every layer) or ``"all_gather"`` (affine layers only; a
    non-affine layer is an error)."""

    def __init__(self, group: CPGroup, scheme: str = "auto") -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"context_parallel scheme={scheme!r} is not valid: choose one of {', '.join(SCHEMES)}")
        self.group = group
        self.scheme = scheme
        self.stats = CPStats()
        self._tag = 0
        self._pending: list[Any] = []

    # -- tags: every CP exchange gets the next tag; all ranks of a group run the same program,
    # so the counters agree. Forward uses even tags, backward the odd tag after them.
    def next_tag(self) -> int:
        self._tag = (self._tag + 1) % (1 << 24)
        return 2 * self._tag

    def add_pending(self, work: Any) -> None:
        self._pending.append(work)

    def finish_step(self) -> None:
        """Wait for every outstanding send (call after backward, before the optimizer step)."""
        t0 = time.perf_counter()
        for w in self._pending:
            w.wait()
        self._pending.clear()
        self.stats.comm_s += time.perf_counter() - t0

    def reset_stats(self) -> CPStats:
        old, self.stats = self.stats, CPStats()
        return old

    def scheme_for(self, spec) -> str:
        if self.scheme == "auto":
            return "all_gather" if spec.is_affine else "state_passing"
        if self.scheme == "all_gather" and not spec.is_affine:
            raise ValueError(
                f"context_parallel scheme='all_gather' needs an affine memory (linear memory, dot/l2 bias, "
                f"none/decay retention); {spec} is not: use scheme 'auto' or 'state_passing'"
            )
        return self.scheme

    @contextlib.contextmanager
    def batch(self, layout: CPSlice) -> Iterator["ActiveCP"]:
        """Make CP active for the forward passes inside the block (backward may run later)."""
        global _ACTIVE
        if layout.cp_size != self.group.size or layout.cp_rank != self.group.rank:
            raise ValueError(
                f"CPSlice is for rank {layout.cp_rank} of {layout.cp_size} but this process is rank "
                f"{self.group.rank} of a CP group of {self.group.size}: slice with the group's rank and size"
            )
        prev, _ACTIVE = _ACTIVE, ActiveCP(self, layout)
        try:
            yield _ACTIVE
        finally:
            _ACTIVE = prev


@dataclass
class ActiveCP:
    """CP bound to one batch layout: the object the model's mixers and attention layers call."""

    runtime: ContextParallel
    layout: CPSlice
    _cache: dict = field(default_factory=dict)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Document position of every local token, [T_local] long."""
        return self.layout.positions(device)

    def miras_layer(self, spec, *, batch: int, heads: int, head_dim: int, chunk_size: int,
                    dtype: torch.dtype = torch.float32):
        """A Miras mixer's CP helper for one forward: ``.conv(x, w)`` (halo exchange) and
        ``.memory(...)`` (``miras_memory``'s signature; state passing or all-gather).
        ``heads`` are this rank's (TP-local) heads."""
        from .context_parallel_memory import MirasLayerCP

        return MirasLayerCP(self, spec, batch=batch, heads=heads, head_dim=head_dim, chunk_size=chunk_size,
                            dtype=dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None) -> torch.Tensor:
        """Causal (sliding-window) attention over the global sequence for the local queries.
        q, k, v [B, T_local, H, d] (RoPE applied) -> [B, T_local, H, d]."""
        from .context_parallel_attention import cp_attention

        return cp_attention(self, q, k, v, window=window)


_ACTIVE: ActiveCP | None = None


def active() -> ActiveCP | None:
    """The CP binding of the current forward, or None (no context parallelism)."""
    return _ACTIVE


def validate_cp_model(cfg, seq_len: int, cp_size: int) -> None:
    """Check a ``ModelConfig`` against a CP layout; one clear ValueError per problem."""
    check_cp_lengths(seq_len, cp_size, cfg.chunk_size, where="context parallelism")
    local = seq_len // cp_size
    if cp_size > 1 and cfg.activation_checkpointing:
        raise ValueError(
            "ModelConfig.activation_checkpointing=True is not supported with context_parallel_size > 1 "
            "(the recomputed forward would exchange states again): set it to false"
        )
    if cp_size > 1 and cfg.conv_size - 1 > local:
        raise ValueError(f"ModelConfig.conv_size={cfg.conv_size}: the conv halo needs conv_size - 1 <= {local} tokens per CP rank")
    if cp_size > 1 and "A" in cfg.layer_pattern and cfg.window - 1 > local:
        raise ValueError(
            f"ModelConfig.window={cfg.window}: a sliding-window layer under CP needs window - 1 <= {local} "
            "(the tokens per CP rank): use a longer sequence, a smaller CP size or a smaller window"
        )


def all_reduce_cp_grads(params, group: CPGroup) -> None:
    """Sum parameter gradients over the CP group, for engines that do not reduce over it
    (DeepSpeed's pipeline engine uses the DP-only group): call after backward, before the step."""
    if group.size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group.group)


def cp_loss_reduce(loss: torch.Tensor, group: CPGroup) -> torch.Tensor:
    """Logging: the global mean loss from each rank's scaled share (sum over the CP group)."""
    out = loss.detach().clone()
    if group.size > 1:
        dist.all_reduce(out, group=group.group)
    return out
