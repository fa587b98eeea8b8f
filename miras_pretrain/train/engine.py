"""DeepSpeed engine construction: the ds_config from TrainConfig, AdamW groups, the schedule."""

from __future__ import annotations

from typing import Any, Optional

import torch

from miras_pretrain.train.config import RunConfig
from miras_pretrain.train.optim import build_optimizer, build_scheduler


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(cfg: RunConfig, device: torch.device, *, zero3_persistence_threshold: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (also written to the run directory)."""
    t = cfg.train
    precision = resolve_precision(t.precision, device)
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
    """``deepspeed.initialize`` with torch AdamW (decay/no-decay groups) + warmup-cosine LambdaLR.

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
