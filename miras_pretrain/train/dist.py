"""Process-group setup: torchrun / deepspeed launcher / SLURM env, or a lone process.

A single process started without a launcher gets a 1-process group on a free local port, so
the same DeepSpeed code path runs everywhere.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket

import torch
import torch.distributed as dist


# variables this process invented for its lone 1-process group; removed again by destroy() so
# an in-process caller (tests, the demo) is left as it was
_ADDED_ENV: list[str] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_env_for_single_process() -> None:
    # SLURM without torchrun: map SLURM's variables to torch's
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ \
            and int(os.environ["SLURM_NTASKS"]) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("SLURM launch without torchrun needs MASTER_ADDR and MASTER_PORT in the environment")
        return
    if "RANK" not in os.environ:
        added = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_PORT": str(free_port())}
        if "MASTER_ADDR" not in os.environ:
            added["MASTER_ADDR"] = "127.0.0.1"
        for k, v in added.items():
            if k not in os.environ:
                _ADDED_ENV.append(k)
            os.environ[k] = v


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: int = 1800) -> None:
    """Initialise torch.distributed + DeepSpeed comm (gloo on CPU, nccl on CUDA). Idempotent."""
    fill_env_for_single_process()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # DeepSpeed JIT-builds a shared-memory collective op on every CPU init (~22 s on a
        # fresh machine) that gloo never needs (platform notes): skip the build.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """Max of a scalar over all ranks (used for flags every rank must agree on)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(value: float, group=None) -> float:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t.item()) / dist.get_world_size(group)


def destroy() -> None:
    """Barrier then destroy: a rare ZeRO-3 teardown abort was seen without the barrier."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    reset_deepspeed_groups()
    restore_env()


def reset_deepspeed_groups() -> None:
    """Forget the process groups DeepSpeed cached at module level (``deepspeed.utils.groups``).

    They refer to the destroyed default group; a second engine in the same process (tests, the
    benchmark, the demo after a sizing run) would otherwise use them and fail.
    """
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mpu", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def restore_env() -> None:
    """Drop the launcher variables :func:`init_distributed` invented for a lone process."""
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)
