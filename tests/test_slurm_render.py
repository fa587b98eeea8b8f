"""`miras-pretrain launch slurm` without SLURM: the rendered script and the option errors.

The rendered script is also checked with `bash -n` (it must at least parse); the daemons-based
tests in test_slurm_jobs.py run it for real.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from miras_pretrain.cli import main
from miras_pretrain.launch.render import SlurmJobSpec, parse_time_limit, render_sbatch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{name: tiny-run, out_dir: {tmp_path / 'out'}}}\n"
                    "model: moneta_tiny\n")
    return path


def _launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", "slurm", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_gpu_torchrun(capsys, config, tmp_path):
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "4", "--gpus-per-node", "8",
                           "--time", "2-00:00:00", "--partition", "gpu", "--account", "proj1",
                           "--set", "train.lr=1e-3", "--dry-run")
    assert rc == 0, err
    sb = _sbatch_lines(out)
    for opt in ("--job-name=tiny-run", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                "--time=2-00:00:00", "--partition=gpu", "--account=proj1", "--open-mode=append",
                "--requeue", "--signal=B:USR1@300", "--exclusive", f"--chdir={Path.cwd()}",
                f"--output={tmp_path / 'out' / 'slurm' / 'tiny-run-%j.out'}"):
        assert opt in sb, (opt, sb)
    assert "LAUNCHER=torchrun" in out and "PROCS_PER_NODE=8" in out
    # the trainer gets the absolute config, --resume auto and the override
    assert f"TRAIN=(-m miras_pretrain.cli train --config {config} --resume auto --set train.lr=1e-3)" in out
    assert "--rdzv-backend=c10d" in out and "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in out
    assert "REQUEUE_EXIT_CODE=75" in out and "scontrol requeue" in out and "SLURM_RESTART_COUNT" in out
    assert "MASTER_ADDR" in out and "NodeAddr" in out and "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in out
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in out and "export OMP_NUM_THREADS=" in out
    assert "@" + "SBATCH_DIRECTIVES@" not in out
    parsed = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert parsed.returncode == 0, parsed.stderr


def test_dry_run_cpu_srun(capsys, config):
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "0",
                           "--procs-per-node", "3", "--launcher", "srun", "--time", "90",
                           "--cpus-per-node", "6", "--signal-lead", "120", "--max-retries", "5",
                           "--env", "FOO=a b", "--sbatch-option=--qos=high", "--no-venv", "--dry-run")
    assert rc == 0, err
    sb = _sbatch_lines(out)
    assert not any(s.startswith("--gpus") for s in sb), sb  # GPU count 0: no GPU request at all
    for opt in ("--nodes=2", "--ntasks-per-node=3", "--cpus-per-task=2", "--time=90", "--qos=high",
                "--signal=B:USR1@120"):
        assert opt in sb, (opt, sb)
    assert "--exclusive" not in sb
    assert "LAUNCHER=srun" in out and "PROCS_PER_NODE=3" in out and "MAX_RETRIES=5" in out
    assert "VENV=''" in out and "export FOO='a b'" in out
    parsed = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert parsed.returncode == 0, parsed.stderr


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0", "--gpus-per-node", "8", "--time", "60"], "--nodes 0 must be >= 1"),
    (["--nodes", "2", "--gpus-per-node", "-1", "--time", "60"], "--gpus-per-node -1 must be >= 0"),
    (["--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "0", "--time", "60"],
     "--procs-per-node 0 must be >= 1"),
    (["--nodes", "2", "--gpus-per-node", "8", "--procs-per-node", "2", "--time", "60"],
     "--procs-per-node 2 conflicts with --gpus-per-node 8"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "1h"], "--time '1h' is not a SLURM time limit"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "4"], "--signal-lead 300 s must be shorter than --time 4"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--partition", "a b"], "--partition 'a b'"),
    (["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", "3", "--procs-per-node", "2",
      "--launcher", "srun", "--time", "60"], "--cpus-per-node 3 must be a positive multiple"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--set", "train.lr"], "--set 'train.lr' must be KEY=VALUE"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--set", "train.bogus=1"], "train.bogus"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--env", "1X=2"], "--env '1X'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--sbatch-option", "qos=high"], "--sbatch-option 'qos=high'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--venv", "/nonexistent"], "--venv /nonexistent"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--max-retries", "-1"], "--max-retries -1 must be >= 0"),
])
def test_bad_options_one_line_error(capsys, config, argv, message):
    rc, out, err = _launch(capsys, "--config", str(config), *argv, "--dry-run")
    assert rc == 2 and out == ""
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_missing_config_file(capsys, tmp_path):
    rc, out, err = _launch(capsys, "--config", str(tmp_path / "nope.yaml"), "--nodes", "1",
                           "--gpus-per-node", "0", "--time", "60", "--dry-run")
    assert rc == 2 and "nope.yaml: file not found" in err


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--gpus-per-node", "8", "--dry-run"], "the following arguments are required: --config, --time"),
    (["--config", "x.yaml", "--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--bogus"],
     "unrecognized arguments: --bogus"),
    (["--config", "x.yaml", "--nodes", "two", "--gpus-per-node", "8", "--time", "60"],
     "argument --nodes: invalid int value: 'two'"),
    (["--config", "x.yaml", "--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--launcher", "mpirun"],
     "argument --launcher: invalid choice: 'mpirun'"),
])
def test_missing_and_unknown_options(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["launch", "slurm", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_submit_without_sbatch_is_a_clear_error(capsys, config, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "60")
    assert rc == 2 and "sbatch not found on PATH" in err


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("5:30", 330), ("01:02:03", 3723), ("2-00", 172800), ("1-02:03", 93780),
    ("1-00:00:05", 86405),
])
def test_parse_time_limit(text, seconds):
    assert parse_time_limit(text) == seconds


def test_template_placeholders_all_filled(tmp_path):
    spec = SlurmJobSpec(job_name="j", train_argv=["job.py", "train"], nodes=1, time="10",
                        log_dir=tmp_path, workdir=tmp_path, signal_lead=60)
    text = render_sbatch(spec)
    import re

    assert not re.search(r"@[A-Z_]+@", text)
    assert "TRAIN=(job.py train)" in text
