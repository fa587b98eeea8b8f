"""Run a few local worker processes and never leave one behind (tests, CPU benchmarks).

One place for what every multi-process check needs: a free loopback port for the rendezvous
(:func:`free_port`, the one a lone training process uses too) and a join loop with a deadline
that kills every child when one fails, hangs or the caller is interrupted.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch.multiprocessing as mp

from miras_pretrain.train.dist import free_port

__all__ = ["free_port", "run_local_workers"]


def run_local_workers(entry: Callable[..., Any], args: tuple, nprocs: int, *, timeout: float,
                      what: str = "workers") -> None:
    """``entry(rank, *args)`` in ``nprocs`` fresh processes (start method ``spawn``).

    Raises if a worker fails (torch terminates the others) or ``timeout`` seconds pass
    (``TimeoutError`` naming ``what``); every child still alive is killed on the way out."""
    ctx = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):  # raises if a worker failed (and terminates the others)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
