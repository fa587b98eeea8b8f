"""MQAR data: the answer mask marks exactly the answers, answer-only preparation ("loss:
answers") makes the loader ignore every other label (train and eval, through the real streaming
loader), ordinary data keeps all labels and its manifest unchanged, and bad arguments fail in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from miras_pretrain.data import DataConfig, build_eval_loader, build_train_loader
from miras_pretrain.data.embedded import (assoc_recall_answer_mask, generate_assoc_recall,
                                          prepare_assoc_recall)
from miras_pretrain.data.manifest import Manifest, read_manifest
from miras_pretrain.data.prepare import write_dataset


@pytest.mark.parametrize("seq_len,num_pairs", [(63, 6), (64, 8), (20, 8), (32, 1)])
def test_answer_mask_marks_exactly_the_answers(seq_len, num_pairs):
    rows = generate_assoc_recall(16, seq_len=seq_len, vocab_size=64, num_pairs=num_pairs, seed=5)
    mask = assoc_recall_answer_mask(seq_len, num_pairs)
    assert mask.shape == (seq_len,) and mask.any()
    for row in rows:
        x, nxt = row[:-1], row[1:]
        pairs = dict(zip(row[1:2 * num_pairs:2].tolist(), row[2:2 * num_pairs + 1:2].tolist()))
        for t in range(seq_len):
            # an answer follows a query key: a key read after SEP, and its label is its value
            after_sep = t > 2 * num_pairs + 1
            is_key = int(x[t]) in pairs
            assert mask[t] == (after_sep and is_key and (t - 2 * num_pairs) % 2 == 0), t
            if mask[t]:
                assert pairs[int(x[t])] == int(nxt[t])


def _loader_cfg(root: str, seq_len: int) -> DataConfig:
    return DataConfig.from_dict({"streams": [root], "seq_len": seq_len, "layout": "packed",
                                 "micro_batch_size": 4, "num_workers": 0, "shuffle": False,
                                 "eval_batches": 10})


def test_answers_only_loader_ignores_other_labels(tmp_path):
    T, P = 40, 6
    p = prepare_assoc_recall(str(tmp_path / "ans"), vocab_size=64, seq_len=T, num_pairs=P,
                             num_train=8, num_val=6, loss="answers")
    assert p.manifest.label_positions == {"start": 2 * P + 2, "step": 2}
    assert read_manifest(p.root).label_positions == {"start": 2 * P + 2, "step": 2}
    mask = assoc_recall_answer_mask(T, P)
    cfg = _loader_cfg(p.root, T)
    with build_train_loader(cfg) as loader:
        batch = next(iter(loader))
    x, y = batch["input_ids"].numpy(), batch["labels"].numpy()
    assert (y[:, ~mask] == -100).all()
    # kept labels are the next tokens: the values of the queried keys
    train = generate_assoc_recall(8, seq_len=T, vocab_size=64, num_pairs=P, seed=0)
    for xi, yi in zip(x, y):
        row = train[[np.array_equal(r[:-1], xi) for r in train].index(True)]
        assert np.array_equal(yi[mask], row[1:][mask])
    # eval: 6 rows in batches of 4, the padded tail rows are all -100
    with build_eval_loader(cfg) as loader:
        batches = list(loader)
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    assert labels.shape == (8, T)
    assert (labels[:, ~mask] == -100).all() and (labels[6:] == -100).all()
    assert (labels[:6, mask] != -100).all()


def test_all_tokens_default_and_reuse(tmp_path):
    T, P = 40, 6
    p = prepare_assoc_recall(str(tmp_path / "all"), vocab_size=64, seq_len=T, num_pairs=P,
                             num_train=4, num_val=0)
    assert p.manifest.label_positions is None and "loss" not in p.manifest.params
    # an ordinary manifest has no label_positions key at all (readable as before the field)
    assert "label_positions" not in json.loads(Path(p.root, "manifest.json").read_text())
    with build_train_loader(_loader_cfg(p.root, T)) as loader:
        batch = next(iter(loader))
    assert np.array_equal(batch["labels"].numpy()[:, :-1], batch["input_ids"].numpy()[:, 1:])
    assert (batch["labels"].numpy() != -100).all()
    assert prepare_assoc_recall(str(tmp_path / "all"), vocab_size=64, seq_len=T, num_pairs=P,
                                num_train=4, num_val=0).reused
    # switching the loss is a different preparation: refused in place without overwrite
    with pytest.raises((ValueError, FileExistsError)):
        prepare_assoc_recall(str(tmp_path / "all"), vocab_size=64, seq_len=T, num_pairs=P,
                             num_train=4, num_val=0, loss="answers")
    again = prepare_assoc_recall(str(tmp_path / "all"), vocab_size=64, seq_len=T, num_pairs=P,
                                 num_train=4, num_val=0, loss="answers", overwrite=True)
    assert not again.reused and again.manifest.label_positions == {"start": 14, "step": 2}


def test_mixed_streams_must_agree_on_label_positions(tmp_path):
    T, P = 40, 6
    a = prepare_assoc_recall(str(tmp_path / "a"), vocab_size=64, seq_len=T, num_pairs=P,
                             num_train=4, num_val=0, loss="answers")
    b = prepare_assoc_recall(str(tmp_path / "b"), vocab_size=64, seq_len=T, num_pairs=P,
                             num_train=4, num_val=0)
    cfg = DataConfig.from_dict({"streams": [a.root, b.root], "seq_len": T, "layout": "packed",
                                "micro_batch_size": 2, "num_workers": 0})
    with pytest.raises(ValueError, match="label_positions"):
        build_train_loader(cfg)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "queries"}, r"^loss='queries' is not valid: choose one of all, answers$"),
    ({"num_pairs": 40}, r"^num_pairs=40 must be in \[1, 30\]"),
    ({"seq_len": 10}, r"^seq_len=10 too short for 6 pairs"),
    ({"vocab_size": 5}, r"^vocab_size=5 must be >= 6"),
])
def test_bad_assoc_recall_arguments(tmp_path, kwargs, match):
    args = {**dict(vocab_size=64, seq_len=40, num_pairs=6, num_train=4, num_val=0), **kwargs}
    with pytest.raises(ValueError, match=match):
        prepare_assoc_recall(str(tmp_path / "x"), **args)
    assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.parametrize("positions,layout,match", [
    ({"start": 3, "step": 2}, "documents", "needs layout 'packed'"),
    ({"start": 8, "step": 2}, "packed", "0 <= s < seq_len=8"),
    ({"start": 0, "step": 0}, "packed", "k >= 1"),
    ({"start": 0}, "packed", "must be"),
])
def test_bad_label_positions(tmp_path, positions, layout, match):
    rows = np.arange(2 * 9, dtype=np.uint16).reshape(2, 9) + 3
    with pytest.raises(ValueError, match=match):
        write_dataset(str(tmp_path), (("train", f"r{i}", r) for i, r in enumerate(rows)),
                      layout=layout, seq_len=8, rows=layout == "packed", vocab_size=64, eos_id=2,
                      tokenizer_sha256="t", label_positions=positions)
    m = Manifest(tokenizer_sha256="t", tokenizer_path="", vocab_size=64, eos_id=2, bos_id=None,
                 pad_id=None, layout=layout, seq_len=8, dtype="uint16", label_positions=positions)
    with pytest.raises(ValueError, match="not a valid miras data manifest"):
        Manifest.from_json(m.to_json(), "m.json")


def test_cli_loss_answers(tmp_path, capsys):
    from miras_pretrain.cli import main

    assert main(["data", "prepare", "--builtin", "assoc-recall", "--out", str(tmp_path / "ar"),
                 "--vocab-size", "64", "--seq-len", "40", "--num-pairs", "6", "--num-samples", "16",
                 "--loss", "answers"]) == 0
    assert read_manifest(str(tmp_path / "ar")).label_positions == {"start": 14, "step": 2}
