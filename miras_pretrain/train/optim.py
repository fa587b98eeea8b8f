"""AdamW parameter groups and the learning-rate schedule (linear warmup + cosine decay)."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based: the factor used by the
    ``step``-th update).

    Linear warmup from ``1/(warmup+1)`` to 1 over ``warmup_steps`` updates (never 0, so the
    first update moves the weights), then cosine from 1 to ``min_lr_ratio`` at ``max_steps``;
    constant ``min_lr_ratio`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


class WarmupCosine:
    """Picklable lr lambda (LambdaLR stores callable objects' ``__dict__`` in its state)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(
            step, warmup_steps=self.warmup_steps, max_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio
        )


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))


def is_no_decay(name: str, param: torch.Tensor, patterns: Iterable[str]) -> bool:
    """No weight decay for 0/1-d tensors (norm gains, biases, gate biases) and for names that
    contain one of ``patterns`` (case-insensitive), e.g. the memory's learned initial weights,
    which are matrices but act as a prior the retention already pulls towards."""
    if param.ndim < 2:
        return True
    lname = name.lower()
    return any(p.lower() in lname for p in patterns)


def param_groups(model: torch.nn.Module, *, weight_decay: float, no_decay_patterns: Iterable[str]) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight_decay) and ``no_decay`` (0). Frozen params are left out.

    Groups carry a ``name`` key so logs and tests can tell them apart; empty groups are dropped
    (DeepSpeed ZeRO rejects an empty group).
    """
    patterns = list(no_decay_patterns)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p, patterns) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def adamw_kwargs(device_types: Iterable[str]) -> dict:
    """The AdamW implementation for parameters on these device types (``{"cuda"}``, ``{"cpu"}``, ...).

    All on CUDA: ``fused=True`` (one kernel per step instead of a loop of small ones; the update is
    elementwise, so ZeRO partitions still update like the whole tensor). Anything else, CPU
    included: ``foreach=False``, identical arithmetic order on every layout, so ZeRO partitions of
    the same tensors update bit-identically to the single-process run (the resume/equality tests).
    """
    types = set(device_types)
    if types == {"cuda"}:
        return {"fused": True, "foreach": False}
    return {"foreach": False}


def build_optimizer(model: torch.nn.Module, *, lr: float, betas, eps: float, weight_decay: float,
                    no_decay_patterns: Iterable[str]) -> torch.optim.AdamW:
    """torch.optim.AdamW (decoupled decay), fused when every parameter is on CUDA (see
    :func:`adamw_kwargs`). DeepSpeed's FusedAdam/CPUAdam would JIT-compile on first use."""
    groups = param_groups(model, weight_decay=weight_decay, no_decay_patterns=no_decay_patterns)
    impl = adamw_kwargs(p.device.type for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **impl)


def apply_schedule_config(scheduler: torch.optim.lr_scheduler.LambdaLR, *, lr: float, warmup_steps: int,
                          max_steps: int, min_lr_ratio: float, betas, eps: float, weight_decay: float) -> float:
    """Rebuild a restored scheduler (and the optimizer's hyperparameters) from the current config,
    keeping its position; returns the lr of the next update.

    A checkpoint restores the LambdaLR with the *old* run's peak lr, warmup and ``max_steps``
    (its lambda's ``__dict__`` is in the state), so a resumed run with a new ``train.lr`` or a
    longer ``max_steps`` would silently keep the old schedule. ``last_epoch`` counts the applied
    updates (skipped non-finite steps do not advance it), so the next update uses
    ``lr * lr_factor(last_epoch)`` of the new schedule. With an unchanged config the result is
    bit-identical to the restored state (the same product LambdaLR computes). The groups'
    ``fused``/``foreach`` flags are reset from the parameters' device (:func:`adamw_kwargs`).
    """
    lam = WarmupCosine(warmup_steps, max_steps, min_lr_ratio)
    scheduler.lr_lambdas = [lam for _ in scheduler.lr_lambdas]
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    next_lr = lr * lam(scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = next_lr
        group["betas"] = tuple(betas)
        group["eps"] = eps
        # the no-decay group (see param_groups) keeps 0; groups without a name are left alone
        if group.get("name") == "decay":
            group["weight_decay"] = weight_decay
        # the implementation follows where the parameters are now, not where the checkpoint was
        # written (a CPU checkpoint resumed on GPUs steps fused, and the other way round)
        group.update({"fused": None, **adamw_kwargs(p.device.type for p in group["params"])})
    scheduler._last_lr = [next_lr for _ in scheduler.optimizer.param_groups]
    return next_lr
