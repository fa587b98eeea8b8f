"""`miras-pretrain study` end to end with the real trainer (subprocesses): the quick variant of
every shipped study produces its table and plots, and a study killed mid-run resumes where it
stopped (finished runs skipped, the interrupted one resumed from its checkpoint).

The quick variants of paper_lm_tiny and mqar evaluate MQAR recall with
``miras_pretrain.evaluation.recall.recall_accuracy`` on the trained native models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from miras_pretrain.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work_dir():
    """A private temp dir, removed at the end. Not pytest's tmp_path: pytest prunes old basetemps,
    also those of other sessions still running on this machine, under a minutes-long study."""
    path = Path(tempfile.mkdtemp(prefix="miras-study-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper_lm_tiny", "mqar", "ablations"])
def test_quick_variant_of_shipped_study(name, work_dir, capsys):
    """CI: the quick variant trains, evaluates and writes the table and the plots (not the numbers)."""
    out = work_dir / name
    t0 = time.perf_counter()
    rc = main(["study", "--config", name, "--quick", "--out", str(out)])
    took = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["finished"] == doc["planned"] and doc["planned"], doc
    table = (out / "results.md").read_text()
    for rid in doc["planned"]:
        run = rid.rsplit("-s", 1)[0]
        assert f"| `{run}` |" in table, table
        assert f"{rid}: done in" in printed  # a progress line per run
    assert _png(out / "val_loss.png")
    if doc["summary"][0].get("recall"):
        assert _png(out / "recall_vs_pairs.png") and _png(out / "recall_vs_length.png")
        assert "MQAR acc (mean)" in table
    assert f"results: {out / 'results.md'}" in printed and "plot:" in printed
    print(f"{name} --quick: {took:.0f} s")  # the bound is 2 minutes on an idle 2-core machine


RESUME_STUDY = """\
name: resume
base: demo_moneta_tiny.yaml
task: mqar
mqar_data: {{vocab_size: 32, seq_len: 32, num_pairs: 4, num_train: 256, num_val: 32}}
budget: {{tokens: 1536}}
set: {{train.micro_batch_size: 4, train.warmup_steps: 1, eval.interval: 4, eval.at_start: false,
      checkpoint.interval: 4, log.interval: 1, log.wandb: false}}
seeds: [0]
runs:
  - {{name: fast, model: {{preset: gated_delta, size: tiny, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 64}}}}
  - name: slow
    model: {{preset: transformer, size: tiny, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 64}}
    set: {{debug.sleep_per_step: {sleep}}}
"""


def _study_proc(study: Path, out: Path, log: Path) -> subprocess.Popen:
    """The study command as a user runs it, in its own process group (the test kills that group)."""
    return subprocess.Popen([sys.executable, "-m", "miras_pretrain.cli", "study", "--config", str(study), "--out",
                             str(out)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(REPO))


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"the study ended early ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _ckpt_steps(run_dir: Path) -> list[int]:
    from miras_pretrain.train.checkpoint import complete_checkpoints

    root = run_dir / "checkpoints"
    return [s for s, _ in complete_checkpoints(root)] if root.is_dir() else []


@pytest.mark.slow
def test_killed_study_resumes_where_it_stopped(work_dir):
    """SIGKILL the study's process group mid-run (trainers included): the rerun skips the finished
    run and resumes the interrupted one from its checkpoint; then SIGTERM to the study process
    alone: it stops its trainer the trainer's way (checkpoint, exit 75), and a third run finishes."""
    study = work_dir / "resume.yaml"
    study.write_text(RESUME_STUDY.format(sleep=1.0))  # 12 steps of 1 s: a wide window for the signals
    out, log = work_dir / "out", work_dir / "study.log"
    fast, slow = out / "runs" / "fast-s0", out / "runs" / "slow-s0"
    proc = _study_proc(study, out, log)
    try:
        _wait(lambda: (fast / "study_result.json").is_file() and 4 in _ckpt_steps(slow), 400,
              "the first run to finish and the second to checkpoint step 4", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = max(_ckpt_steps(slow))
    assert 4 <= killed_at < 12 and not (slow / "study_result.json").exists()
    fast_result = (fast / "study_result.json").read_text()

    # second run: resumes; SIGTERM to the study process only, once the trainer has gone past its checkpoint
    mark = log.stat().st_size
    proc = _study_proc(study, out, log)
    try:
        _wait(lambda: "resumed from" in (slow / "train.log").read_text().split("resume auto")[-1]
              and max(_ckpt_steps(slow)) >= killed_at, 300, "the trainer to resume", proc)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    second = log.read_bytes()[mark:].decode()
    assert rc == 75, second
    assert "run 1/2 fast-s0: finished earlier, skipped" in second, second
    assert f"run 2/2 slow-s0: resuming from step {killed_at}" in second, second
    assert re.search(r"run 2/2 slow-s0: stopped at step \d+ \(checkpoint kept", second), second
    assert "stopped by SIGTERM" in second and "rerun the same command to continue" in second
    stopped_at = max(_ckpt_steps(slow))
    assert stopped_at >= killed_at

    # third run: finishes; the finished run was never retrained
    mark = log.stat().st_size
    proc = _study_proc(study, out, log)
    rc = proc.wait(timeout=400)
    third = log.read_bytes()[mark:].decode()
    assert rc == 0, third
    assert f"run 2/2 slow-s0: resuming from step {stopped_at}" in third and "slow-s0: done in" in third, third
    assert (fast / "study_result.json").read_text() == fast_result
    assert (fast / "train.log").read_text().count("run ended at step") == 1  # trained once
    slow_log = (slow / "train.log").read_text()
    assert f"resumed from" in slow_log and slow_log.count("run ended at step 12/12") == 1, slow_log
    doc = json.loads((out / "results.json").read_text())
    assert doc["finished"] == ["fast-s0", "slow-s0"]
    assert [r["steps"] for r in doc["runs"]] == [12, 12]
