"""The thread count of every CPU-heavy command (issue #22, item 1): miras_pretrain/threads.py's
decision over the environment (CPUs, local processes, OMP_NUM_THREADS, SLURM_CPUS_PER_TASK,
load) and ``--threads`` on train / eval / data prepare / demo."""

from __future__ import annotations

import pytest
import torch

from miras_pretrain.threads import ThreadChoice, apply_threads, decide_threads


@pytest.mark.parametrize("env,cpus,load,want", [
    ({}, 8, None, 8),                                               # idle machine, one process
    ({}, 8, 0.2, 8),
    ({"LOCAL_WORLD_SIZE": "2"}, 8, None, 4),                        # torchrun: share the CPUs
    ({"LOCAL_WORLD_SIZE": "16"}, 8, None, 1),                       # more processes than CPUs
    ({"OMP_NUM_THREADS": "2"}, 8, None, 2),                         # an explicit cap
    ({"OMP_NUM_THREADS": "64"}, 8, None, 8),                        # a cap above the CPUs caps nothing
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, None, 2),
    ({"SLURM_CPUS_PER_TASK": "4"}, 64, None, 4),                    # srun: one process per task
    ({"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}, 64, None, 2),
    ({"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "1"}, 64, None, 1),
    ({}, 2, 4.5, 1),                                                # busy shared machine: 1 thread
    ({}, 16, 6.0, 10),                                              # leave the busy cores
    ({"LOCAL_WORLD_SIZE": "2"}, 16, 6.0, 5),
    ({"OMP_NUM_THREADS": "2"}, 2, 5.0, 2),                          # an explicit cap beats the load rule
    ({"OMP_NUM_THREADS": "zero"}, 4, None, 4),                      # malformed values cap nothing
    ({"OMP_NUM_THREADS": "0", "LOCAL_WORLD_SIZE": ""}, 4, None, 4),
])
def test_default_thread_count(env, cpus, load, want):
    choice = decide_threads(None, env=env, cpus=cpus, load=load)
    assert choice.threads == want, choice
    assert str(cpus) in choice.reason


def test_reason_names_what_capped_it():
    c = decide_threads(None, env={"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, cpus=16)
    assert c == ThreadChoice(3, "16 CPUs / 2 local processes, capped by OMP_NUM_THREADS=3")
    c = decide_threads(None, env={"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "4",
                                  "TORCHELASTIC_RUN_ID": "x"}, cpus=64)
    assert c.reason == "64 CPUs / 4 local processes, capped by SLURM_CPUS_PER_TASK=8 / 4"
    assert "load average 4.5" in decide_threads(None, env={}, cpus=2, load=4.5).reason
    assert decide_threads(None, env={}, cpus=2, load=4.5).line().startswith("threads: 1 per process (")


def test_requested_wins_and_bad_values_are_one_line_errors():
    assert decide_threads(3, env={"OMP_NUM_THREADS": "1"}, cpus=2, load=9.0) == ThreadChoice(3, "--threads")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"^--threads .* is not valid: use an integer >= 1") as err:
            decide_threads(bad, env={}, cpus=4)
        assert "\n" not in str(err.value)


def test_apply_sets_torch_and_prints_once(capsys, monkeypatch):
    from miras_pretrain import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_announced", None)
    try:
        assert apply_threads(2).threads == 2 and torch.get_num_threads() == 2
        assert apply_threads(2).threads == 2  # the same choice again: not printed again
        assert apply_threads(None, env={"OMP_NUM_THREADS": "1"}).threads == 1 and torch.get_num_threads() == 1
        apply_threads(1, announce=False)
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.splitlines()
    assert out == ["threads: 2 per process (--threads; --threads N to choose)",
                   f"threads: 1 per process ({threads.available_cpus()} CPUs, capped by OMP_NUM_THREADS=1; "
                   "--threads N to choose)"] or (threads.available_cpus() == 1 and len(out) == 2), out


def test_every_cpu_heavy_command_takes_threads():
    from miras_pretrain.cli import build_parser

    parser = build_parser()
    for argv in (["train", "--config", "c.yaml"], ["demo"], ["eval", "--model", "m"],
                 ["data", "prepare", "--out", "o"]):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv
        assert parser.parse_args(argv).threads is None, argv


def test_train_threads_flag_is_the_config_key(tmp_path, monkeypatch):
    """`train --threads 1` reaches the trainer as train.threads=1 (what Trainer.setup applies),
    over the config file's value; 0 is refused in one line before anything loads."""
    from miras_pretrain.cli import build_parser
    from miras_pretrain.train import trainer

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model: gated_delta_tiny\ntrain: {threads: 4, max_steps: 5, warmup_steps: 1}\n")
    seen = {}

    def fake_train(cfg, **kwargs):
        seen["threads"] = cfg.train.threads
        return trainer.TrainResult(exit_code=0, step=0, out_dir=tmp_path)

    monkeypatch.setattr(trainer, "train", fake_train)
    parser = build_parser()  # the parsed namespace's func, without main()'s signal handlers
    args = parser.parse_args(["train", "--config", str(cfg_path), "--threads", "1"])
    assert args.func(args) == 0 and seen["threads"] == 1
    args = parser.parse_args(["train", "--config", str(cfg_path)])
    assert args.func(args) == 0 and seen["threads"] == 4
    args = parser.parse_args(["train", "--config", str(cfg_path), "--threads", "0"])
    with pytest.raises(ValueError, match=r"^--threads 0 is not valid"):
        args.func(args)
