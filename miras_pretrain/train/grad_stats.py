"""Training-health figures from gradients: per-layer gradient norms and a gradient-spike warning.

* :func:`grad_norms_by_group` -- the L2 norm of the raw (pre-clipping) gradient of each
  transformer block (``layers.<i>.*`` -> ``layer<i>``), of the embedding and of the output head.
  Called by the trainer at log steps, after backward and before ``engine.step()``.
* :class:`GradSpikeMonitor` -- a running median of the global gradient norm that returns a
  one-line warning when a step's norm jumps far above it (rate limited).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from typing import Callable, Iterable, Optional

import torch

from miras_pretrain.model.sharded_layers import is_tensor_parallel, tp_all_reduce_
from miras_pretrain.parallel.tensor_parallel import parallel_layout

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def grad_group(name: str) -> str:
    """The group of a ``named_parameters()`` name: ``layer<i>`` for ``layers.<i>.*``, ``embed``,
    ``head``, else ``other``. Wrapper prefixes (``module.``, ``_orig_mod.``) do not matter."""
    m = _LAYER.search(name)
    if m:
        return f"layer{m.group(1)}"
    parts = name.split(".")
    for group in ("embed", "head"):
        if group in parts:
            return group
    return "other"


def grad_norms_by_group(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    get_grad: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p.grad,
) -> dict[str, float]:
    """``{group: L2 norm of the gradients of its parameters}`` (groups from :func:`grad_group`).

    ``get_grad`` returns a parameter's full (data-parallel reduced) gradient or None; the trainer
    passes ``deepspeed.utils.safe_get_full_grad``, which is a collective under ZeRO (every rank
    must call it for every parameter in the same order), so it is called for every parameter
    that requires grad, before anything is skipped. Under tensor parallelism every TP rank must
    call this too: a TP-sharded parameter contributes its shard's squares on each rank, a
    replicated one (same full gradient on every TP rank) only on TP rank 0, then the squares are
    summed over the TP group -- the same counting as DeepSpeed's global norm, so the groups'
    squares add up to ``engine.get_global_grad_norm() ** 2``.
    """
    layout = parallel_layout()
    count_replicated = layout.tp_rank == 0
    sums: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        g = get_grad(p)
        if g is None:
            continue
        sq = torch.linalg.vector_norm(g.detach(), dtype=torch.float32).square()
        if not (is_tensor_parallel(p) or count_replicated):
            sq = torch.zeros_like(sq)  # keep the group (same keys on every TP rank), add nothing
        group = grad_group(name)
        sums[group] = sums[group] + sq if group in sums else sq
    if not sums:
        return {}
    vec = torch.stack(list(sums.values())).double()
    tp_all_reduce_(vec, layout)  # no-op without TP; keys are in the same order on every TP rank
    return {k: math.sqrt(v) for k, v in zip(sums, vec.tolist())}


class GradSpikeMonitor:
    """Warns when a step's gradient norm exceeds ``max(factor x running median, floor)``.

    The median is over the last ``window`` finite norms fed in (median, not mean: one spike must
    not raise the bar for the next); nothing fires before ``min_history`` of them. After a
    warning, the next ``cooldown`` steps stay silent so a run of bad steps gives one line, not a
    flood. ``floor`` keeps small absolute norms quiet (a 10x jump from 1e-3 is harmless; with
    ``train.grad_clip`` 1.0 a norm below 1 is not even clipped).
    """

    def __init__(self, *, window: int = 50, min_history: int = 10, factor: float = 10.0,
                 floor: float = 1.0, cooldown: int = 20) -> None:
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history
        self.factor = factor
        self.floor = floor
        self.cooldown = cooldown
        self._last_warning: Optional[int] = None

    def update(self, step: int, norm: float) -> Optional[str]:
        """Feed the norm of ``step`` (an applied step); the warning line, or None."""
        if not math.isfinite(norm):  # skipped steps have their own warning
            return None
        message = None
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            quiet = self._last_warning is not None and step - self._last_warning <= self.cooldown
            if norm > max(self.factor * median, self.floor) and not quiet:
                self._last_warning = step
                ratio = f"{norm / median:.0f}x" if median > 0 else "far above"
                message = (f"step {step}: gradient norm {norm:.2g} is {ratio} its running median {median:.2g} "
                           "(see grad_norm/layer* in metrics.jsonl; docs/training_health.md)")
        self.history.append(norm)
        return message
