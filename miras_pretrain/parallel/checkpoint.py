"""Convert state dicts between the TP/PP-sharded layout and the single-process layout.

The single-process ("full") layout is ``build_model(cfg).state_dict()``'s parameter names:
``embed.word.weight``, ``layers.{i}.…``, ``head.norm.weight``, ``head.proj.weight``. A
``PipelineModule`` names its layers by position (``0.…`` embedding, ``{i+1}.…`` block i,
``{N+1}.…`` head, ``tied_modules.embed.…`` for a tied embedding). TP-split parameters carry
``partition_dim`` (see :mod:`miras_pretrain.model.sharded_layers`); they are concatenated over the TP group in that dim.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from miras_pretrain.model.sharded_layers import is_tensor_parallel

from . import state

_PIPE_RE = re.compile(r"^(\d+)\.(.*)$")


def _n_layers(module: nn.Module) -> int | None:
    cfg = getattr(module, "miras_config", None) or getattr(module, "cfg", None)
    return None if cfg is None else cfg.n_layers


def full_name(module: nn.Module, local: str) -> str:
    """Single-process name of the parameter ``local`` of ``module`` (MirasLM or pipeline)."""
    if local.startswith("tied_modules."):
        return "embed." + local.split(".", 2)[2]
    m = _PIPE_RE.match(local)
    if m is None:
        return local  # already the MirasLM layout
    n_layers = _n_layers(module)
    if n_layers is None:
        raise ValueError("pipeline module lacks miras_config: build it with build_pipeline_module")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return "embed." + rest
    if idx <= n_layers:
        return f"layers.{idx - 1}.{rest}"
    return "head." + rest


def gather_full_state_dict(
    module: nn.Module, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Gather this model's parameters (or ``tensors``: the same local names -> e.g. grads) into
    the single-process layout. Collective: call on every rank; every rank gets the full dict
    (CPU tensors)."""
    params = dict(module.named_parameters())
    if tensors is None:
        tensors = {n: p.detach() for n, p in params.items()}
    tp, group = state.tensor_parallel_world_size(), state.tensor_parallel_group()
    local: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        t = tensors[name]
        if t is None:
            raise ValueError(f"gather_full_state_dict: no tensor for parameter {name!r}")
        if tp > 1 and is_tensor_parallel(p):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        local[full_name(module, name)] = t.detach().cpu()
    if state.pipeline_parallel_world_size() > 1:
        stages: list = [None] * state.pipeline_parallel_world_size()
        dist.all_gather_object(stages, local, group=state.pipeline_parallel_group())
        merged: dict[str, torch.Tensor] = {}
        for part in stages:
            merged.update(part)
        local = merged
    return local


def shard_state_dict(full: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slice of a single-process state dict, named as ``module``'s parameters
    (load it with ``module.load_state_dict(out)``). Raises ValueError on a missing key or a
    shape that does not match the config."""
    tp, rank = state.tensor_parallel_world_size(), state.tensor_parallel_rank()
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        key = full_name(module, name)
        if key not in full:
            raise ValueError(f"state dict lacks {key!r}: it was saved from a different model config")
        t = full[key]
        if tp > 1 and is_tensor_parallel(p):
            t = t.chunk(tp, dim=p.partition_dim)[rank]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"state dict entry {key!r} has shape {tuple(full[key].shape)}, which does not fit "
                f"parameter {name!r} {tuple(p.shape)} at TP={tp}: check the model config"
            )
        out[name] = t.to(device=p.device, dtype=p.dtype).clone()
    return out
