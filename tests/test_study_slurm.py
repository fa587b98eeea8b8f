"""`miras-pretrain study --slurm`: the study's runs as ONE job array through the launcher.

* the rendered script (no SLURM needed): ``#SBATCH --array=0-N``, one config per array task,
  logs named by array job and task;
* on the emulated two-node cluster (tests/slurm_cluster.py, real daemons): two small runs train
  as two array tasks; the same study command without --slurm then evaluates them without
  retraining and writes the results.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from miras_pretrain.cli import main
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

STUDY = """\
name: arr
base: demo_moneta_tiny.yaml
task: mqar
mqar_data: {vocab_size: 32, seq_len: 32, num_pairs: 4, num_train: 256, num_val: 32}
budget: {tokens: 768}
set: {train.micro_batch_size: 4, train.warmup_steps: 1, eval.interval: 3, eval.at_start: false,
      checkpoint.interval: 3, log.interval: 1, log.wandb: false, train.device: cpu}
seeds: [0]
evaluation:
  recall: {vocab_size: 32, lengths: [32], pairs: [2, 4], samples: 4}
runs:
  - {name: gd, model: {preset: gated_delta, size: tiny, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 64}}
  - {name: tf, model: {preset: transformer, size: tiny, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 64}}
"""
SLURM_ARGS = ["--slurm", "--nodes", "1", "--gpus-per-node", "0", "--time", "15:00", "--signal-lead", "60"]


def test_dry_run_renders_one_array(tmp_path, capsys):
    study = tmp_path / "arr.yaml"
    study.write_text(STUDY)
    out = tmp_path / "out"
    rc = main(["study", "--config", str(study), "--out", str(out), *SLURM_ARGS, "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    script = captured.out
    assert "#SBATCH --array=0-1\n" in script and "#SBATCH --job-name=arr\n" in script
    assert f"#SBATCH --output={out.resolve() / 'slurm' / 'arr-%A_%a.out'}" in script
    configs = re.search(r"^ARRAY_CONFIGS=\((.*)\)$", script, re.M).group(1).split()
    assert configs == [str(out.resolve() / "configs" / f"{r}-s0.yaml") for r in ("gd", "tf")]
    train = re.search(r"^TRAIN=\((.*)\)$", script, re.M).group(1)
    assert "--resume auto" in train and "--config" not in train  # each task appends its own
    # the rendered script is valid bash
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_needs_resources(tmp_path, capsys):
    study = tmp_path / "arr.yaml"
    study.write_text(STUDY.replace("evaluation:\n  recall: {vocab_size: 32, lengths: [32], pairs: [2, 4], samples: 4}\n", ""))
    rc = main(["study", "--config", str(study), "--out", str(tmp_path / "o"), "--slurm", "--nodes", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--slurm needs --gpus-per-node, --time" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.distributed
def test_array_trains_on_cluster_then_study_collects(slurm_cluster, monkeypatch, capsys):
    root = slurm_cluster.root / "jobs" / "study"
    root.mkdir(parents=True)
    study = root / "arr.yaml"
    study.write_text(STUDY)
    out = root / "out"
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    rc = main(["study", "--config", str(study), "--out", str(out), *SLURM_ARGS])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    job = int(re.search(r"submitted job array (\d+) \(2 tasks", printed).group(1))
    deadline = time.monotonic() + 400
    while slurm_cluster.run("squeue", "-h", "-j", str(job), check=False).stdout.strip():
        assert time.monotonic() < deadline, "the job array did not finish"
        time.sleep(1.0)
    for i in (0, 1):
        log = (out / "slurm" / f"arr-{job}_{i}.out").read_text()
        assert "training finished (exit 0): done, no requeue" in log, log
    for rid in ("gd-s0", "tf-s0"):
        meta = json.loads(next((out / "runs" / rid / "checkpoints").glob("step_00000006/meta.json")).read_text())
        assert meta["run_name"] == f"arr.{rid}"
        assert not (out / "runs" / rid / "train.log").exists()  # trained by the array, not locally
    # the same command without --slurm: evaluates the trained runs, trains nothing
    rc = main(["study", "--config", str(study), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "gd-s0: trained earlier (step 6), evaluating" in printed and "tf-s0: trained earlier (step 6)" in printed
    assert "starting" not in printed and "resuming" not in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["finished"] == ["gd-s0", "tf-s0"] and all("recall" in r for r in doc["runs"])
    assert "| `gd` |" in (out / "results.md").read_text()
