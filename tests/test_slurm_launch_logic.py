"""The batch script's requeue/retry logic on a real two-node SLURM, with a small stand-in job.

tests/slurm_job.py honours the trainer's contract (checkpoint + exit 75 on SIGUSR1/SIGTERM,
``--resume auto``) in a few seconds per run, so these tests pin the launch logic down on their
own, in srun mode (one task per process): a signal to the step alone, whose exit 75 drives the
requeue, and the crash retry limit. test_slurm_train.py covers the torchrun layout and the
batch-shell signal path with the real trainer.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from miras_pretrain.launch.render import SlurmJobSpec, render_sbatch
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)
from slurm_job import BATCH, batch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def reference_final_loss(steps: int) -> float:
    """The stand-in job's last logged loss, computed in one process without interruption."""
    w = torch.zeros(4, 1, dtype=torch.float64)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x, y = batch(step)
        r = x @ w - y
        loss = (r ** 2).sum() / BATCH
        w = w - 0.05 * (2 * x.T @ r / BATCH)
    return float(loss)


def submit_job(cluster: SlurmCluster, name: str, *, launcher: str, steps: int, sleep: float = 0.0,
               crash_at_step: int | None = None, max_retries: int = 3) -> tuple[int, Path, Path]:
    """Render the batch script for the stand-in job and sbatch it; return (job id, log dir, out dir)."""
    root = cluster.root / "jobs" / name
    (root / "logs").mkdir(parents=True)
    out = root / "out"
    cfg = root / "job.yaml"
    cfg.write_text(json.dumps({"out_dir": str(out), "steps": steps, "sleep_per_step": sleep,
                               "crash_at_step": crash_at_step}))
    spec = SlurmJobSpec(
        job_name=name, train_argv=[str(REPO / "tests" / "slurm_job.py"), "train", "--config", str(cfg),
                                   "--resume", "auto"],
        nodes=2, time="10:00", log_dir=root / "logs", workdir=REPO, procs_per_node=1, launcher=launcher,
        signal_lead=60, max_retries=max_retries, venv=Path(sys.prefix) if sys.prefix != sys.base_prefix else None,
    )
    script = root / "job.sbatch"
    script.write_text(render_sbatch(spec))
    job_id = int(cluster.run("sbatch", "--parsable", str(script)).stdout.strip())
    return job_id, root / "logs", out


def wait_for_text(log_dir: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in log_dir.rglob("*"):
            if f.is_file() and text in f.read_text(errors="replace"):
                return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} did not appear under {log_dir} within {timeout} s")


def job_log(log_dir: Path, name: str, job_id: int) -> str:
    return (log_dir / f"{name}-{job_id}.out").read_text()


def test_step_signal_srun_mode_exit_code_requeues(slurm_cluster):
    """srun mode: a signal to the step alone reaches the ranks, whose exit 75 drives the requeue."""
    steps = 8
    job_id, logs, out = submit_job(slurm_cluster, "preempt-srun", launcher="srun", steps=steps, sleep=0.5)
    wait_for_text(logs, "step 2 loss", 90)
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))  # steps only, not the batch shell
    records = slurm_cluster.wait_until_done(job_id, 150)
    log = job_log(logs, "preempt-srun", job_id)
    assert [r["JobState"] for r in records] == ["PENDING", "COMPLETED"], (records, log)
    assert "got SIGUSR1" not in log  # the batch shell was not signalled ...
    assert "trainer stopped after a signal (exit 75" in log, log  # ... the exit code told it
    assert "resumed from step" in (logs / f"preempt-srun-{job_id}" / "rank-0.log").read_text()
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2 and final["loss"] == pytest.approx(reference_final_loss(steps), rel=1e-12)


def test_crash_stops_after_retry_limit(slurm_cluster):
    job_id, logs, out = submit_job(slurm_cluster, "crash", launcher="srun", steps=5, crash_at_step=2,
                                   max_retries=1)
    records = slurm_cluster.wait_until_done(job_id, 150)
    log = job_log(logs, "crash", job_id)
    # first run crashes -> requeued (retry 1 of 1); second run crashes -> limit reached, no requeue
    assert [r["JobState"] for r in records] == ["PENDING", "FAILED"], (records, log)
    # (the exit code is the worst rank's: 1 from the exception, or 134 when gloo aborts a rank
    # whose peer has died first)
    assert re.search(r"restart 0: trainer failed with exit code \d+ \(retry 1 of 1\): requeuing", log), log
    assert re.search(r"restart 1: FATAL: trainer failed with exit code \d+; 2 failed runs, retry limit "
                     r"reached \(--max-retries 1, SLURM_RESTART_COUNT=1\): giving up, not requeuing", log), log
    assert slurm_cluster.job(job_id).restarts == 1
    assert "injected crash at step 2" in (logs / f"crash-{job_id}" / "rank-0.log").read_text()
    assert not (out / "final.json").exists()
