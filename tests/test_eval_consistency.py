"""The trainer's validation line and `miras-pretrain eval` say how many tokens they scored, and
agree on the same tokens; the docs' lm-eval task YAML runs offline; a Hub task offline is one
line; lm-eval's git lookup prints nothing outside a checkout."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from miras_pretrain.cli import main
from miras_pretrain.testing import tiny_training
from miras_pretrain.train.trainer import val_scope

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0},
    {"question": "import os\nimport", "choices": [" sys", " the", " 123"], "label": 0},
]


def test_val_scope_label():
    assert val_scope(24576, 1503232) == "24,576 of 1,503,232 tokens"
    assert val_scope(900, 900) == "900 tokens, the whole split"
    assert val_scope(128, None) == "128 tokens"


@pytest.mark.slow
def test_trainer_val_line_counts_tokens_and_equals_eval_on_the_same_rows(tmp_path, capsys):
    """1 step, evaluation at the end over eval.batches=2 micro-batches of 2 rows: the line says
    how many tokens; `eval` on the checkpoint with the same 4 rows scores the same tokens and
    gets the same loss, and without --max-batches says it scored the whole split."""
    corpus = tiny_training.prepare_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    cfg = tiny_training.write_config(tmp_path / "c.yaml", tiny_training.tiny_run_config(out, corpus, steps=1))
    proc = tiny_training.run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = next(r for r in rows if "val/loss" in r)
    assert val["val/tokens"] == 2 * 2 * 32  # eval.batches x micro_batch_size x seq_len (packed rows)
    m = re.search(r"step 1: val \(([\d,]+) of ([\d,]+) tokens\) loss ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert int(m.group(1).replace(",", "")) == val["val/tokens"]
    split_total = int(m.group(2).replace(",", ""))
    assert split_total > val["val/tokens"]

    res = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(out / "checkpoints" / "latest"), "--perplexity", corpus.root,
               "--seq-len", "32", "--max-batches", "4", "--out", str(res)])
    printed = capsys.readouterr().out
    assert rc == 0
    ppl = json.loads(res.read_text())["perplexity"]
    assert ppl["tokens"] == val["val/tokens"] and ppl["scope"] == "the first 4 rows of the split"
    assert ppl["loss"] == pytest.approx(val["val/loss"], rel=1e-4)
    assert f"perplexity (val, {ppl['tokens']:,} tokens, the first 4 rows of the split, seq_len 32)" in printed

    rc = main(["eval", "--model", str(out / "checkpoints" / "latest"), "--perplexity", corpus.root,
               "--seq-len", "32", "--out", str(res)])
    printed = capsys.readouterr().out
    whole = json.loads(res.read_text())["perplexity"]
    assert rc == 0 and whole["scope"] == "the whole split" and whole["tokens"] > ppl["tokens"]
    assert f"{whole['tokens']:,} tokens, the whole split" in printed


def _docs_task_yaml() -> dict:
    text = (REPO / "docs" / "evaluation.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block, "docs/evaluation.md has no yaml example"
    return yaml.safe_load(block.group(1))


@pytest.fixture()
def exported(tmp_path, monkeypatch):
    """A tiny exported model, HF offline with its own cache, run from a directory that is not a
    git checkout."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is no checkout
    from miras_pretrain.export import export_hf
    from miras_pretrain.model import build_model
    from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer

    cfg = tiny_config("moneta", "MA")
    torch.manual_seed(0)
    out = export_hf(cfg, build_model(cfg).state_dict(), tiny_tokenizer(tmp_path / "tok"),
                    tmp_path / f"consistency-{os.getpid()}")
    work = tmp_path / "work"
    (work / "tasks").mkdir(parents=True)
    monkeypatch.chdir(work)
    return out, work


@pytest.mark.slow
def test_docs_lm_eval_task_runs_offline_without_git_noise(exported, capfd):
    out, work = exported
    task = _docs_task_yaml()
    data_file = task["dataset_kwargs"]["data_files"]["test"]  # relative: resolved from the cwd
    (work / data_file).write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (work / "tasks" / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    capfd.readouterr()
    rc = main(["eval", "--model", str(out), "--tasks", task["task"], "--include_path", "tasks", "--limit", "2"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert re.search(rf"^{task['task']}: .*acc,none=", captured.out, re.M), captured.out
    assert "not a git repository" not in captured.err + captured.out


def test_hub_task_offline_is_one_line(exported, capfd):
    out, work = exported
    (work / "tasks" / "hub.yaml").write_text(
        "task: miras_hub_task\ndataset_path: someorg/not_cached_dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_target: 0\ndoc_to_choice: [\"a\", \"b\"]\n"
        "metric_list:\n  - metric: acc\n")
    capfd.readouterr()
    rc = main(["eval", "--model", str(out), "--tasks", "miras_hub_task", "--include_path", "tasks"])
    err = capfd.readouterr().err
    assert rc == 2
    lines = [l for l in err.splitlines() if l.startswith("miras-pretrain eval: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "miras_hub_task need a dataset from the Hugging Face Hub" in lines[0]
    assert "someorg/not_cached_dataset" in lines[0] and "Traceback" not in err
    assert "not a git repository" not in err
