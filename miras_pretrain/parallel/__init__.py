"""Tensor / pipeline / data parallelism for the model (megatron-core TP layers, DeepSpeed
pipeline), a DeepSpeed ``mpu`` adapter, CPU compatibility for megatron, and state-dict
conversion between sharded and single-process layouts. Heavy imports stay in the submodules."""

from .state import (
    context_parallel_global_ranks,
    context_parallel_group,
    context_parallel_rank,
    context_parallel_world_size,
    data_context_parallel_group,
    data_parallel_group,
    data_parallel_rank,
    data_parallel_world_size,
    destroy_parallel,
    initialize_parallel,
    is_initialized,
    pipeline_parallel_group,
    pipeline_parallel_rank,
    pipeline_parallel_world_size,
    tensor_parallel_group,
    tensor_parallel_rank,
    tensor_parallel_world_size,
)

__all__ = [
    "initialize_parallel", "destroy_parallel", "is_initialized",
    "tensor_parallel_world_size", "tensor_parallel_rank", "tensor_parallel_group",
    "pipeline_parallel_world_size", "pipeline_parallel_rank", "pipeline_parallel_group",
    "data_parallel_world_size", "data_parallel_rank", "data_parallel_group",
    "context_parallel_world_size", "context_parallel_rank", "context_parallel_group",
    "context_parallel_global_ranks", "data_context_parallel_group",
]
