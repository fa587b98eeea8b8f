"""Process groups for tensor (TP), context (CP), pipeline (PP) and data (DP) parallelism.

megatron-core's ``parallel_state`` owns the groups (rank layout "tp-cp-ep-dp-pp": TP fastest,
then CP, then DP, then PP -- with CP = 1 the same layout as DeepSpeed's
``PipeModelDataParallelTopology``, so the two libraries agree on who is in which group).
The data-parallel getters here EXCLUDE the CP dimension (the ranks of a CP group read the same
batch); gradients must still be reduced over DP x CP (``data_context_parallel_group``, which the
DeepSpeed ``mpu`` adapter hands to DeepSpeed as its sequence-data-parallel group). Every getter here also works when nothing is
initialised (a single process): sizes 1, ranks 0, groups None.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist

from .cpu_compat import install_cpu_compat, uninstall_cpu_compat


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def is_initialized() -> bool:
    """True when megatron's model-parallel groups exist (the model then uses megatron layers)."""
    # megatron cannot have groups unless it was imported: skip its (slow) import otherwise, e.g.
    # in plain torch.distributed processes
    if "megatron.core.parallel_state" not in sys.modules:
        return False
    return dist.is_available() and dist.is_initialized() and _ps().model_parallel_is_initialized()


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    cp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> None:
    """Initialise torch.distributed (through DeepSpeed's comm, which the engine needs) and
    megatron's TP/PP/DP groups; seed megatron's RNG tracker.

    Reads the usual launcher environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).
    ``cp`` is the context-parallel size (megatron's ``context_parallel_size``).
    ``backend`` defaults to nccl with CUDA, gloo without. On a CPU machine the megatron CPU
    compatibility layer (:mod:`.cpu_compat`) is installed first.
    """
    if tp < 1 or pp < 1 or cp < 1:
        raise ValueError(f"initialize_parallel: tp={tp}, pp={pp} and cp={cp} must be >= 1")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if not cuda:
        install_cpu_compat()
        # DeepSpeed JIT-builds a shared-memory op (~22 s) on every CPU init; we do not use it.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s)
        )
    else:  # torch.distributed came up elsewhere: let DeepSpeed's comm wrap it
        deepspeed.init_distributed(dist_backend=backend)
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(
            f"initialize_parallel: world size {world} is not divisible by tp*pp*cp={tp * pp * cp}; "
            "choose tp, pp and cp whose product divides the number of processes"
        )
    ps = _ps()
    if ps.model_parallel_is_initialized():
        if (tensor_parallel_world_size() != tp or pipeline_parallel_world_size() != pp
                or context_parallel_world_size() != cp):
            raise ValueError("initialize_parallel: already initialised with different tp/pp/cp sizes")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (barrier first: avoids the
    rare teardown abort seen with gloo), and undo the CPU compatibility patches."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        _ps().destroy_model_parallel()
        dist.destroy_process_group()
    uninstall_cpu_compat()


def tensor_parallel_world_size() -> int:
    return _ps().get_tensor_model_parallel_world_size() if is_initialized() else 1


def tensor_parallel_rank() -> int:
    return _ps().get_tensor_model_parallel_rank() if is_initialized() else 0


def tensor_parallel_group():
    return _ps().get_tensor_model_parallel_group() if is_initialized() else None


def pipeline_parallel_world_size() -> int:
    return _ps().get_pipeline_model_parallel_world_size() if is_initialized() else 1


def pipeline_parallel_rank() -> int:
    return _ps().get_pipeline_model_parallel_rank() if is_initialized() else 0


def pipeline_parallel_group():
    return _ps().get_pipeline_model_parallel_group() if is_initialized() else None


def data_parallel_world_size() -> int:
    return _ps().get_data_parallel_world_size() if is_initialized() else 1


def data_parallel_rank() -> int:
    return _ps().get_data_parallel_rank() if is_initialized() else 0


def data_parallel_group():
    return _ps().get_data_parallel_group() if is_initialized() else None


def context_parallel_world_size() -> int:
    return _ps().get_context_parallel_world_size() if is_initialized() else 1


def context_parallel_rank() -> int:
    return _ps().get_context_parallel_rank() if is_initialized() else 0


def context_parallel_group():
    return _ps().get_context_parallel_group() if is_initialized() else None


def context_parallel_global_ranks() -> list[int]:
    """Global ranks of this process's CP group, in sequence order (slice i on ranks[i])."""
    if not is_initialized():
        return [dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]
    return list(_ps().get_context_parallel_global_ranks())


def data_context_parallel_group():
    """DP x CP: the group over which gradients are reduced when CP > 1."""
    return _ps().get_data_parallel_group(with_context_parallel=True) if is_initialized() else None


def data_context_parallel_world_size() -> int:
    return _ps().get_data_parallel_world_size(with_context_parallel=True) if is_initialized() else 1


def data_context_parallel_rank() -> int:
    return _ps().get_data_parallel_rank(with_context_parallel=True) if is_initialized() else 0
