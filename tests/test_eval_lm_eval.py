"""lm-evaluation-harness on the exported model, offline on a local JSONL task, gives the same
per-request log-likelihoods as the project's own scoring (tolerance 1e-4 absolute on sums of
~10 fp32 token log-probs: both run the same model; lm-eval batches and pads differently)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from miras_pretrain.export import export_hf
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer
from miras_pretrain.model import build_model

DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0},
    {"question": "import os\nimport", "choices": [" sys", " the", " 123"], "label": 0},
    {"question": "class Foo:\n    def __init__(self", "choices": ["):", ", x):", " self"], "label": 1},
]


def test_lm_eval_loglikelihoods_equal_own_scoring(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from miras_pretrain.evaluation.harness import run_lm_eval, summarize
    from miras_pretrain.evaluation.loglik import loglikelihood

    tok_path = tiny_tokenizer(tmp_path / "tok")
    cfg = tiny_config("moneta", "MA")
    torch.manual_seed(0)
    out = export_hf(cfg, build_model(cfg).state_dict(), tok_path, tmp_path / f"lmeval-{os.getpid()}")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny.yaml").write_text(
        "task: miras_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n")
    res = run_lm_eval(out, ["miras_tiny_mc"], include_path=str(tasks), log_samples=True)
    samples = res["samples"]["miras_tiny_mc"]
    assert len(samples) == len(DOCS)
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    n_correct = 0
    for s in samples:
        reqs = [tuple(a) for a in s["arguments"]]
        theirs = [r[0] for r in s["resps"]]
        ours = loglikelihood(model, tok, reqs)
        for (ll_t, greedy_t), (ll_o, greedy_o) in zip(theirs, ours):
            assert abs(float(ll_t) - ll_o) <= 1e-4
            assert bool(greedy_t) == greedy_o
        n_correct += int(max(range(len(ours)), key=lambda i: ours[i][0]) == s["doc"]["label"])
    acc = summarize(res)["miras_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(n_correct / len(DOCS))

