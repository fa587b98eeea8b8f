"""The ranks of one context-parallel (CP) group and the two collectives the training loop runs
over it (gradient sum for engines that do not reduce over CP, the logged loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from miras_pretrain.parallel import state


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


def all_reduce_cp_grads(params: Iterable[torch.nn.Parameter], group: CPGroup) -> None:
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
