"""Start a few local gloo processes for CP checks and benchmarks (tests, ``tools/bench_cp.py``).

:func:`spawn` runs ``fn(rank, world, *args)`` in ``world`` fresh processes (start method
``spawn``) with torch.distributed initialised on 127.0.0.1 and kills every child when one fails
or the deadline passes, so a hang or a crash never leaves processes behind.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from miras_pretrain.parallel.state import destroy_parallel

from .local_launch import free_port, run_local_workers


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, megatron: bool, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if not megatron:  # megatron users call initialize_parallel themselves
        import datetime

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            if megatron:
                destroy_parallel()
            else:
                dist.barrier()
                dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0, megatron: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; raise if any fails or the
    deadline passes (children are killed in every case). ``fn`` must be importable by name."""
    run_local_workers(_entry, (fn, world, free_port(), megatron, args), world, timeout=timeout,
                      what="CP workers")
