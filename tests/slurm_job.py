"""A small data-parallel training job with the trainer's signal contract, for the launch tests.

    python tests/slurm_job.py train --config job.yaml [--resume auto]

Same contract as ``miras-pretrain train`` (miras_pretrain/train/signals.py): SIGUSR1/SIGTERM set
a flag; after the current step the ranks agree on it (all-reduce max), save a checkpoint and
exit 75; ``--resume auto`` continues from the checkpoint; 0 when all steps are done. It lets
the launch logic be tested on its own, in a few seconds per job. The YAML keys: ``out_dir``,
``steps``, ``sleep_per_step`` (s), ``crash_at_step`` (raise there: a crashing job).

Model: least squares on a fixed linear target, float64, full-batch SGD; each rank takes its
share of every step's batch and the gradients are averaged with gloo, so the loss trajectory
is the same for any world size that divides the batch, and after a resume.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

EXIT_REQUEUE = 75
BATCH = 8


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s full batch: x [BATCH, 4], y [BATCH, 1] (float64), a function of the step."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    w_true = torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64)
    return x, x @ w_true


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["train"])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", choices=["auto", "never"], default="never")
    args = p.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)

    stop = {"sig": None}

    def on_signal(signum, frame):  # only a flag: the loop decides when it is safe to save
        if stop["sig"] is None:
            stop["sig"] = signum

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert BATCH % world == 0
    print(f"rank {rank}/{world} on {os.environ.get('SLURMD_NODENAME', '?')} pid {os.getpid()}", flush=True)

    w = torch.zeros(4, 1, dtype=torch.float64)
    step = 0
    ckpt = out / "ckpt.pt"
    if args.resume == "auto" and ckpt.exists():
        state = torch.load(ckpt)
        w, step = state["w"], state["step"]
        print(f"rank {rank}: resumed from step {step}", flush=True)

    loss_value = float("nan")
    while step < cfg["steps"]:
        if cfg.get("crash_at_step") is not None and step + 1 >= cfg["crash_at_step"]:
            raise RuntimeError(f"injected crash at step {step + 1}")
        x, y = batch(step)
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        wr = w.clone().requires_grad_(True)
        # sum over this rank's rows / BATCH: the all-reduced sum is the full-batch mean
        loss = ((x[share] @ wr - y[share]) ** 2).sum() / BATCH
        loss.backward()
        grad = wr.grad.clone()
        dist.all_reduce(grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        w = w - 0.05 * grad
        step += 1
        loss_value = float(total)
        print(f"step {step} loss {loss_value:.12f}", flush=True)
        time.sleep(float(cfg.get("sleep_per_step", 0.0)))
        flag = torch.tensor([1 if stop["sig"] is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and step < cfg["steps"]:
            if rank == 0:
                tmp = out / "ckpt.pt.tmp"
                torch.save({"w": w, "step": step}, tmp)
                os.replace(tmp, ckpt)  # atomic: a kill mid-save leaves the old checkpoint
            dist.barrier()
            print(f"rank {rank}: signal {stop['sig']} -> checkpoint at step {step}, exit {EXIT_REQUEUE}", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    if rank == 0:
        (out / "final.json").write_text(json.dumps({"loss": loss_value, "steps": step, "world_size": world}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
