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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A real (small) prepared dataset: launch slurm checks the config's data before submitting."""
    from miras_pretrain.data import prepare_embedded_corpus

    return prepare_embedded_corpus(str(tmp_path_factory.mktemp("prepared")), vocab_size=512, seq_len=32,
                                   layout="packed", max_bytes=120_000, val_fraction=0.1)


def _data_yaml(prepared) -> str:
    return (f"data: {{streams: [{prepared.root}], tokenizer: {prepared.tokenizer_path}, layout: packed, "
            f"seq_len: 32}}\n")


@pytest.fixture()
def config(tmp_path, prepared) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{name: tiny-run, out_dir: {tmp_path / 'out'}}}\n"
                    "model: moneta_tiny\n" + _data_yaml(prepared))
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
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--setup", " "], "--setup ' ' must be one non-empty"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--setup", "a\nb"], "--setup 'a\\nb' must be one"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--nccl-socket-ifname", "ib0 eth0"],
     "--nccl-socket-ifname 'ib0 eth0' is not an interface list"),
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
    (["--config", "x.yaml", "--nodes", "2", "--gpus-per-node", "8", "--time", "60", "--nccl-debug", "LOUD"],
     "argument --nccl-debug: invalid choice: 'LOUD'"),
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


# ---- GPU jobs: environment setup, NCCL options, and the venv's torch build --------------------------
def fake_venv(root: Path, cuda: str | None = None, torch_installed: bool = True) -> Path:
    """A virtualenv layout with just what the launcher reads: bin/activate and torch/version.py."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "activate").write_text("# activate\n")
    if torch_installed:
        pkg = root / "lib" / "python3.11" / "site-packages" / "torch"
        pkg.mkdir(parents=True)
        version = "2.13.0" if cuda else "2.13.0+cpu"
        pkg.joinpath("version.py").write_text(
            "from typing import Optional\n\n"
            f"__version__ = {version!r}\ndebug = False\ncuda: Optional[str] = {cuda!r}\nhip: Optional[str] = None\n")
    return root


@pytest.fixture()
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An sbatch on PATH that keeps the script it was given and answers job id 4242."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    got = tmp_path / "submitted.sbatch"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncat > {got}\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return got


def test_setup_lines_nccl_options_and_gpu_count_rendered(capsys, config, tmp_path):
    venv = fake_venv(tmp_path / "venv", cuda="13.0")
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "4",
                           "--time", "60", "--venv", str(venv), "--setup", "module load cuda/12.8",
                           "--setup", "export MY_FLAG='a b'", "--nccl-debug", "INFO",
                           "--nccl-socket-ifname", "^docker,lo", "--dry-run")
    assert rc == 0 and "error" not in err and "refused" not in err, err
    lines = out.splitlines()
    setup = [i for i, line in enumerate(lines) if line.startswith("run_setup ")]
    activate = lines.index('  source "$VENV/bin/activate" || { log "FATAL: cannot activate the venv $VENV"; exit 1; }')
    # in the order given, before the venv is activated (module loads first)
    assert [lines[i] for i in setup] == ["run_setup 'module load cuda/12.8'",
                                         "run_setup 'export MY_FLAG='\"'\"'a b'\"'\"''"]
    assert setup[-1] < activate and f"VENV={venv}" in lines
    # the options' exports come after the inherited defaults, so they win
    assert lines.index("export NCCL_DEBUG=INFO") > lines.index("export NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
    assert "export NCCL_SOCKET_IFNAME='^docker,lo'" in lines and "export MIRAS_GPUS_PER_NODE=4" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in out.replace(
        "  # a dead peer aborts, not hangs", "")
    parsed = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
    assert parsed.returncode == 0, parsed.stderr


def test_no_setup_no_nccl_options_renders_defaults(capsys, config):
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "60", "--no-venv", "--dry-run")
    assert rc == 0, err
    assert "run_setup '" not in out and "NCCL_SOCKET_IFNAME" not in out
    assert "export MIRAS_GPUS_PER_NODE=0" in out and "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in out


def _setup_section(script: str) -> str:
    """The batch script's log() and setup part, runnable alone (no SLURM)."""
    start = script.index("log() {")
    log_fn = script[start:script.index("\n", start)]
    env_start = script.index("# ---- environment")
    return "set -uo pipefail\nSLURM_JOB_ID=1 RESTART=0\n" + log_fn + "\n" + \
        script[env_start:script.index('if [ -n "$VENV" ]', env_start)]


def test_setup_lines_run_in_the_batch_shell_and_a_failure_stops_the_job(tmp_path):
    spec = SlurmJobSpec(job_name="j", train_argv=["job.py"], nodes=1, time="10", log_dir=tmp_path,
                        workdir=tmp_path, signal_lead=60,
                        setup=["export FROM_SETUP=yes", "echo seen=$FROM_SETUP $UNSET_IN_MODULES"])
    ok = subprocess.run(["bash", "-c", _setup_section(render_sbatch(spec)) + 'echo "after=$FROM_SETUP"'],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "seen=yes" in ok.stdout and "after=yes" in ok.stdout  # same shell; set -u off for the line
    spec.setup = ["echo first", "false", "echo never"]
    bad = subprocess.run(["bash", "-c", _setup_section(render_sbatch(spec)) + "echo reached"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "reached" not in bad.stdout and "never" not in bad.stdout
    assert "FATAL: setup line failed (exit 1): false" in bad.stdout


def test_gpu_job_with_cpu_venv_is_refused_at_submit(capsys, config, tmp_path, fake_sbatch):
    venv = fake_venv(tmp_path / "cpu-venv")
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "8",
                           "--time", "60", "--venv", str(venv))
    assert rc == 2 and out == "" and not fake_sbatch.exists()
    assert len(err.strip().splitlines()) == 1, err
    for part in (f"the venv {venv}", "torch 2.13.0+cpu, a CPU build", "tools/setup_env.sh --gpu", "--allow-cpu-venv"):
        assert part in err, (part, err)
    # --dry-run prints the script and says what submitting would do
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "8",
                           "--time", "60", "--venv", str(venv), "--dry-run")
    assert rc == 0 and out.startswith("#!/bin/bash") and err.startswith("warning: submitting would be refused: ")
    # the override submits
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "2", "--gpus-per-node", "8",
                           "--time", "60", "--venv", str(venv), "--allow-cpu-venv")
    assert rc == 0 and "submitted job 4242" in out and fake_sbatch.read_text().startswith("#!/bin/bash")


def test_venv_without_torch_is_refused(capsys, config, tmp_path, fake_sbatch):
    venv = fake_venv(tmp_path / "empty-venv", torch_installed=False)
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", "1",
                           "--time", "60", "--venv", str(venv))
    assert rc == 2 and f"the venv {venv} has no torch" in err and not fake_sbatch.exists()


@pytest.mark.parametrize("gpus, cuda", [(8, "13.0"), (0, None)])
def test_cuda_venv_or_cpu_job_submits(capsys, config, tmp_path, fake_sbatch, gpus, cuda):
    venv = fake_venv(tmp_path / "venv", cuda=cuda)
    rc, out, err = _launch(capsys, "--config", str(config), "--nodes", "1", "--gpus-per-node", str(gpus),
                           "--time", "60", "--venv", str(venv))
    assert rc == 0 and "refused" not in err and "submitted job 4242" in out, err
    assert f"export MIRAS_GPUS_PER_NODE={gpus}" in fake_sbatch.read_text()


def test_torch_build_of_this_venv():
    """The file reader agrees with the interpreter that is running (this venv's real torch)."""
    import sys

    import torch

    from miras_pretrain.launch.venv_check import torch_build

    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtualenv")
    build = torch_build(Path(sys.prefix))
    assert build is not None and build.version == torch.__version__ and build.cuda == torch.version.cuda
