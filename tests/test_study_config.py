"""The study file's schema and the planning of runs (no training): every bad study file is one
line naming the key before anything runs; a good one becomes one validated training config per
run x seed with max_steps from the budget."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from miras_pretrain.cli import main
from miras_pretrain.study.config import load_study, shipped_studies_dir
from miras_pretrain.study.plan import plan_study, state_size

SHIPPED = ("paper_lm_tiny", "mqar", "ablations")


def write_study(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """\
    name: t
    base: demo_moneta_tiny.yaml
    task: mqar
    mqar_data: {vocab_size: 64, seq_len: 64, num_pairs: 4, num_train: 64, num_val: 16}
    budget: {tokens: 4096}
    set: {train.micro_batch_size: 4, eval.interval: 4}
    seeds: [0, 1]
    runs:
      - {name: gd, model: {preset: gated_delta, size: tiny, d_model: 32, n_layers: 1, n_heads: 2}}
      - name: tf
        model: {preset: transformer, size: tiny, d_model: 32, n_layers: 1, n_heads: 2}
        set: {train.lr: 1.0e-3}
    quick: {budget: {tokens: 512}, seeds: [0], runs: [tf]}
"""


def test_plan_builds_one_config_per_run_and_seed(tmp_path):
    study = load_study(write_study(tmp_path, GOOD))
    plan = plan_study(study, tmp_path / "out")
    assert [r.id for r in plan.runs] == ["gd-s0", "gd-s1", "tf-s0", "tf-s1"]
    r = plan.runs[3]
    assert r.max_steps == 4096 // (4 * 64) == 16 and r.tokens_per_step == 256
    cfg = r.config
    assert cfg["run"]["seed"] == 1 and cfg["run"]["out_dir"] == str(tmp_path / "out" / "runs" / "tf-s1")
    assert cfg["train"]["lr"] == 1.0e-3 and cfg["train"]["global_batch_size"] == 4
    assert cfg["eval"]["interval"] == 4 and cfg["model"]["vocab_size"] == 64 and cfg["model"]["layer_pattern"] == "T"
    assert cfg["data"]["streams"] == [str(tmp_path / "out" / "data" / "mqar")] and cfg["data"]["seq_len"] == 64
    assert plan.runs[0].config["train"]["lr"] == 3.0e-3  # the base config's value where no override
    # the written config is what the trainer loads
    plan.write()
    from miras_pretrain.train.config import load_config

    loaded = load_config(r.config_path)
    assert loaded.train.max_steps == 16 and loaded.run.seed == 1
    assert (tmp_path / "out" / "plan.json").is_file()


def test_quick_variant_replaces_budget_seeds_runs(tmp_path):
    study = load_study(write_study(tmp_path, GOOD), quick=True)
    plan = plan_study(study, tmp_path / "q")
    assert [r.id for r in plan.runs] == ["tf-s0"] and plan.runs[0].max_steps == 2


def test_state_size_attention_per_token_miras_fixed(tmp_path):
    plan = plan_study(load_study(write_study(tmp_path, GOOD)), tmp_path / "out")
    gd, tf = plan.runs[0].state, plan.runs[2].state
    assert tf == {"bytes_fixed": 0.0, "bytes_per_token": 4 * 2 * 32}  # K and V, fp32, d 32
    assert gd == {"bytes_fixed": 4 * 2 * 16 * 16, "bytes_per_token": 0.0}  # 2 heads of 16 x 16


BAD = [
    # (replace this line of GOOD, with this, expect this in the one-line error)
    ("    budget: {tokens: 4096}", "    budget: {tokens: 4000}",
     "'study.budget.tokens' = 4000 is not valid: not a multiple of the tokens per optimizer step of run 'gd' "
     "(4 sequences x 64 tokens = 256); use e.g. 3840 or 4096"),
    ("{preset: gated_delta, size: tiny,", "{preset: gated_deltaa, size: tiny,", "'model.preset' = 'gated_deltaa'"),
    ("    seeds: [0, 1]", "    seedz: [0, 1]", "'study.seedz' is not valid: unknown key 'seedz'; did you mean 'seeds'?"),
    ("  - name: tf", "  - name: gd", "'study.runs[1].name' = 'gd' is not valid: duplicate run name"),
    ("    base: demo_moneta_tiny.yaml", "    base: nope.yaml", "'base' = 'nope.yaml': training config not found"),
    ("    set: {train.micro_batch_size: 4, eval.interval: 4}", "    set: {trian.lr: 1}",
     "'study.set.trian.lr' is not valid: not a training config key; did you mean 'train.lr'?"),
    ("    set: {train.micro_batch_size: 4, eval.interval: 4}", "    set: {train.lr: -1}",
     "run 'gd': config key 'train.lr' = -1 is not valid: must be > 0"),
    ("runs: [tf]}", "runs: [tff]}", "'study.quick.runs[0]' = 'tff' is not valid: not a run of this study; did you mean 'tf'?"),
    ("num_pairs: 4,", "num_pair: 4,", "'study.mqar_data.num_pair' is not valid: unknown key 'num_pair'; did you mean 'num_pairs'?"),
    ("    task: mqar", "    task: lm", "'study.mqar_data'"),
    ("    seeds: [0, 1]", "    seeds: [0, 1]\n    evaluation: {recall: {vocab_size: 64, lengths: [8], pairs: [4]}}",
     "'study.evaluation.recall' is not valid: grid point length 8 x 4 pairs: seq_len=8 too short for 4 pairs"),
    ("    seeds: [0, 1]", "    seeds: [0, 1]\n    evaluation: {recall: {vocab_size: 128, lengths: [64], pairs: [4]}}",
     "'study.evaluation.recall.vocab_size' = 128 is not valid: larger than the vocabulary 64 of run 'gd'"),
    ("    seeds: [0, 1]", "    seeds: [0, 1]\n    evaluation: {needle: {tasks: [niah_passkey]}}",
     "'study.evaluation.needle' is not valid: S-NIAH needs a text tokenizer (task lm)"),
]


@pytest.mark.parametrize("old,new,expected", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_study_is_one_line_before_anything_runs(tmp_path, capsys, old, new, expected):
    assert old in GOOD
    path = write_study(tmp_path, GOOD.replace(old, new))
    out = tmp_path / "out"
    rc = main(["study", "--config", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err, err
    assert not out.exists()  # nothing prepared, written or trained


def test_missing_base_data_is_one_line(tmp_path, capsys):
    """Task lm on the base config's own data (the demo's corpus, not prepared here)."""
    body = GOOD.replace("    task: mqar\n", "    task: lm\n").replace(
        "    mqar_data: {vocab_size: 64, seq_len: 64, num_pairs: 4, num_train: 64, num_val: 16}\n", "")
    path = write_study(tmp_path, body)
    rc = main(["study", "--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a prepared dataset (no manifest.json)" in err and "corpus:" in err, err


def test_changed_study_refuses_to_mix_into_old_run_dirs(tmp_path, capsys):
    path = write_study(tmp_path, GOOD)
    out = tmp_path / "out"
    plan = plan_study(load_study(path), out)
    plan.write()
    (plan.runs[0].out_dir).mkdir(parents=True)
    (plan.runs[0].out_dir / "metrics.jsonl").write_text("")
    path.write_text(GOOD.replace("eval.interval: 4", "eval.interval: 8"))
    rc = main(["study", "--config", str(path), "--out", str(out), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "was started with another config (eval.interval changed" in err, err


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_plan(name, tmp_path):
    assert (shipped_studies_dir() / f"{name}.yaml").is_file()
    for quick in (False, True):
        plan = plan_study(load_study(name, quick=quick), tmp_path / f"{name}-{quick}")
        assert plan.runs and all(r.max_steps >= 1 for r in plan.runs)
        if quick:
            assert len(plan.runs) <= 2
    # every model of the issue is in the LM and MQAR studies
    if name in ("paper_lm_tiny", "mqar"):
        presets = {yaml.safe_dump(r.config["model"]["miras"]) if r.config["model"]["layer_pattern"] == "M" else "T"
                   for r in plan_study(load_study(name), tmp_path / "all").runs}
        assert len(presets) >= 8


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    path = write_study(tmp_path, GOOD)
    rc = main(["study", "--config", str(path), "--out", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 runs" in out and "tf-s1" in out and "16 steps x 256 tokens" in out, out
    assert not (tmp_path / "out").exists()
