"""ModelConfig validation, the shipped YAMLs, parameter/FLOP counting and tools/count_params.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras_pretrain.model import ModelConfig, build_model, count_parameters, flops_per_token
from miras_pretrain.model.counting import flops_breakdown, memory_flops_per_token_head
from miras_kernels import MirasSpec
from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
PRESETS = ["moneta", "yaad", "memora", "titans", "gated_delta", "deltanet", "transformer",
           "moneta_hybrid", "yaad_hybrid", "memora_hybrid"]
SIZES = ["tiny", "170m", "340m", "760m", "1.3b"]


@pytest.mark.parametrize("data,match", [
    ({"d_modle": 64}, r"unknown key 'd_modle'"),
    ({"d_model": 0}, r"ModelConfig.d_model=0 .*positive integer"),
    ({"n_layers": 2.5}, r"ModelConfig.n_layers=2.5"),
    ({"d_model": 64, "n_heads": 5}, r"ModelConfig.n_heads=5 .*divisible"),
    ({"layer_pattern": "MX"}, r"ModelConfig.layer_pattern='MX'"),
    ({"n_layers": 4, "layer_pattern": "MMA"}, r"must divide n_layers=4"),
    ({"miras": {"preset": "nope"}}, r"ModelConfig.miras: unknown Miras preset 'nope'"),
    ({"miras": {"preset": "moneta", "p": 0.5}}, r"ModelConfig.miras: MirasSpec.p=0.5"),
    ({"miras": "moneta"}, r"ModelConfig.miras='moneta'"),
    ({"backend": "cuda"}, r"ModelConfig.backend='cuda' .*auto, recurrent, chunked, triton"),
    ({"eta_max": -1}, r"ModelConfig.eta_max=-1 .*> 0"),
    ({"norm_eps": "1e-6"}, r"ModelConfig.norm_eps='1e-6'"),
    ({"tie_embeddings": "yes"}, r"ModelConfig.tie_embeddings='yes' .*true or false"),
    ({"ffn_hidden": -3}, r"ModelConfig.ffn_hidden=-3"),
])
def test_bad_config_one_line_error(data, match):
    with pytest.raises(ValueError, match=match) as info:
        ModelConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_yaml_roundtrip_and_errors(tmp_path):
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, layer_pattern="MA", miras={"preset": "yaad"})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(path) == cfg
    path.write_text("d_model: 64\nwindow: -1\n")
    with pytest.raises(ValueError, match=r"m.yaml: ModelConfig.window=-1"):
        ModelConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    assert ModelConfig(d_model=768).ffn_width == 2048  # 8/3 * 768 rounded up to 64
    assert ModelConfig(n_layers=4, layer_pattern="MA").layer_kinds() == [
        "miras", "sliding_attention", "miras", "sliding_attention"]


def test_every_preset_and_size_ships():
    for preset in PRESETS:
        for size in SIZES:
            cfg = ModelConfig.from_yaml(MODELS / f"{preset}_{size}.yaml")
            if size != "tiny":
                assert cfg.vocab_size == 32000 and not cfg.tie_embeddings
            want = {"transformer": "T"}.get(preset, "MA" if "hybrid" in preset else "M")
            assert cfg.layer_pattern == want
            if preset != "transformer":
                assert cfg.spec == MirasSpec.preset(preset.replace("_hybrid", ""))


@pytest.mark.parametrize("preset", PRESETS)
def test_340m_within_10_percent(preset):
    n = count_parameters(ModelConfig.from_yaml(MODELS / f"{preset}_340m.yaml"))
    assert abs(n - 340e6) / 340e6 < 0.10, n


@pytest.mark.parametrize("preset", PRESETS)
def test_count_matches_built_tiny_model(preset):
    cfg = ModelConfig.from_yaml(MODELS / f"{preset}_tiny.yaml")
    model = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_accounting():
    cfg = ModelConfig.from_yaml(MODELS / "gated_delta_340m.yaml")
    br = flops_breakdown(cfg, 4096)
    assert br["train"] == pytest.approx(3 * br["forward"])
    assert flops_per_token(cfg, 4096) == br["train"]
    # the dense part is ~2 FLOPs per non-embedding matmul parameter, plus the head
    d, h = cfg.d_model, cfg.head_dim
    # linear memory, l2 bias, decay, chunk C: error 2d^2 + update 2d^2 + read 2d^2 + 4C*2d
    assert memory_flops_per_token_head(cfg.spec, h, 64) == 6 * h * h + 4 * 64 * 2 * h
    # attention context: full causal averages (T+1)/2 keys; a window caps it
    tf = ModelConfig.from_yaml(MODELS / "transformer_340m.yaml")
    assert flops_breakdown(tf, 8)["attention_core"] == pytest.approx(tf.n_layers * 4 * d * 4.5)
    assert flops_per_token(tf, 8192) > flops_per_token(tf, 4096)
    # lq / kl reads scan and materialise per-token weights (2 + 5 + 2 FLOPs per entry and token,
    # plus the q-norm of the chunk-start weights once per chunk) instead of decay's in-chunk products
    mon = ModelConfig.from_yaml(MODELS / "moneta_340m.yaml")
    dh, hid = mon.head_dim, mon.spec.expansion * mon.head_dim
    entries = 2 * dh * hid
    expected = 4 * dh * hid + 2 * dh * hid + 2 * entries + (2 + 5 + 2) * entries + 5 * entries / 64
    assert memory_flops_per_token_head(mon.spec, dh, 64) == pytest.approx(expected)
    yaad = ModelConfig.from_yaml(MODELS / "yaad_340m.yaml")
    assert flops_breakdown(mon, 4096)["memory"] > flops_breakdown(yaad, 4096)["memory"]


def test_count_params_tool(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "count_params.py"), "--seq-len", "2048", "--json", str(out),
         str(MODELS / "moneta_340m.yaml"), str(MODELS / "transformer_tiny.yaml")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "moneta_340m" in res.stdout and "train GF/tok" in res.stdout
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["moneta_340m", "transformer_tiny"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 64\nfoo: 1\n")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "count_params.py"), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown key 'foo'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_shard_state_dict_single_process_and_errors():
    cfg = ModelConfig.from_yaml(MODELS / "moneta_hybrid_tiny.yaml")
    model = build_model(cfg)
    full = gather_full_state_dict(model)
    assert set(full) == {n for n, _ in model.named_parameters()}
    torch.manual_seed(3)
    other = build_model(cfg)
    other.load_state_dict(shard_state_dict(full, other))
    for n, p in other.named_parameters():
        assert torch.equal(p, full[n])
    missing = dict(full)
    missing.pop("head.proj.weight")
    with pytest.raises(ValueError, match="lacks 'head.proj.weight'"):
        shard_state_dict(missing, other)
    small = build_model(ModelConfig.from_dict(dict(cfg.to_dict(), ffn_hidden=128)))
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate.weight.* check the model config"):
        shard_state_dict(full, small)
