"""ModelConfig validation, the model registry (presets x sizes), parameter/FLOP counting,
tools/count_params.py and ``miras-pretrain models``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras_pretrain.model import ModelConfig, build_model, count_parameters, flops_per_token
from miras_pretrain.model.config import expand_model_section
from miras_pretrain.model import registry
from miras_pretrain.model.counting import flops_breakdown, memory_flops_per_token_head
from miras_kernels import MirasSpec
from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict

ROOT = Path(__file__).resolve().parents[1]
# every registered preset (the registry is the one list; a new preset is covered without editing here)
PRESETS = list(registry.PRESETS)
SIZES = ["tiny", "170m", "340m", "760m", "1.3b"]


@pytest.mark.parametrize("data,match", [
    ({"d_modle": 64}, r"unknown key 'd_modle'"),
    ({"d_model": 0}, r"config key 'model.d_model' = 0 .*positive integer"),
    ({"n_layers": 2.5}, r"config key 'model.n_layers' = 2.5"),
    ({"d_model": 64, "n_heads": 5}, r"config key 'model.n_heads' = 5 .*divisible"),
    ({"layer_pattern": "MX"}, r"config key 'model.layer_pattern' = 'MX'"),
    ({"n_layers": 4, "layer_pattern": "MMA"}, r"must divide n_layers=4"),
    ({"miras": {"preset": "nope"}}, r"config key 'model.miras.preset' = 'nope' is not valid: unknown Miras preset 'nope'"),
    ({"miras": {"preset": "moneta", "p": 0.5}}, r"config key 'model.miras.p' = 0.5"),
    ({"miras": "moneta"}, r"config key 'model.miras' = 'moneta'"),
    ({"backend": "cuda"}, r"config key 'model.backend' = 'cuda' .*auto, recurrent, chunked, triton"),
    ({"eta_max": -1}, r"config key 'model.eta_max' = -1 .*> 0"),
    ({"norm_eps": "1e-6"}, r"config key 'model.norm_eps' = '1e-6'"),
    ({"tie_embeddings": "yes"}, r"config key 'model.tie_embeddings' = 'yes' .*true or false"),
    ({"ffn_hidden": -3}, r"config key 'model.ffn_hidden' = -3"),
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
    with pytest.raises(ValueError, match=r"m.yaml: config key 'model.window' = -1"):
        ModelConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    assert ModelConfig(d_model=768).ffn_width == 2048  # 8/3 * 768 rounded up to 64
    assert ModelConfig(n_layers=4, layer_pattern="MA").layer_kinds() == [
        "miras", "sliding_attention", "miras", "sliding_attention"]


def test_every_preset_and_size_ships():
    for preset in PRESETS:
        for size in SIZES:
            cfg = ModelConfig.from_ref(f"{preset}_{size}")
            if size != "tiny":
                assert cfg.vocab_size == 32000 and not cfg.tie_embeddings
            want = {"transformer": "T"}.get(preset, "MA" if "hybrid" in preset else "M")
            assert cfg.layer_pattern == want
            if preset != "transformer":
                assert cfg.spec == MirasSpec.preset(preset.replace("_hybrid", ""))


@pytest.mark.parametrize("preset", PRESETS)
def test_340m_within_10_percent(preset):
    n = count_parameters(ModelConfig.from_ref(f"{preset}_340m"))
    assert abs(n - 340e6) / 340e6 < 0.10, n


@pytest.mark.parametrize("preset", PRESETS)
def test_count_matches_built_tiny_model(preset):
    cfg = ModelConfig.from_ref(f"{preset}_tiny")
    model = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_accounting():
    cfg = ModelConfig.from_ref("gated_delta_340m")
    br = flops_breakdown(cfg, 4096)
    assert br["train"] == pytest.approx(3 * br["forward"])
    assert flops_per_token(cfg, 4096) == br["train"]
    # the dense part is ~2 FLOPs per non-embedding matmul parameter, plus the head
    d, h = cfg.d_model, cfg.head_dim
    # linear memory, l2 bias, decay, chunk C: error 2d^2 + update 2d^2 + read 2d^2 + 4C*2d
    minibatch = dataclasses.replace(cfg.spec, chunk_rule="minibatch")
    assert memory_flops_per_token_head(minibatch, h, 64) == 6 * h * h + 4 * 64 * 2 * h
    # the preset's exact WY form: 3 x 2d^2 (corrected values, read, update) + 5 x 2Cd + 2C^2/3 (solve)
    assert cfg.spec.chunk_rule == "exact"
    assert memory_flops_per_token_head(cfg.spec, h, 64) == pytest.approx(6 * h * h + 10 * 64 * h + 2 * 64 * 64 / 3)
    # attention context: full causal averages (T+1)/2 keys; a window caps it
    tf = ModelConfig.from_ref("transformer_340m")
    assert flops_breakdown(tf, 8)["attention_core"] == pytest.approx(tf.n_layers * 4 * d * 4.5)
    assert flops_per_token(tf, 8192) > flops_per_token(tf, 4096)
    # lq / kl reads scan and materialise per-token weights (2 + 5 + 2 FLOPs per entry and token,
    # plus the q-norm of the chunk-start weights once per chunk) instead of decay's in-chunk products
    mon = ModelConfig.from_ref("moneta_340m")
    dh, hid = mon.head_dim, mon.spec.expansion * mon.head_dim
    entries = 2 * dh * hid
    expected = 4 * dh * hid + 2 * dh * hid + 2 * entries + (2 + 5 + 2) * entries + 5 * entries / 64
    assert memory_flops_per_token_head(mon.spec, dh, 64) == pytest.approx(expected)
    yaad = ModelConfig.from_ref("yaad_340m")
    assert flops_breakdown(mon, 4096)["memory"] > flops_breakdown(yaad, 4096)["memory"]


def test_count_params_tool(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "count_params.py"), "--seq-len", "2048", "--json", str(out),
         "moneta_340m", "transformer_tiny"],
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
    cfg = ModelConfig.from_ref("moneta_hybrid_tiny")
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


# Parameter counts of every registered model; they equal the counts of the model YAMLs the
# registry replaced (configs/models/*.yaml, checked field by field when they were removed).
REGISTERED_PARAMS = {
    "moneta": (2113696, 169922688, 341968640, 759511296, 1302072064),
    "yaad": (2113968, 169929024, 341981312, 759536256, 1302097024),
    "memora": (2113696, 169922688, 341968640, 759511296, 1302072064),
    "titans": (2113968, 169929024, 341981312, 759536256, 1302097024),
    "deltanet": (1982352, 169916352, 338810240, 759486336, 1298901376),
    "gated_delta": (1982624, 169922688, 338822912, 759511296, 1298926336),
    "transformer": (1901696, 169495296, 340837376, 756622848, 1298237440),
    "moneta_hybrid": (2007696, 169708992, 341403008, 758067072, 1300154752),
    "yaad_hybrid": (2007832, 169712160, 341409344, 758079552, 1300167232),
    "memora_hybrid": (2007696, 169708992, 341403008, 758067072, 1300154752),
    "ttt_mlp": (2113424, 169916352, 341955968, 759486336, 1302047104),
    "linear_attn": (1982352, 169916352, 338810240, 759486336, 1298901376),
    "gla": (1982624, 169922688, 338822912, 759511296, 1298926336),
}


def test_registry_parameter_counts_are_pinned():

    assert set(registry.PRESETS) == set(REGISTERED_PARAMS) and list(registry.SIZES) == SIZES
    assert len(registry.model_names()) == 65
    for preset, counts in REGISTERED_PARAMS.items():
        for size, want in zip(SIZES, counts):
            assert count_parameters(ModelConfig.from_ref(f"{preset}_{size}")) == want, (preset, size)


def test_model_yaml_by_path_and_registry_forms(tmp_path):
    # a user's own model YAML: plain fields, or a registered base with overrides
    own = tmp_path / "mine.yaml"
    own.write_text("d_model: 64\nn_layers: 2\nn_heads: 4\nmiras: {preset: titans}\n")
    cfg = ModelConfig.from_yaml(own)
    assert (cfg.d_model, cfg.n_layers, cfg.spec) == (64, 2, MirasSpec.preset("titans"))
    assert ModelConfig.from_ref(str(own)) == cfg
    based = tmp_path / "based.yaml"
    based.write_text("preset: moneta\nsize: 340m\nn_layers: 12\n")
    want = ModelConfig.from_dict(dict(ModelConfig.from_ref("moneta_340m").to_dict(), n_layers=12))
    assert ModelConfig.from_yaml(based) == want
    chained = tmp_path / "chained.yaml"
    chained.write_text("from: based.yaml\nwindow: 256\n")
    assert ModelConfig.from_yaml(chained).window == 256 and ModelConfig.from_yaml(chained).n_layers == 12
    with pytest.raises(ValueError, match=r"'model' = 'moneta_350m' .*did you mean 'moneta_340m'") as err:
        ModelConfig.from_ref("moneta_350m")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"'model.size' = '5m' is not valid: unknown size"):
        expand_model_section({"preset": "moneta", "size": "5m"})



def test_miras_fields_over_a_base_refine_its_preset():
    """``--set model.miras.p=2`` on ``model: moneta_tiny`` is Moneta with p = 2, not the default
    (linear) spec with p = 2: the fields merge onto the base's ``miras`` mapping; a new preset
    starts over from that preset."""
    from miras_pretrain.train.config import config_from_dict

    moneta = MirasSpec.preset("moneta")
    cfg = ModelConfig.from_dict(config_from_dict({"model": "moneta_tiny"}, ["model.miras.p=2"]).model)
    assert cfg.spec == dataclasses.replace(moneta, p=2.0)
    cfg = ModelConfig.from_dict(expand_model_section({"preset": "moneta", "size": "tiny", "miras": {"q": 2}}))
    assert cfg.spec == dataclasses.replace(moneta, q=2.0)
    cfg = ModelConfig.from_dict(expand_model_section({"from": "moneta_tiny", "miras": {"preset": "yaad"}}))
    assert cfg.spec == MirasSpec.preset("yaad")


def test_embed_init_std_sets_only_the_embedding():
    """``embed_init_std`` draws the token embedding at its own std (null = ``init_std``); the rest
    of the model keeps ``init_std``; a bad value is a one-line error naming the key."""
    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, layer_pattern="T")
    torch.manual_seed(0)
    wide = build_model(ModelConfig.from_dict({**base, "embed_init_std": 1.0}))
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_dict(base))
    emb = lambda m: next(p for n, p in m.named_parameters() if "embed" in n)  # noqa: E731
    assert 0.9 < float(emb(wide).detach().std()) < 1.1 and 0.015 < float(emb(plain).detach().std()) < 0.025
    q = lambda m: next(p for n, p in m.named_parameters() if "q_proj" in n)  # noqa: E731
    assert 0.015 < float(q(wide).detach().std()) < 0.025
    with pytest.raises(ValueError, match=r"config key 'model.embed_init_std' = -1") as info:
        ModelConfig.from_dict({**base, "embed_init_std": -1})
    assert "\n" not in str(info.value)


def test_memory_init_std_sets_the_mlp_memorys_initial_weights():
    """``memory_init_std`` overrides the rule by retention for the MLP memory's initial weights
    (Titans' rule: sqrt(2) (e d)^(-1/4) = 0.42 at head dim 32, expansion 4); the rest of the model
    keeps ``init_std``; a bad value is a one-line error naming the key."""
    base = dict(vocab_size=512, d_model=64, n_layers=1, n_heads=2, miras={"preset": "titans"})
    mem = lambda m: next(p for n, p in m.named_parameters() if "mem_init" in n)  # noqa: E731
    torch.manual_seed(0)
    rule = float(mem(build_model(ModelConfig.from_dict(base))).detach().std())
    torch.manual_seed(0)
    small = build_model(ModelConfig.from_dict({**base, "memory_init_std": 0.05}))
    assert 0.3 < rule < 0.55 and 0.04 < float(mem(small).detach().std()) < 0.06
    q = lambda m: next(p for n, p in m.named_parameters() if "q_proj" in n)  # noqa: E731
    assert 0.015 < float(q(small).detach().std()) < 0.025
    with pytest.raises(ValueError, match=r"config key 'model.memory_init_std' = 0") as info:
        ModelConfig.from_dict({**base, "memory_init_std": 0})
    assert "\n" not in str(info.value)


def test_default_eta_max_by_memory_and_retention():
    """eta_max left unset: 0.003 for Moneta's lq MLP memory, 0.1 for kl (Memora), 1.0 otherwise;
    an explicit value wins."""
    got = {p: ModelConfig.from_dict({"miras": {"preset": p}}).eta_max
           for p in ("moneta", "memora", "yaad", "titans", "deltanet")}
    assert got == {"moneta": 0.003, "memora": 0.1, "yaad": 1.0, "titans": 1.0, "deltanet": 1.0}
    assert ModelConfig.from_dict({"miras": {"preset": "moneta"}, "eta_max": 1.0}).eta_max == 1.0
    assert ModelConfig.from_dict({"miras": {"preset": "moneta", "memory": "linear"}}).eta_max == 1.0
    assert ModelConfig.from_dict({"miras": {"preset": "moneta", "q": 2.0}}).eta_max == 1.0  # W = A: decay


def test_huber_delta_fixed_threshold():
    """``huber_delta``: a fixed Huber threshold drops the delta gate (parameter count agrees with
    the built model) and feeds the value to the operator; only a huber bias takes it."""
    cfg = ModelConfig.from_ref("yaad_tiny")
    fixed = ModelConfig.from_dict({**cfg.to_dict(), "huber_delta": 2.0})
    assert "delta" in cfg.gate_names and "delta" not in fixed.gate_names
    assert count_parameters(fixed) == sum(p.numel() for p in build_model(fixed).parameters())
    assert count_parameters(cfg) - count_parameters(fixed) == cfg.n_layers * (cfg.gate_rank + 1) * cfg.n_heads
    with pytest.raises(ValueError, match=r"config key 'model.huber_delta' = 2.0 .*huber bias only") as info:
        ModelConfig.from_dict({**ModelConfig.from_ref("moneta_tiny").to_dict(), "huber_delta": 2.0})
    assert "\n" not in str(info.value)
