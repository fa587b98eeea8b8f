"""Parallelism around the model: process groups (:mod:`.state`), megatron-core tensor
parallelism handed to the model as its layout (:mod:`.layout`, :mod:`.tensor_parallel`), the
DeepSpeed pipeline (:mod:`.pipeline`), context parallelism (:mod:`.context_parallel`), the
DeepSpeed ``mpu`` adapter (:mod:`.mpu`), state-dict conversion between sharded and
single-process layouts (:mod:`.checkpoint`) and megatron's CPU compatibility layer
(:mod:`.cpu_compat`, applied only by ``initialize_parallel`` on a machine without CUDA).

Importing this package imports none of its submodules (and patches nothing): the model imports
:mod:`.layout` alone.
"""
