"""The README's main command, shortened: `miras-pretrain demo --steps 5` on a small corpus.

Same code path as the full demo (embedded corpus + tokenizer, tiny Moneta, DeepSpeed on CPU,
validation before/after, checkpoint, offline W&B run, loss-curve PNG); only the step count,
corpus size and batch are cut.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from miras_pretrain.testing import tiny_training

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_short(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "miras_pretrain.cli", "demo", "--out", str(out), "--steps", "5",
         "--corpus-mb", "0.5", "--set", "train.micro_batch_size=4", "--set", "eval.batches=2",
         "--set", "log.progress_bar=false"],
        cwd=REPO, env=tiny_training.child_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=900)
    finally:
        tiny_training.kill_group(proc)
    assert proc.returncode == 0, stdout[-4000:]
    m = re.search(r"validation loss: step 0: ([\d.]+) .*->\s+step 5: ([\d.]+)", stdout)
    assert m, stdout[-3000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert last < first
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step_00000005" / "meta.json").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (out / "corpus" / "tokenizer.model").is_file()
    for label in ("checkpoint:", "W&B (offline):", "loss curve:"):
        assert label in stdout
