"""`miras-pretrain launch slurm` + the real trainer on a real two-node SLURM (no mocks).

1. a 2-node job (torchrun, one process per emulated node, gloo data parallelism) trains the
   tiny model and exits 0; the job completion log says COMPLETED;
2. the same job, signalled mid-run as SLURM's ``--signal=B:USR1@lead`` would (``scancel --batch
   --signal=USR1``), saves, requeues itself, resumes with ``--resume auto`` and finishes with
   the same final train and validation loss as the uninterrupted run of 1.
(The crash retry limit is tested with the stand-in job in test_slurm_launch_logic.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miras_pretrain.cli import main
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
MAX_STEPS = 6


def job_dir(cluster: SlurmCluster, name: str) -> Path:
    """A fresh directory under the cluster's own temp dir. Not pytest's tmp_path: pytest prunes
    old basetemps, also those of other sessions that are still running on this machine."""
    path = cluster.root / "jobs" / name
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def tiny_data(slurm_cluster) -> Path:
    """Tokenizer + packed MDS shards from the embedded stdlib corpus (a few hundred KB)."""
    root = job_dir(slurm_cluster, "data")
    proc = subprocess.run(
        [sys.executable, "-m", "miras_pretrain.cli", "data", "prepare", "--builtin", "stdlib", "--out", str(root),
         "--max-bytes", "300000", "--vocab-size", "512", "--layout", "packed", "--seq-len", "64",
         "--workers", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root


def write_config(path: Path, data: Path, out_dir: Path) -> Path:
    """A tiny Moneta run: 6 fp32 CPU steps, validation at the end, metrics every step."""
    path.write_text(f"""\
run: {{name: slurm-tiny, out_dir: {out_dir}, seed: 7}}
model:
  from: moneta_tiny
  vocab_size: 512
  d_model: 32
  n_layers: 1
  n_heads: 2
  ffn_hidden: 64
data:
  streams: [{data / 'data'}]
  layout: packed
  seq_len: 64
  num_workers: 0
  tokenizer: {data / 'tokenizer.model'}
train: {{max_steps: {MAX_STEPS}, micro_batch_size: 2, warmup_steps: 1, lr: 1.0e-3, device: cpu, precision: fp32,
        zero_stage: 1}}
eval: {{interval: 0, batches: 2, at_start: false}}
checkpoint: {{interval: 0}}
log: {{interval: 1, progress_bar: false, wandb: false}}
""")
    return path


def launch(cluster: SlurmCluster, monkeypatch, capsys, config: Path, log_dir: Path, *extra: str) -> int:
    """Submit through the CLI (as a user would) against the test cluster; return the job id."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    rc = main(["launch", "slurm", "--config", str(config), "--nodes", "2", "--gpus-per-node", "0",
               "--procs-per-node", "1", "--time", "15:00", "--signal-lead", "120", "--max-retries", "1",
               "--log-dir", str(log_dir), *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = re.search(r"submitted job (\d+)", out)
    assert m, out
    return int(m.group(1))


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_losses(out_dir: Path) -> tuple[float, float]:
    rows = metrics(out_dir)
    train = [r for r in rows if "train/loss" in r and r["step"] == MAX_STEPS]
    val = [r for r in rows if "val/loss" in r and r["step"] == MAX_STEPS]
    assert len(train) == 1 and len(val) == 1, rows
    return train[0]["train/loss"], val[0]["val/loss"]


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_data):
    """Job 1: the whole run in one go; returns (job id, log dir, out dir, completion records)."""
    root = job_dir(slurm_cluster, "uninterrupted")
    cfg = write_config(root / "run.yaml", tiny_data, root / "out")
    # the command line exactly as a user types it (env: SLURM_CONF of the test cluster)
    proc = subprocess.run(
        [sys.executable, "-m", "miras_pretrain.cli", "launch", "slurm", "--config", str(cfg), "--nodes", "2",
         "--gpus-per-node", "0", "--procs-per-node", "1", "--time", "15:00", "--signal-lead", "120",
         "--log-dir", str(root / "logs")],
        capture_output=True, text=True, timeout=120, env=slurm_cluster.env)
    assert proc.returncode == 0, proc.stderr
    job_id = int(re.search(r"submitted job (\d+)", proc.stdout).group(1))
    records = slurm_cluster.wait_until_done(job_id, 240, kick_requeued=False)
    return job_id, root / "logs", root / "out", records


def test_two_node_job_trains_and_completes(uninterrupted):
    job_id, logs, out, records = uninterrupted
    log = (logs / f"slurm-tiny-{job_id}.out").read_text()
    assert [r["JobState"] for r in records] == ["COMPLETED"], (records, log)
    assert records[0]["NodeCnt"] == "2" and records[0]["ExitCode"] == "0:0"
    assert "restart 0: training finished (exit 0): done, no requeue" in log, log
    # the batch script's copy sits next to the log
    assert (logs / f"slurm-tiny-{job_id}.sbatch").read_text().startswith("#!/bin/bash")
    # one torchrun per emulated node, each with one worker: a 2-rank data-parallel run
    node_dirs = list((logs / f"slurm-tiny-{job_id}" / "torchrun").iterdir())
    assert len(node_dirs) == 2, node_dirs
    metas = list((out / "checkpoints").rglob("meta.json"))
    assert metas, "no checkpoint written at the end"
    meta = json.loads(metas[0].read_text())
    assert (meta["world_size"], meta["dp"]) == (2, 2), meta  # data parallel across the two nodes
    assert meta["tokens_seen"] == MAX_STEPS * 2 * 2 * 64  # steps x micro batch x dp x seq_len
    steps = sorted({r["step"] for r in metrics(out) if "train/loss" in r})
    assert steps == list(range(1, MAX_STEPS + 1))


def test_preempted_job_requeues_resumes_and_matches(uninterrupted, slurm_cluster, tiny_data, monkeypatch, capsys):
    _, _, ref_out, _ = uninterrupted
    root = job_dir(slurm_cluster, "preempted")
    cfg = write_config(root / "run.yaml", tiny_data, root / "out")
    # half a second per step gives the signal a window to land mid-run
    job_id = launch(slurm_cluster, monkeypatch, capsys, cfg, root / "logs", "--set", "debug.sleep_per_step=0.5")
    deadline = time.monotonic() + 180
    while not any(r.get("step", 0) >= 2 and "train/loss" in r for r in metrics(root / "out")):
        assert time.monotonic() < deadline, "the job never reached step 2"
        time.sleep(0.2)
    # what --signal=B:USR1@lead does before the time limit: signal the batch shell only
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job_id))
    records = slurm_cluster.wait_until_done(job_id, 240)
    log = (root / "logs" / f"slurm-tiny-{job_id}.out").read_text()
    assert [r["JobState"] for r in records] == ["PENDING", "COMPLETED"], (records, log)  # requeued once
    assert "got SIGUSR1" in log and "trainer stopped after a signal" in log, log
    assert "stopped by signal at step" in log and "resumed from" in log, log
    assert "restart 1: training finished (exit 0): done, no requeue" in log, log
    assert slurm_cluster.job(job_id).restarts == 1
    stopped_at = int(re.search(r"stopped by signal at step (\d+)", log).group(1))
    assert 2 <= stopped_at < MAX_STEPS
    # resuming is exact: the same final losses as the uninterrupted run, to the last bit
    assert final_losses(root / "out") == final_losses(ref_out)
