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


@pytest.mark.parametrize("raw, old, new", [
    ({"train": {"tensor_parallel": 2}}, "train.tensor_parallel", "parallel.tensor_parallel_size"),
    ({"train": {"pipeline_parallel": 2}}, "train.pipeline_parallel", "parallel.pipeline_parallel_size"),
    ({"train": {"activation_checkpointing": True}}, "train.activation_checkpointing",
     "model.activation_checkpointing"),
    ({"data": {"streams": ["x"], "micro_batch_size": 4}}, "data.micro_batch_size", "train.micro_batch_size"),
    ({"data": {"streams": ["x"], "eval_batches": 4}}, "data.eval_batches", "eval.batches"),
])
def test_moved_keys_name_their_new_home(raw, old, new):
    with pytest.raises(ValueError) as err:
        config_from_dict(raw)
    msg = str(err.value)
    assert f"'{old}'" in msg and new in msg and "\n" not in msg, msg


def test_one_home_per_knob_reaches_the_data_config():
    from miras_pretrain.train.config import resolve_data_config

    cfg = config_from_dict({"data": {"streams": ["x"]}, "train": {"micro_batch_size": 3, "grad_accum_steps": 2},
                            "eval": {"batches": 5}})
    data = resolve_data_config(cfg)
    assert (data.micro_batch_size, data.eval_batches) == (3, 5)
    # a pipeline evaluation step reads grad_accum_steps micro-batches
    cfg = config_from_dict({"data": {"streams": ["x"]}, "train": {"grad_accum_steps": 2},
                            "parallel": {"pipeline_parallel_size": 2}, "eval": {"batches": 5}})
    assert resolve_data_config(cfg).eval_batches == 10


def test_unknown_key_names_the_closest_one():
    with pytest.raises(ValueError, match=r"'train.lrr' is not valid: unknown key 'lrr'; did you mean 'lr'\?"):
        config_from_dict({"train": {"lrr": 1e-3}})
    with pytest.raises(ValueError, match=r"'paralel' .*did you mean 'parallel'\?"):
        config_from_dict({"paralel": {}})


def test_model_section_forms(tmp_path):
    from miras_pretrain.model import ModelConfig
    from miras_pretrain.train.config import resolve_model_config

    named = resolve_model_config(config_from_dict({"model": "moneta_340m"}))
    assert named == ModelConfig.from_ref("moneta_340m")
    mapping = config_from_dict({"model": {"preset": "moneta", "size": "340m", "n_layers": 12}})
    assert resolve_model_config(mapping) == ModelConfig.from_dict(dict(named.to_dict(), n_layers=12))
    overridden = config_from_dict({"model": "moneta_340m"}, ["model.n_layers=12"])
    assert resolve_model_config(overridden) == resolve_model_config(mapping)
    based = config_from_dict({"model": {"from": "yaad_tiny", "activation_checkpointing": True}})
    assert resolve_model_config(based).activation_checkpointing
    # a model YAML of one's own, by path relative to the training config
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text("d_model: 64\nn_layers: 2\nn_heads: 4\n")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: models/mine.yaml\n")
    assert resolve_model_config(load_config(cfg_file)).d_model == 64
    with pytest.raises(ValueError, match=r"'model.preset' .*preset and size go together"):
        config_from_dict({"model": {"size": "340m"}})


def test_yaml_numbers_without_a_dot(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {lr: 3e-4, max_steps: 1e3}\n")
    cfg = load_config(cfg_file, ["train.eps=1e-6"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.eps) == (3e-4, 1000, 1e-6)
    assert isinstance(cfg.train.max_steps, int)


def test_config_reference_lists_every_schema_field():
    """docs/training.md's config reference has a row for every key of every section."""
    from miras_kernels import MirasSpec

    from miras_pretrain import schema
    from miras_pretrain.data import DataConfig
    from miras_pretrain.model import ModelConfig
    from miras_pretrain.train.config import MOVED_KEYS, RunConfig

    text = (REPO / "docs" / "training.md").read_text()
    reference = text[text.index("## Config reference"):]
    rows = {line.split("|")[1].strip().strip("`") for line in reference.splitlines()
            if line.startswith("| `")}
    # model and data are plain mappings on RunConfig: their schemas are ModelConfig and DataConfig
    keys = [k for k, *_ in schema.describe(RunConfig, "") if k not in ("model", "data", "base_dir")]
    keys += [k for k, *_ in schema.describe(ModelConfig, "model")]
    keys += [k for k, *_ in schema.describe(MirasSpec, "model.miras")]
    keys += [k for k, *_ in schema.describe(DataConfig, "data")]
    missing = [k for k in keys if k not in rows]
    assert not missing, f"docs/training.md config reference lacks {missing}"
    assert all(old in reference for old in MOVED_KEYS), "the moved keys table is incomplete"
