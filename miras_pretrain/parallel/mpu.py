"""DeepSpeed ``mpu`` adapter over megatron-core's ``parallel_state``.

``deepspeed.initialize(..., mpu=MegatronMPU())`` needs the older Megatron-LM method names
(``get_model_parallel_*``, ``get_data_parallel_group_ranks``); ``parallel_state`` does not
provide all of them, so this thin object forwards each one. "Model parallel" here means tensor
parallel (DeepSpeed's meaning: ranks that hold different shards of the same parameters).
"""

from __future__ import annotations

import torch.distributed as dist

from . import state


class MegatronMPU:
    """The mpu object DeepSpeed expects, backed by megatron's initialised groups."""

    def __init__(self) -> None:
        if not state.is_initialized():
            raise ValueError(
                "MegatronMPU needs megatron's groups: call miras_pretrain.parallel."
                "initialize_parallel(tp, pp) first"
            )
        from megatron.core import parallel_state

        self._ps = parallel_state

    # model (= tensor) parallel
    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_slice_parallel_rank(self) -> int:
        return self.get_model_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return self.get_model_parallel_world_size()

    def get_slice_parallel_group(self):
        return self.get_model_parallel_group()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(dist.get_process_group_ranks(self.get_data_parallel_group()))

    # context parallel, in DeepSpeed's names for its sequence parallelism: DeepSpeed then reduces
    # gradients (and partitions ZeRO states) over DP x CP and divides by DP only, i.e. it SUMS
    # over the CP group -- each CP rank's loss must be its share of the global mean
    # (``batch["cp_loss_scale"]`` from ``slice_batch_for_cp``). The data-parallel getters above
    # stay DP only (the data loader's view). DeepSpeed's pipeline engine ignores these names;
    # see docs/context_parallel.md for CP x PP.
    def get_sequence_parallel_world_size(self) -> int:
        return self._ps.get_context_parallel_world_size()

    def get_sequence_parallel_rank(self) -> int:
        return self._ps.get_context_parallel_rank()

    def get_sequence_parallel_group(self):
        return self._ps.get_context_parallel_group()

    def get_sequence_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_sequence_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group
