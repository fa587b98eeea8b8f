"""Bad inputs to the export give one clear line and write nothing; the CLI path with a
consolidated state dict works end to end."""

from __future__ import annotations

import json

import pytest
import torch

from miras_pretrain.cli import main
from miras_pretrain.export import export_hf
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer
from miras_pretrain.model import build_model


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_sd():
    torch.manual_seed(0)
    return build_model(tiny_config("yaad", "MA")).state_dict()


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not any(p.name.startswith(f".tmp-{name}") for p in parent.iterdir())


def test_state_dict_from_another_config(tmp_path, tok_path, model_sd):
    other = tiny_config("yaad", "MA", d_model=96, n_heads=3)
    with pytest.raises(ValueError, match="different model config"):
        export_hf(other, model_sd, tok_path, tmp_path / "o1")
    with pytest.raises(ValueError, match="different model config"):  # memora has no delta gate: gate_up differs
        export_hf(tiny_config("memora", "MA"), model_sd, tok_path, tmp_path / "o1")
    partial = dict(model_sd)
    partial.pop("layers.1.mlp.up.weight")
    with pytest.raises(ValueError, match="lacks 'layers.1.mlp.up.weight'"):
        export_hf(tiny_config("yaad", "MA"), partial, tok_path, tmp_path / "o1")
    bad = dict(model_sd)
    bad["head.norm.weight"] = torch.full_like(bad["head.norm.weight"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        export_hf(tiny_config("yaad", "MA"), bad, tok_path, tmp_path / "o1")
    _nothing_written(tmp_path, "o1")


def test_bad_tokenizer_and_out_dir(tmp_path, tok_path, model_sd):
    cfg = tiny_config("yaad", "MA")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(cfg, model_sd, tmp_path / "missing.model", tmp_path / "o2")
    not_sp = tmp_path / "junk.model"
    not_sp.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        export_hf(cfg, model_sd, not_sp, tmp_path / "o2")
    big = tiny_tokenizer(tmp_path / "bigtok", vocab_size=600)
    with pytest.raises(ValueError, match="vocab_size is 512"):
        export_hf(cfg, model_sd, big, tmp_path / "o2")
    _nothing_written(tmp_path, "o2")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(cfg, model_sd, tok_path, taken)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]


def test_cli_checkpoint_errors(tmp_path, capsys, tok_path):
    out = tmp_path / "o3"
    line = _cli_error(capsys, ["export", "hf", "--checkpoint", str(tmp_path / "run/checkpoints/step_00000010"),
                               "--out", str(out), "--tokenizer", str(tok_path)])
    assert "does not exist" in line
    # a save killed mid-way: the directory exists but has no meta.json
    partial = tmp_path / "run" / "checkpoints" / "step_00000020"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"")
    line = _cli_error(capsys, ["export", "hf", "--checkpoint", str(partial), "--out", str(out),
                               "--tokenizer", str(tok_path)])
    assert "partial" in line and "meta.json" in line
    line = _cli_error(capsys, ["export", "hf", "--checkpoint", str(tmp_path / "run/checkpoints/latest"),
                               "--out", str(out), "--tokenizer", str(tok_path)])
    assert "no complete checkpoint" in line
    assert not out.exists()


def test_cli_state_dict_export_and_config_mismatch(tmp_path, capsys, tok_path, model_sd):
    import yaml

    sd_file = tmp_path / "consolidated.pt"
    torch.save(model_sd, sd_file)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_config("yaad", "MA").to_dict()))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(tiny_config("yaad", "MA", n_layers=4).to_dict()))
    line = _cli_error(capsys, ["export", "hf", "--state-dict", str(sd_file), "--model-config", str(wrong),
                               "--tokenizer", str(tok_path), "--out", str(tmp_path / "o4")])
    assert "lacks 'layers.2." in line and "different model config" in line
    _nothing_written(tmp_path, "o4")
    line = _cli_error(capsys, ["export", "hf", "--state-dict", str(sd_file), "--out", str(tmp_path / "o4"),
                               "--tokenizer", str(tok_path)])
    assert "--model-config" in line
    assert main(["export", "hf", "--state-dict", str(sd_file), "--model-config", str(good),
                 "--tokenizer", str(tok_path), "--out", str(tmp_path / "o4"), "--max-shard-size", "100KB"]) == 0
    assert json.loads((tmp_path / "o4" / "config.json").read_text())["layer_pattern"] == "MA"
    assert (tmp_path / "o4" / "model.safetensors.index.json").is_file()
