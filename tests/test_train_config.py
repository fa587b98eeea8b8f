"""Training config: validation errors are one line naming the key; overrides; CLI exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from miras_pretrain.train.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "raw, overrides, needle",
    [
        ({"train": {"lrr": 1e-3}}, [], "'train.lrr'"),
        ({"train": {"lr": "fast"}}, [], "'train.lr'"),
        ({"train": {"lr": -1.0}}, [], "'train.lr'"),
        ({"train": {"zero_stage": 4}}, [], "'train.zero_stage'"),
        ({"train": {"precision": "fp8"}}, [], "'train.precision'"),
        ({"train": {"betas": [0.9]}}, [], "'train.betas'"),
        ({"train": {"micro_batch_size": 1.5}}, [], "'train.micro_batch_size'"),
        ({"train": {"activation_checkpointing": "yes"}}, [], "'train.activation_checkpointing'"),
        ({"checkpoint": {"keep_last": 0}}, [], "'checkpoint.keep_last'"),
        ({"log": {"wandb_mode": "online"}}, [], "'log.wandb_mode'"),
        ({"eval": {"batches": 0}}, [], "'eval.batches'"),
        ({"nonsense": {}}, [], "'nonsense'"),
        ({"train": []}, [], "'train'"),
        ({}, ["train.warmup_steps=-3"], "'train.warmup_steps'"),
        ({}, ["bogus.key=1"], "'bogus.key'"),
        ({}, ["train.lr"], "train.lr"),
    ],
)
def test_bad_values_name_the_key(raw, overrides, needle):
    with pytest.raises(ValueError) as err:
        config_from_dict(raw, overrides)
    msg = str(err.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_overrides_and_yaml_number_forms(tmp_path):
    model = tmp_path / "m.yaml"
    model.write_text(yaml.safe_dump({"d_model": 64, "n_layers": 2}))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "m.yaml", "train": {"lr": "3e-3", "max_steps": 10}}))
    cfg = load_config(cfg_file, ["train.max_steps=20", "model.n_layers=4", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == pytest.approx(3e-3)  # PyYAML reads 3e-3 as a string
    assert cfg.train.max_steps == 20
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.model == {"d_model": 64, "n_layers": 4}  # the file's keys + the override


def test_missing_model_file_is_reported(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "nope/missing.yaml"}))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(cfg_file)


def test_shipped_training_configs_load():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "no training configs under configs/"
    from miras_pretrain.train.config import resolve_data_config, resolve_model_config

    for path in configs:
        cfg = load_config(path)
        resolve_model_config(cfg)
        resolve_data_config(cfg)


def test_cli_bad_key_is_one_line_exit_2(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"max_steps": 1}}))
    proc = subprocess.run(
        [sys.executable, "-m", "miras_pretrain.cli", "train", "--config", str(cfg_file), "--set", "train.zero_stage=5"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "train.zero_stage" in lines[0], proc.stderr
