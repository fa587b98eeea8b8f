"""Process-group setup: torchrun / deepspeed launcher / SLURM env, or a lone process.

A single process started without a launcher gets a 1-process group on a free local port, so
the same DeepSpeed code path runs everywhere.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

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


# Variables that say this process was given GPUs, in the order they are reported: the launcher's
# own (rendered by `launch slurm --gpus-per-node N`), then the scheduler's, then CUDA's.
GPU_REQUEST_VARS = ("MIRAS_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
# counts (a number of GPUs) vs lists (GPU indices: "0" is the first GPU, not none)
_COUNT_VARS = ("MIRAS_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")
# list values that assign no GPU: SLURM writes NoDevFiles into CUDA_VISIBLE_DEVICES when a job has
# none, and -1 / empty are the usual ways to hide every GPU
_NO_GPU_LISTS = {"", "-1", "nodevfiles", "none", "void"}


def gpus_requested(env: Mapping[str, str] | None = None) -> str | None:
    """Why this process must run on a GPU, as ``"NAME=value"`` of the first variable of
    :data:`GPU_REQUEST_VARS` that assigns GPUs (a count > 0, or a non-empty list of GPU
    indices); None when nothing asks for one."""
    env = os.environ if env is None else env
    for name in GPU_REQUEST_VARS:
        value = env.get(name)
        if value is None:
            continue
        value = value.strip()
        if name in _COUNT_VARS:
            # SLURM_GPUS_ON_NODE is a plain count; anything else there still means GPUs were given
            asks = (int(value) > 0) if value.isdigit() else bool(value)
        else:
            asks = value.lower() not in _NO_GPU_LISTS
        if asks:
            return f"{name}={value}"
    return None


@dataclass(frozen=True)
class DeviceChoice:
    """The device type for this process and the line to log once about it (None: nothing to say)."""

    type: str  # "cuda" | "cpu"
    note: str | None = None


def choose_device(requested: str, *, env: Mapping[str, str], torch_version: str, cuda_build: str | None,
                  cuda_available: bool) -> DeviceChoice:
    """Decide cpu or cuda from ``train.device`` and plain facts about this process (testable
    without a GPU). Never falls back to the CPU when a GPU was asked for.

    Args:
        requested: ``train.device``: ``auto`` | ``cpu`` | ``cuda``.
        env: the process environment (see :func:`gpus_requested`).
        torch_version: ``torch.__version__``.
        cuda_build: ``torch.version.cuda`` (None for a CPU build of torch).
        cuda_available: ``torch.cuda.is_available()``.

    Raises:
        ValueError: one line with the cause and the fix when a GPU is asked for (``cuda``, or
            ``auto`` with GPUs assigned) and torch is a CPU build or sees no GPU.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device = {requested!r}: use auto, cpu or cuda")
    asked = gpus_requested(env)
    if requested == "cpu":
        note = (f"device: cpu (train.device = cpu, although GPUs are assigned: {asked})" if asked else None)
        return DeviceChoice("cpu", note)
    if requested == "cuda" or asked:
        cause = "train.device = 'cuda'" if requested == "cuda" else f"GPUs are assigned to this job ({asked})"
        if cuda_build is None:
            venv = env.get("VIRTUAL_ENV") or sys.prefix
            raise ValueError(f"{cause} but torch {torch_version} in {venv} is a CPU build: install the CUDA build "
                             f"with `bash tools/setup_env.sh --gpu` (docs/install_gpu.md), or set train.device: cpu")
        if not cuda_available:
            raise ValueError(f"{cause} but torch {torch_version} (CUDA {cuda_build}) sees no GPU "
                             f"(torch.cuda.is_available() is False): check nvidia-smi and the driver on this node "
                             f"(.venv/bin/python tools/check_torch_build.py), or set train.device: cpu")
        return DeviceChoice("cuda")
    if cuda_available:
        return DeviceChoice("cuda")
    return DeviceChoice("cpu", f"device: cpu (train.device = auto: no GPU asked for by the job or scheduler and "
                               f"none visible; torch {torch_version})")


def _is_first_rank() -> bool:
    """Rank 0 (or a lone process) by the launcher's variables; used before the group exists."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def pick_device(requested: str = "auto", *, announce: bool = True) -> torch.device:
    """The device this process trains on (``cuda:LOCAL_RANK`` or ``cpu``), see :func:`choose_device`;
    its note (e.g. "device: cpu (...)") is printed once, by rank 0, when ``announce``."""
    # a ROCm build drives AMD GPUs through torch.cuda: it counts as a GPU build here
    gpu_build = torch.version.cuda or getattr(torch.version, "hip", None)
    choice = choose_device(requested, env=os.environ, torch_version=torch.__version__,
                           cuda_build=gpu_build, cuda_available=torch.cuda.is_available())
    if announce and choice.note and _is_first_rank():
        print(choice.note, flush=True)
    if choice.type == "cuda":
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
