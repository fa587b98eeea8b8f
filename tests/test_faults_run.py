"""Faults around run ownership and resume, on real tiny runs (issue 21, part B).

* two trainers on one ``run.out_dir``: the second stops with one line naming the directory and
  the lock holder's PID (exit 2), the first finishes untouched;
* a fresh run into a directory holding an earlier run is refused with the choices; ``--overwrite``
  deletes the old run's traces so nothing mixes;
* resuming with a changed model is an explicit opt-in, and a tensor that no longer fits is one line;
* a changed schedule (``train.lr``, ``train.max_steps``) applies from the resumed step;
* the non-finite skip counter starts anew in a resumed run.

The base run stops at step 4 of a 4-step warmup, so its losses equal the first 4 steps of any
longer run with the same warmup: a resumed run with a longer ``max_steps`` must then log exactly
the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.checkpoint import complete_checkpoints
from miras_pretrain.train.optim import lr_factor

WARMUP = 4
LR = 3e-3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _cfg(out: Path, corpus, steps: int, **sections) -> dict:
    train = {"warmup_steps": WARMUP, "lr": LR, **sections.pop("train", {})}
    return tiny_training.tiny_run_config(out, corpus, steps=steps, train=train,
                                         checkpoint=sections.pop("checkpoint", {"interval": 0, "keep_last": 2}),
                                         **sections)


def _run(tmp: Path, out: Path, corpus, steps: int, extra=(), **sections) -> subprocess.CompletedProcess:
    cfg = tiny_training.write_config(tmp / f"c_{out.name}_{time.monotonic_ns()}.yaml", _cfg(out, corpus, steps, **sections))
    return tiny_training.run_train(cfg, tmp, extra=list(extra), timeout=300)


def _error_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "miras-pretrain train: error:" in line]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    lines = _error_lines(proc.stdout)
    assert len(lines) == 1, proc.stdout[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A finished 4-step run (checkpoint at step 4, inside the warmup)."""
    tmp = tmp_path_factory.mktemp("base")
    out = tmp / "run"
    proc = _run(tmp, out, corpus, 4)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def reference8(tmp_path_factory, corpus):
    """The uninterrupted 8-step run with the same warmup: ``{step: loss}``."""
    tmp = tmp_path_factory.mktemp("ref8")
    out = tmp / "run"
    proc = _run(tmp, out, corpus, 8)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tiny_training.step_losses(out)


def _copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("data_cache", ".lock"))
    return dest


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run directory (but the data cache and the lock file) with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "data_cache" not in p.parts and p.name != ".lock"}


# ---------------------------------------------------------------- one run per directory
@pytest.mark.slow  # two tiny runs, over 20 s
def test_second_trainer_on_a_live_run_directory_is_refused(tmp_path, corpus, base):
    out = tmp_path / "run"
    cfg = tiny_training.write_config(tmp_path / "c.yaml", _cfg(out, corpus, 6, debug={"sleep_per_step": 1.0}))
    first = subprocess.Popen(tiny_training.train_command(cfg), env=tiny_training.child_env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and tiny_training.step_losses(out)):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "the first run logged no step"
            time.sleep(0.2)
        # --resume auto: the run-directory check for fresh runs does not apply, only the lock
        second = tiny_training.run_train(cfg, tmp_path, extra=["--resume", "auto"], timeout=240)
        first_out, _ = first.communicate(timeout=240)
    finally:
        tiny_training.kill_group(first)
    _assert_one_line_error(second, str(out), f"PID {first.pid}", "another trainer")
    assert first.returncode == 0, first_out[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # no row of the second
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    base_losses = tiny_training.step_losses(base)
    assert {s: tiny_training.step_losses(out)[s] for s in base_losses} == base_losses


def test_fresh_run_into_an_old_run_directory_is_refused(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    before = _snapshot(out)
    proc = _run(tmp_path, out, corpus, 4)
    _assert_one_line_error(proc, str(out), "--resume auto", "run.out_dir", "--overwrite", "metrics.jsonl")
    assert _snapshot(out) == before  # nothing of the old run was touched, nothing appended


def test_overwrite_replaces_the_old_run_entirely(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    (out / "checkpoints" / "step_00000099").mkdir()  # a higher step of the old run must not survive
    (out / "checkpoints" / "step_00000099" / "meta.json").write_text("{}")
    (out / "wandb_run_id").write_text("oldrun42")
    (out / "wandb" / "offline-run-old").mkdir(parents=True)
    proc = _run(tmp_path, out, corpus, 4, extra=["--overwrite"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "deleted the earlier run" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # not appended to the old rows
    assert tiny_training.step_losses(out) == tiny_training.step_losses(base)
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [4]
    assert not (out / "wandb_run_id").exists() and not (out / "wandb").exists()


def test_overwrite_and_resume_together_is_an_error(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    before = _snapshot(out)
    proc = _run(tmp_path, out, corpus, 4, extra=["--overwrite", "--resume", "auto"])
    _assert_one_line_error(proc, "--overwrite", "--resume")
    assert _snapshot(out) == before


# ---------------------------------------------------------------- resume with a changed config
def test_resume_with_a_changed_model_is_refused_listing_the_fields(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    before = _snapshot(out)
    proc = _run(tmp_path, out, corpus, 6, extra=["--resume", "auto"],
                model={**tiny_training.TINY_MODEL, "chunk_size": 16, "rope_theta": 500.0})
    _assert_one_line_error(proc, "model.chunk_size: 8 -> 16", "model.rope_theta: 10000.0 -> 500.0",
                           "--allow-model-change")
    assert _snapshot(out) == before  # config.yaml keeps the checkpoint's model


def test_allow_model_change_resumes_a_shape_compatible_change(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    proc = _run(tmp_path, out, corpus, 5, extra=["--resume", "auto", "--allow-model-change"],
                model={**tiny_training.TINY_MODEL, "chunk_size": 16})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "--allow-model-change: resuming" in proc.stdout and "model.chunk_size: 8 -> 16" in proc.stdout
    assert 5 in tiny_training.step_losses(out)


def test_shape_incompatible_model_change_is_one_line_naming_the_tensor(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    before = _snapshot(out)
    proc = _run(tmp_path, out, corpus, 6, extra=["--resume", "auto", "--allow-model-change"],
                model={**tiny_training.TINY_MODEL, "d_model": 48})
    _assert_one_line_error(proc, "tensor embed.word.weight", "[512, 32]", "[512, 48]")
    assert _snapshot(out) == before


def test_resume_with_a_longer_max_steps_equals_the_uninterrupted_run(tmp_path, corpus, base, reference8):
    out = _copy_run(base, tmp_path / "run")
    proc = _run(tmp_path, out, corpus, 8, extra=["--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "train.max_steps: 4 -> 8" in proc.stdout
    assert tiny_training.step_losses(out) == reference8  # exact: the schedule was rebuilt for 8 steps


def test_resume_with_a_lower_lr_uses_it_from_the_resumed_step(tmp_path, corpus, base):
    out = _copy_run(base, tmp_path / "run")
    new_lr = 1e-3
    proc = _run(tmp_path, out, corpus, 8, extra=["--resume", "auto"], train={"lr": new_lr})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "train.lr: 0.003 -> 0.001" in proc.stdout
    lrs = tiny_training.step_losses(out, "train/lr")
    for step in range(5, 9):  # the lr logged after update `step` is the one the next update uses
        want = new_lr * lr_factor(step, warmup_steps=WARMUP, max_steps=8, min_lr_ratio=0.1)
        assert lrs[step] == pytest.approx(want, rel=1e-6), step
    for step in range(1, 5):  # the old run's rows are untouched
        assert lrs[step] == pytest.approx(LR * lr_factor(step, warmup_steps=WARMUP, max_steps=4,
                                                         min_lr_ratio=0.1), rel=1e-6)


@pytest.mark.slow  # two tiny runs, over 20 s
def test_skip_counter_does_not_carry_into_a_resumed_run(tmp_path, corpus):
    """Stopped with exit 3 after 3 non-finite steps (3, 4, 5; checkpoints at 3 and 4 hold 1 and
    2 skips in a row). Resumed with a lower lr and one more non-finite step, it must train on:
    a restored counter would reach the limit at once."""
    out = tmp_path / "run"
    nan = dict(train={"max_consecutive_skips": 3}, checkpoint={"interval": 1, "keep_last": 3})
    first = _run(tmp_path, out, corpus, 8, debug={"nan_loss_steps": [3, 4, 5]}, **nan)
    assert first.returncode == 3, first.stdout[-3000:]
    resumed = _run(tmp_path, out, corpus, 8, extra=["--resume", "auto"],
                   debug={"nan_loss_steps": [5]}, **{**nan, "train": {"max_consecutive_skips": 3, "lr": 1e-3}})
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "step_00000004 at step 4" in resumed.stdout
    losses = tiny_training.step_losses(out)
    assert all(isinstance(losses[s], float) and math.isfinite(losses[s]) for s in (6, 7, 8)), losses
    assert tiny_training.step_losses(out, "train/skipped_steps")[8] == 3  # the total does carry on


def test_run_dir_traces_ignore_an_empty_metrics_file(tmp_path):
    """A job that failed before logging a row leaves an empty metrics.jsonl: rerunning the same
    command must not be refused for it, while a file with rows is an earlier run."""
    from miras_pretrain.train.run_dir import RunDirError, claim_fresh_run, old_run_traces

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert old_run_traces(out, out / "checkpoints") == []
    assert claim_fresh_run(out, out / "checkpoints", overwrite=False) == []
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl"):
        claim_fresh_run(out, out / "checkpoints", overwrite=False)
    assert (out / "metrics.jsonl").read_text()  # refused: untouched


def test_lock_is_exclusive_and_released(tmp_path):
    """The lock names its holder's PID, a second acquire fails with one line, release frees it."""
    import os

    from miras_pretrain.train.run_dir import RunDirError, RunDirLock

    first = RunDirLock(tmp_path / "run")
    first.acquire()
    try:
        with pytest.raises(RunDirError, match=re.escape(f"in use by another trainer (PID {os.getpid()} on ")):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        first.release()
    again = RunDirLock(tmp_path / "run")
    again.acquire()
    again.release()
