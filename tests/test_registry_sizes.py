"""Every preset at every size (issue #22, item 8): the registry covers every Miras preset of
``MirasSpec.PRESETS`` at every size, each paper size lands within 1% of its name, and
docs/model.md's parameter table is the one tools/param_table.py computes from the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from miras_kernels import MirasSpec
from miras_pretrain.model import ModelConfig, count_parameters
from miras_pretrain.model import registry

ROOT = Path(__file__).resolve().parents[1]
NOMINAL = {"170m": 170e6, "340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}


def test_every_miras_preset_has_a_registered_model():
    plain = {p for p, (pattern, _, _) in registry.PRESETS.items() if pattern == "M"}
    assert set(MirasSpec.PRESETS) <= plain, sorted(set(MirasSpec.PRESETS) - plain)


def test_every_preset_has_every_size_within_one_percent():
    names = set(registry.model_names())
    for preset, (_, miras, ffn) in registry.PRESETS.items():
        assert len(ffn) == len(registry.SIZES), preset
        for size in registry.SIZES:
            name = f"{preset}_{size}"
            assert name in names and registry.split_name(name) == (preset, size)
            cfg = ModelConfig.from_ref(name)
            if "M" in cfg.layer_pattern:
                assert cfg.miras["preset"] == miras
            if size in NOMINAL:
                n = count_parameters(cfg)
                assert abs(n - NOMINAL[size]) / NOMINAL[size] < 0.01, (name, n)


@pytest.mark.parametrize("preset", ["gla", "linear_attn", "ttt_mlp"])
def test_new_presets_build_and_run_at_tiny_size(preset):
    import torch

    from miras_pretrain.model import build_model

    cfg = ModelConfig.from_dict(dict(ModelConfig.from_ref(f"{preset}_tiny").to_dict(), n_layers=1))
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    loss = model(ids, labels=ids)
    assert torch.isfinite(loss)


def test_docs_parameter_table_is_current():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import param_table
    finally:
        sys.path.pop(0)
    text = (ROOT / "docs" / "model.md").read_text()
    table = param_table.markdown_table()
    assert param_table.replace_section(text, table) == text, "run python tools/param_table.py --write"
    # one row per preset, one column per size
    rows = [l for l in table.splitlines()[2:]]
    assert [r.split("`")[1] for r in rows] == list(registry.PRESETS)
    assert all(r.count("|") == len(registry.SIZES) + 4 for r in rows)


def test_param_table_check_fails_on_a_stale_doc(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import param_table
    finally:
        sys.path.pop(0)
    stale = tmp_path / "model.md"
    stale.write_text(f"# x\n{param_table.BEGIN}\n| old |\n{param_table.END}\n")
    monkeypatch.setattr(param_table, "DOC", stale)
    assert param_table.main(["--check"]) == 1
    assert param_table.main(["--write"]) == 0
    assert param_table.main(["--check"]) == 0
    stale.write_text("# no markers\n")
    assert param_table.main(["--check"]) == 2
