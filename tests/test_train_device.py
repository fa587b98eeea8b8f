"""Device and numerics choice: a job that asks for GPUs never trains on the CPU in silence, and
CUDA runs use bf16 (DeepSpeed's bf16 section) and fused AdamW while CPU runs stay as they were.

Everything is decided by plain functions of (request, environment, torch facts), so every branch,
the CUDA ones included, is tested here without a GPU; the end-to-end tests run the real CLI on
this machine's CPU build of torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from miras_pretrain.train.dist import GPU_REQUEST_VARS, choose_device, gpus_requested, pick_device
from miras_pretrain.train.engine import deepspeed_config, training_numerics
from miras_pretrain.train.optim import adamw_kwargs, apply_schedule_config, build_optimizer, build_scheduler

CPU_FACTS = {"torch_version": "2.13.0+cpu", "cuda_build": None, "cuda_available": False}
CUDA_NO_GPU = {"torch_version": "2.13.0", "cuda_build": "13.0", "cuda_available": False}
CUDA_GPU = {"torch_version": "2.13.0", "cuda_build": "13.0", "cuda_available": True}


@pytest.fixture()
def no_gpu_env(monkeypatch):
    """This process's environment without any variable that asks for GPUs, as rank 0."""
    for name in (*GPU_REQUEST_VARS, "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_GPUS_ON_NODE": "8"}, "SLURM_GPUS_ON_NODE=8"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "CUDA_VISIBLE_DEVICES=0,1,2,3"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # an index list: GPU 0, not "none"
    ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),  # what SLURM writes for a job without GPUs
    ({"MIRAS_GPUS_PER_NODE": "0"}, None),
    ({"MIRAS_GPUS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0"}, "MIRAS_GPUS_PER_NODE=4"),  # launcher first
    ({"MIRAS_GPUS_PER_NODE": "0", "SLURM_JOB_GPUS": "3"}, "SLURM_JOB_GPUS=3"),
])
def test_gpus_requested(env, expected):
    assert gpus_requested(env) == expected


def test_auto_without_a_gpu_request_is_cpu_and_says_so():
    choice = choose_device("auto", env={}, **CPU_FACTS)
    assert choice.type == "cpu" and choice.note.startswith("device: cpu (train.device = auto")
    # a CUDA build on a node without GPUs and without a request: CPU as well
    assert choose_device("auto", env={}, **CUDA_NO_GPU).type == "cpu"
    # a visible GPU is used by auto even when nobody asked (a workstation)
    assert choose_device("auto", env={}, **CUDA_GPU).type == "cuda"


@pytest.mark.parametrize("requested, env, facts, cause, fix", [
    ("cuda", {}, CPU_FACTS, "train.device = 'cuda'", "tools/setup_env.sh --gpu"),
    ("auto", {"SLURM_GPUS_ON_NODE": "8"}, CPU_FACTS, "GPUs are assigned to this job (SLURM_GPUS_ON_NODE=8)",
     "tools/setup_env.sh --gpu"),
    ("auto", {"MIRAS_GPUS_PER_NODE": "8"}, CPU_FACTS, "(MIRAS_GPUS_PER_NODE=8)", "is a CPU build"),
    ("auto", {"CUDA_VISIBLE_DEVICES": "0"}, CUDA_NO_GPU, "(CUDA_VISIBLE_DEVICES=0)", "sees no GPU"),
    ("cuda", {}, CUDA_NO_GPU, "train.device = 'cuda'", "check nvidia-smi and the driver"),
])
def test_gpu_asked_but_unusable_is_one_line_error(requested, env, facts, cause, fix):
    with pytest.raises(ValueError) as err:
        choose_device(requested, env=env, **facts)
    msg = str(err.value)
    assert cause in msg and fix in msg and "\n" not in msg
    assert "train.device: cpu" in msg  # the other way out


def test_gpu_asked_and_usable_is_cuda():
    assert choose_device("cuda", env={}, **CUDA_GPU).type == "cuda"
    assert choose_device("auto", env={"SLURM_GPUS_ON_NODE": "4"}, **CUDA_GPU).type == "cuda"


def test_explicit_cpu_wins_and_is_logged_when_gpus_are_assigned():
    assert choose_device("cpu", env={}, **CUDA_GPU).note is None
    choice = choose_device("cpu", env={"SLURM_JOB_GPUS": "0"}, **CUDA_GPU)
    assert choice.type == "cpu" and "SLURM_JOB_GPUS=0" in choice.note


def test_unknown_device_is_an_error():
    with pytest.raises(ValueError, match="train.device = 'tpu': use auto, cpu or cuda"):
        choose_device("tpu", env={}, **CPU_FACTS)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks this machine's CPU build of torch")
def test_pick_device_on_this_machine(no_gpu_env, monkeypatch, capsys):
    assert pick_device("auto") == torch.device("cpu")
    out = capsys.readouterr().out
    assert out.count("device: cpu (train.device = auto") == 1
    monkeypatch.setenv("RANK", "1")  # other ranks stay quiet
    assert pick_device("auto") == torch.device("cpu") and capsys.readouterr().out == ""
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")  # a job given GPUs with this CPU build: refused
    with pytest.raises(ValueError, match=r"SLURM_GPUS_ON_NODE=2\) but torch .* is a CPU build"):
        pick_device("auto")


# ---------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("device, precision, expected, fused", [
    ("cuda", "auto", "bf16", True),
    ("cuda", "fp32", "fp32", True),
    ("cuda", "bf16", "bf16", True),
    ("cpu", "auto", "fp32", False),
    ("cpu", "bf16", "bf16", False),
    ("cpu", "fp32", "fp32", False),
])
def test_training_numerics(device, precision, expected, fused):
    numerics = training_numerics(torch.device(device), precision)
    assert numerics.precision == expected and numerics.fused_adamw is fused


def test_training_numerics_rejects_unknown_precision():
    with pytest.raises(ValueError, match="train.precision = 'fp16': use auto, fp32 or bf16"):
        training_numerics(torch.device("cpu"), "fp16")


def test_deepspeed_config_bf16_only_on_cuda_with_auto():
    from miras_pretrain.train.config import config_from_dict

    cfg = config_from_dict({"run": {"name": "t", "out_dir": "/tmp/unused"}, "model": "moneta_tiny"})
    assert deepspeed_config(cfg, torch.device("cuda", 0))["bf16"] == {"enabled": True}
    assert deepspeed_config(cfg, torch.device("cpu"))["bf16"] == {"enabled": False}


def test_adamw_kwargs():
    assert adamw_kwargs(["cuda", "cuda"]) == {"fused": True, "foreach": False}
    assert adamw_kwargs(["cpu"]) == {"foreach": False}
    assert adamw_kwargs(["cuda", "cpu"]) == {"foreach": False}  # mixed: the plain loop
    assert adamw_kwargs([]) == {"foreach": False}


def _tiny_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          no_decay_patterns=["norm"])
    return model, opt


def test_cpu_optimizer_unchanged_plain_loop():
    _, opt = _tiny_optimizer()
    for group in opt.param_groups:
        assert group["foreach"] is False and not group["fused"]


def test_resume_resets_the_implementation_to_the_params_device():
    # a checkpoint written on GPUs (fused groups) resumed on this CPU machine steps unfused
    _, opt = _tiny_optimizer()
    for group in opt.param_groups:
        group["fused"] = True
    sched = build_scheduler(opt, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    apply_schedule_config(sched, lr=1e-3, warmup_steps=2, max_steps=10, min_lr_ratio=0.1, betas=(0.9, 0.95),
                          eps=1e-8, weight_decay=0.1)
    for group in opt.param_groups:
        assert group["foreach"] is False and not group["fused"]


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is not None, reason="checks this machine's CPU build of torch")
def test_train_cli_refuses_gpu_job_on_cpu_build_and_announces_cpu(tmp_path):
    """`miras-pretrain train` in a job given GPUs, with this CPU build: exit 2 and one line, nothing
    trained; the same run without the request trains on the CPU and says so once."""
    from miras_pretrain.testing.tiny_training import (child_env, prepare_tiny_corpus, tiny_run_config,
                                                     write_config)

    prepared = prepare_tiny_corpus(tmp_path / "data", max_bytes=60_000)
    config = write_config(tmp_path / "run.yaml", tiny_run_config(tmp_path / "run", prepared, steps=1))
    env = {k: v for k, v in child_env(tmp_path).items() if k not in GPU_REQUEST_VARS}
    # warmup 0: a one-step run with the tiny config's warmup would add the (correct) warmup warning line
    argv = [sys.executable, "-m", "miras_pretrain.cli", "train", "--config", str(config),
            "--set", "train.warmup_steps=0"]
    refused = subprocess.run(argv, env={**env, "SLURM_GPUS_ON_NODE": "4"}, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLURM_GPUS_ON_NODE=4" in lines[0] and "tools/setup_env.sh --gpu" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.count("device: cpu (train.device = auto") == 1, ran.stdout
