"""Perplexity on prepared shards (equal to the training model's loss on the same batches),
synthetic long-context tasks (exact prompt construction, scorers reach 100% with an oracle),
and the ``miras-pretrain eval`` CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from miras_pretrain.cli import main
from miras_pretrain.export import export_hf
from miras_pretrain.testing.tiny_models import tiny_config
from miras_pretrain.model import build_model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tiny stdlib corpus (documents layout) + an exported random model on its tokenizer."""
    from miras_pretrain.data.embedded import prepare_embedded_corpus

    root = tmp_path_factory.mktemp("data")
    data = prepare_embedded_corpus(str(root), vocab_size=400, seq_len=64, layout="documents",
                                   max_files=14, val_fraction=0.2)
    cfg = tiny_config("gated_delta", "MA")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = export_hf(cfg, model.state_dict(), data.tokenizer_path, root / "exported-eval-tasks")
    return data, model, out


def test_perplexity_equals_training_loss(prepared):
    from miras_pretrain.data.config import DataConfig
    from miras_pretrain.data.loader import build_eval_loader
    from miras_pretrain.evaluation.models import load_hf
    from miras_pretrain.evaluation.perplexity import eval_perplexity

    data, model, out = prepared
    hf, _ = load_hf(out)
    got = eval_perplexity(hf, [data.root], seq_len=64, batch_size=2, max_batches=3)
    # reference: the training model's mean loss on the same batches (packed rows, cu_seqlens)
    cfg = DataConfig.from_dict({"streams": [data.root], "layout": "documents", "seq_len": 64,
                                "micro_batch_size": 2, "num_workers": 0, "shuffle": False,
                                "eval_batches": 3})
    loader = build_eval_loader(cfg)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            x, y = b["input_ids"].reshape(1, -1), b["labels"].reshape(1, -1)
            count = int((y != -100).sum())
            if count:
                nll += float(model(x, labels=y, cu_seqlens=b["cu_seqlens"])) * count
                n += count
    loader.close()
    assert got.tokens == n > 0
    assert got.loss == pytest.approx(nll / n, rel=1e-5, abs=1e-6)
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_needle_prompts_exact_length_and_placement(prepared):
    from transformers import AutoTokenizer

    from miras_pretrain.evaluation.synthetic import NIAH_TASKS, needle_sample

    _, _, out = prepared
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    for task in NIAH_TASKS:
        s0 = needle_sample(tok, task, 512, 0, 3)
        s2 = needle_sample(tok, task, 512, 2, 3)
        assert len(s0.prompt_ids) == len(s2.prompt_ids) == 512
        text0, text2 = tok.decode(s0.prompt_ids), tok.decode(s2.prompt_ids)
        assert s0.answer in text0 and s2.answer in text2
        assert text0.index(s0.answer) < 200 and text2.index(s2.answer) > len(text2) - 600  # depth 0 / 1
        assert needle_sample(tok, task, 512, 1, 3).prompt_ids == needle_sample(tok, task, 512, 1, 3).prompt_ids


class _RecallOracle(nn.Module):
    """Predicts, at every position, the token that followed the previous occurrence of the
    current token: solves MQAR perfectly (a correctness check of the scorer, not of a model)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"vocab_size": vocab})()

    def forward(self, input_ids, use_cache=False):
        x = input_ids[0].tolist()
        logits = torch.zeros(1, len(x), self.vocab)
        last: dict[int, int] = {}
        for t, tok in enumerate(x):
            if tok in last:
                logits[0, t, last[tok]] = 1.0
            if t + 1 < len(x) and t % 2 == 0 and t < len(x) // 2:
                last[tok] = x[t + 1]
        return type("O", (), {"logits": logits})()


def test_mqar_layout_and_oracle_scores_100():
    from miras_pretrain.evaluation.synthetic import mqar_batch, run_mqar

    xs, ys = mqar_batch(512, 256, 3, seed=1)
    assert xs.shape == ys.shape == (3, 256)
    assert int((ys != -100).sum()) == 3 * 64  # L/4 pairs, then L/4 queries
    for x, y in zip(xs, ys):
        keys = x[:128:2]
        assert len(set(keys.tolist())) == 64  # distinct keys
        pos = (y != -100).nonzero().flatten()
        assert torch.equal(x[pos + 1], y[pos])  # the value follows its query key
    assert run_mqar(_RecallOracle(512), 512, 256, 3, seed=1) == 1.0


def test_eval_cli_on_export_dir(prepared, tmp_path, capsys):
    data, _, out = prepared
    res_file = tmp_path / "res.json"
    rc = main(["eval", "--model", str(out), "--perplexity", data.root, "--seq-len", "64",
               "--max-batches", "2", "--synthetic", "mqar,niah_passkey,niah_word", "--lengths", "256,512",
               "--samples", "2", "--out", str(res_file)])
    assert rc == 0
    res = json.loads(res_file.read_text())
    assert res["perplexity"]["tokens"] > 0 and math.isfinite(res["perplexity"]["perplexity"])
    assert set(res["synthetic"]) == {"mqar", "niah_passkey", "niah_word"}
    for row in res["synthetic"].values():
        assert set(row) == {"256", "512"} and all(0.0 <= v <= 100.0 for v in row.values())
    printed = capsys.readouterr().out
    assert "niah_passkey" in printed and "avg" in printed


def test_eval_cli_bad_inputs(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--synthetic", "mqar"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--synthetic", "mqar"]) == 2  # not an export / ckpt
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json" in err[0]
