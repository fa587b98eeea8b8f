"""Exact resume after SIGKILL, and checkpoint-and-exit on SIGUSR1 / SIGTERM (requeue code).

Each job runs as a child process (`python -m miras_pretrain.cli train ...`, torchrun for two
ranks) in its own process group, killed on failure. Equality is exact: same seed, same layout,
CPU fp32, so every logged loss after resuming must match the uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.checkpoint import complete_checkpoints
from miras_pretrain.train.signals import EXIT_REQUEUE

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run: {step: loss} and the final validation loss."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    cfg = tiny_training.write_config(tmp / "c.yaml", _cfg(out, corpus))
    proc = tiny_training.run_train(cfg, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tiny_training.step_losses(out), tiny_training.step_losses(out, "val/loss")


def _cfg(out: Path, corpus, **extra) -> dict:
    return tiny_training.tiny_run_config(
        out, corpus, steps=STEPS, eval={"interval": 0, "batches": 2, "at_start": False},
        checkpoint={"interval": 3, "keep_last": 3}, **extra)


def _start(cfg: Path, tmp: Path, nproc: int = 1, extra=None) -> subprocess.Popen:
    return subprocess.Popen(tiny_training.train_command(cfg, nproc=nproc, extra=extra), env=tiny_training.child_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if (out / "metrics.jsonl").is_file() and step in tiny_training.step_losses(out):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} was not reached in {timeout}s")


def test_resume_after_sigkill_reproduces_losses(tmp_path, corpus, reference):
    ref_loss, ref_val = reference
    out = tmp_path / "run"
    # a short sleep per step gives the kill a window between checkpoints 3 and 6
    cfg = tiny_training.write_config(tmp_path / "c.yaml", _cfg(out, corpus, debug={"sleep_per_step": 0.5}))
    proc = _start(cfg, tmp_path)
    try:
        _wait_for_step(proc, out, 4)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        tiny_training.kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in complete_checkpoints(out / "checkpoints")]
    assert done and max(done) < STEPS
    resumed = tiny_training.run_train(cfg, tmp_path, extra=["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert tiny_training.step_losses(out) == ref_loss  # exact, every step
    assert tiny_training.step_losses(out, "val/loss") == ref_val


@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_with_requeue_code(tmp_path, corpus, reference, sig):
    """Two ranks under torchrun; only rank 1 gets the signal (ranks must agree), both save
    and exit 75; `--resume auto` then finishes with the uninterrupted run's losses."""
    ref_loss, _ = reference
    out = tmp_path / "run"
    cfg = tiny_training.write_config(tmp_path / "c.yaml", _cfg(
        out, corpus, train={"micro_batch_size": 1}, debug={"sleep_per_step": 0.3}))
    proc = _start(cfg, tmp_path, nproc=2)
    try:
        _wait_for_step(proc, out, 2)
        workers = sorted(tiny_training.child_pids(proc.pid))
        assert len(workers) == 2, workers
        os.kill(workers[1], sig)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        tiny_training.kill_group(proc)
    assert f"exitcode  : {EXIT_REQUEUE}" in stdout or f"exitcode: {EXIT_REQUEUE}" in stdout.replace("  ", " "), stdout[-3000:]
    assert "stopped by signal" in stdout
    stopped = max(s for s, _ in complete_checkpoints(out / "checkpoints"))
    assert 2 <= stopped < STEPS
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    # the 2-rank run with micro batch 1 sees the same global batches as the reference (2 x 1)
    resumed = tiny_training.run_train(cfg, tmp_path, nproc=2, extra=["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    got = tiny_training.step_losses(out)
    assert sorted(got) == sorted(ref_loss)
    for s in ref_loss:
        assert got[s] == pytest.approx(ref_loss[s], rel=1e-5, abs=1e-6), s


def test_single_process_sigterm_exit_code(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = tiny_training.write_config(tmp_path / "c.yaml", _cfg(out, corpus, debug={"sleep_per_step": 0.3}))
    proc = _start(cfg, tmp_path)
    try:
        _wait_for_step(proc, out, 1)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        tiny_training.kill_group(proc)
    assert proc.returncode == EXIT_REQUEUE, stdout[-3000:]
    assert complete_checkpoints(out / "checkpoints")
