"""The trainer's view of the data package: config, loaders, batch shape.

``train.micro_batch_size`` is the batch size the loaders use (a training config refuses
``data.micro_batch_size``; ``resolve_data_config`` fills it in); the data-parallel rank and size
come from the parallel layout, not the global rank.
"""

from __future__ import annotations

from typing import Any

import torch

from miras_pretrain.train.config import RunConfig, resolve_data_config


def resolve(cfg: RunConfig):
    """The validated ``DataConfig`` of the run."""
    return resolve_data_config(cfg)


def seq_len_of(data_cfg) -> int:
    return int(data_cfg.seq_len)


def build_train_loader(data_cfg, *, micro_batch_size: int, dp_rank: int, dp_size: int):
    """Infinite shuffled loader with ``state_dict()``/``load_state_dict()`` (exact resume).
    The shuffle seed is ``data.shuffle_seed``, not ``run.seed``: changing the init seed keeps
    the sample order."""
    from miras_pretrain.data import build_train_loader as _build

    return _build(data_cfg, dp_rank=dp_rank, dp_world_size=dp_size, micro_batch_size=micro_batch_size)


def build_val_loader(data_cfg, *, micro_batch_size: int, dp_rank: int, dp_size: int):
    """One unshuffled pass over the held-out split per ``iter()``."""
    from miras_pretrain.data import build_eval_loader as _build

    return _build(data_cfg, dp_rank=dp_rank, dp_world_size=dp_size, micro_batch_size=micro_batch_size)


def model_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(input_ids, labels, cu_seqlens)`` in the model's convention.

    The loader's ``documents`` layout yields ``[B, T]`` rows plus ``cu_seqlens`` over the
    flattened ``B*T`` tokens; the model takes packed documents as one ``[1, B*T]`` row.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    cu = batch.get("cu_seqlens")
    if cu is not None:
        ids = ids.reshape(1, -1)
        labels = labels.reshape(1, -1)
    return ids, labels, cu


def attach_varlen(batch: dict[str, Any]) -> dict[str, Any]:
    """Add ``batch["varlen"]``, the packed-document metadata (:class:`miras_kernels.VarlenMeta`),
    built and validated from the host copy of ``cu_seqlens`` -- call it *before* the batch moves to
    the device. It is the once-per-batch host work that lets the model's layers run without
    reading device memory on the host (no GPU sync per layer). Batches without ``cu_seqlens``
    (the ``packed`` layout) are returned as they are."""
    cu = batch.get("cu_seqlens")
    if cu is None or "varlen" in batch:
        return batch
    from miras_kernels import VarlenMeta

    ids = batch["input_ids"]
    out = dict(batch)
    out["varlen"] = VarlenMeta.from_host(cu, total=ids.numel())
    return out


def model_varlen(batch: dict[str, Any]) -> Any:
    """The model's ``cu_seqlens`` argument for a batch after its move to the device: the
    :class:`miras_kernels.VarlenMeta` of :func:`attach_varlen` around the moved offsets tensor (no
    second copy, nothing read back), else the bare ``cu_seqlens`` tensor, else None."""
    cu = batch.get("cu_seqlens")
    meta = batch.get("varlen")
    if meta is None or cu is None:
        return cu
    return meta.with_device_offsets(cu)
