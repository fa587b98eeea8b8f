"""DeepSpeed engine construction: the ds_config from TrainConfig, AdamW groups, the schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from miras_pretrain.train.config import RunConfig
from miras_pretrain.train.optim import adamw_kwargs, build_optimizer, build_scheduler


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision = {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass(frozen=True)
class TrainNumerics:
    """How one training step computes on a device.

    ``precision``: ``bf16`` turns on DeepSpeed's bf16 section (bf16 weights, activations and
    gradients; the ZeRO optimizer keeps fp32 master weights and steps on them), which is this
    engine's mixed precision (no torch.autocast on top). ``fused_adamw``: torch AdamW with
    ``fused=True`` (:func:`miras_pretrain.train.optim.adamw_kwargs`).
    """

    precision: str
    fused_adamw: bool


def training_numerics(device: torch.device, precision: str = "auto") -> TrainNumerics:
    """The numerics for ``device`` and ``train.precision``: on CUDA bf16 (``auto``) and fused
    AdamW; on CPU fp32 (``auto``) and the plain per-tensor AdamW loop, as before."""
    return TrainNumerics(precision=resolve_precision(precision, device),
                         fused_adamw=bool(adamw_kwargs([device.type]).get("fused", False)))


def deepspeed_config(cfg: RunConfig, device: torch.device, *, zero3_persistence_threshold: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (also written to the run directory)."""
    t = cfg.train
    precision = training_numerics(device, t.precision).precision
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        # overlap_comm off: the reduction order then does not depend on hook timing, which keeps
        # multi-rank runs reproducible step for step (resume equality)
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if t.zero_stage == 3:
        zero.update({"overlap_comm": False})
        if zero3_persistence_threshold is not None:
            # tiny models: partition every parameter (the default keeps small ones whole)
            zero.update({
                "stage3_param_persistence_threshold": zero3_persistence_threshold,
                "stage3_model_persistence_threshold": zero3_persistence_threshold,
            })
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # torch.optim.AdamW is not on ZeRO's tested list but is exactly what we want
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(model: torch.nn.Module, cfg: RunConfig, device: torch.device, *, mpu=None,
                 zero3_persistence_threshold: Optional[int] = None):
    """``deepspeed.initialize`` with torch AdamW (decay/no-decay groups; fused on CUDA, see
    :func:`training_numerics`) + warmup-cosine LambdaLR.

    Returns ``(engine, ds_config)``.
    """
    import deepspeed

    t = cfg.train
    model.to(device)
    optimizer = build_optimizer(
        model, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
        no_decay_patterns=t.no_decay_patterns,
    )
    scheduler = build_scheduler(
        optimizer, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio
    )
    ds_config = deepspeed_config(cfg, device, zero3_persistence_threshold=zero3_persistence_threshold)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu
    )
    return engine, ds_config
