"""The end of every run (issue #22, items 1-3): `miras-pretrain train` in a batch job (stdout a
pipe) prints the thread choice once, one plain line per log step, and at the end -- finished or
stopped by SIGTERM (exit 75) -- where the checkpoint, the W&B run, the loss curve and the
metrics are; the loss curve is written for the interrupted run too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.checkpoint import complete_checkpoints

STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _summary(stdout: str) -> dict[str, str]:
    """``{label: value}`` of the run summary's indented lines (after the 'run ended' line)."""
    tail = stdout[stdout.index("run ended at step"):]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    ([\w&() ]+):\s+(.*)$", tail, re.M)}


@pytest.mark.slow
def test_finished_run_logs_plain_lines_and_a_summary(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(out, corpus, steps=STEPS, log={"interval": 2, "progress_bar": True,
                                                                       "wandb": True, "wandb_mode": "offline"},
                                        eval={"interval": 0, "batches": 1, "at_start": True})
    proc = tiny_training.run_train(tiny_training.write_config(tmp_path / "c.yaml", cfg), tmp_path,
                                   extra=["--threads", "1"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = proc.stdout
    assert "\r" not in text  # a pipe, not a terminal: no progress-bar redraws even with progress_bar on
    assert text.count("threads: 1 per process (train.threads") == 1, text[-3000:]
    logs = [l for l in text.splitlines() if re.match(r"step \d+/\d+  loss", l)]
    assert [l.split("  ")[0] for l in logs] == ["step 2/4", "step 4/4"], text[-3000:]
    assert all(re.search(r"lr \S+  [\d,]+ tok/s  MFU \d+\.\d\d%  ETA \d+:\d\d:\d\d$", l) for l in logs), logs
    assert f"run ended at step {STEPS}/{STEPS} (exit 0): finished" in text
    s = _summary(text)
    assert Path(s["checkpoint"]) == out / "checkpoints" / f"step_{STEPS:08d}"
    assert Path(s["checkpoint"], "meta.json").is_file()
    wandb_dir = s["W&B (offline)"].split()[0]
    assert Path(wandb_dir).parent == out / "wandb" and Path(wandb_dir).name.startswith("offline-run-")
    assert list(Path(wandb_dir).glob("run-*.wandb")) and f"wandb sync {wandb_dir}" in s["W&B (offline)"]
    assert Path(s["loss curve"]) == out / "loss_curve.png" and (out / "loss_curve.png").stat().st_size > 1000
    assert Path(s["metrics"]) == out / "metrics.jsonl"
    assert re.match(r"step 0: [\d.]+ \(ppl [\d.]+\) -> step 4: [\d.]+", s["val loss"]), s


@pytest.mark.slow
def test_sigterm_run_prints_the_summary_and_plots(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(out, corpus, steps=40, debug={"sleep_per_step": 0.3})
    path = tiny_training.write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen(tiny_training.train_command(path), env=tiny_training.child_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (out / "metrics.jsonl").is_file() and 2 in tiny_training.step_losses(out)):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=300)
    finally:
        tiny_training.kill_group(proc)
    assert proc.returncode == 75, text[-3000:]
    assert text.count("stopped by signal at step") == 1, text[-3000:]
    m = re.search(r"run ended at step (\d+)/40 \(exit 75\): interrupted by a signal; rerun with --resume auto", text)
    assert m, text[-3000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < 40
    s = _summary(text)
    assert Path(s["checkpoint"]) == out / "checkpoints" / f"step_{stopped:08d}"
    assert max(step for step, _ in complete_checkpoints(out / "checkpoints")) == stopped
    assert s["W&B"] == "off (log.wandb)"
    assert Path(s["loss curve"]) == out / "loss_curve.png" and (out / "loss_curve.png").stat().st_size > 1000
    assert Path(s["metrics"]) == out / "metrics.jsonl"
