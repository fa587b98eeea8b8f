"""The unigram bar (miras_pretrain/evaluation/unigram.py) against hand computations on tiny
prepared datasets, in both layouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from miras_pretrain.data.prepare import write_dataset
from miras_pretrain.evaluation.unigram import (empirical_entropy, target_counts, unigram_entropy,
                                               unigram_stats)

V = 8  # vocabulary of the synthetic datasets


def _write(root: Path, records: list[tuple[str, list[int]]], layout: str, seq_len: int | None,
           rows: bool = False) -> str:
    recs = ((split, f"r{i}", np.array(t, dtype=np.uint16)) for i, (split, t) in enumerate(records))
    write_dataset(str(root), recs,
                  layout=layout, seq_len=seq_len, vocab_size=V, eos_id=2, tokenizer_sha256="unigram-test",
                  rows=rows)
    return str(root)


def test_packed_rows_hand_computed(tmp_path):
    # seq_len 3: every row holds 4 tokens, the targets are the last 3 of each row
    root = _write(tmp_path / "ds", [
        ("train", [5, 3, 3, 4]),  # targets 3 3 4
        ("train", [4, 3, 5, 5]),  # targets 3 5 5
        ("val", [7, 3, 4, 4]),    # targets 3 4 4
        ("val", [0, 5, 3, 6]),    # targets 5 3 6
    ], layout="packed", seq_len=3, rows=True)
    # train target counts: id 3 x3, id 4 x1, id 5 x2 (N = 6); add-one over V = 8 -> denominator 14
    p = {3: 4 / 14, 4: 2 / 14, 5: 3 / 14, 6: 1 / 14}
    val_targets = [3, 4, 4, 5, 3, 6]
    expected = -sum(math.log(p[t]) for t in val_targets) / len(val_targets)
    assert unigram_entropy(root) == pytest.approx(expected, rel=1e-12)
    # the val split's own entropy: 3 x2, 4 x2, 5 x1, 6 x1 over 6 targets
    f = [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    own = -sum(x * math.log(x) for x in f)
    assert empirical_entropy(root, "val") == pytest.approx(own, rel=1e-12)
    stats = unigram_stats(root)
    assert (stats.train_targets, stats.eval_targets, stats.vocab_size) == (6, 6, V)
    assert stats.empirical_entropy == pytest.approx(own, rel=1e-12)
    # the split's own frequencies fit it at least as well as any other unigram model
    assert stats.empirical_entropy < stats.cross_entropy
    # only the first sample of val: targets 3 4 4
    first = -sum(math.log(p[t]) for t in (3, 4, 4)) / 3
    assert unigram_stats(root, max_rows=1).cross_entropy == pytest.approx(first, rel=1e-12)


def test_packed_stream_counts_the_overlap_token_once(tmp_path):
    # one document of 8 tokens packed at seq_len 3: samples [0:4] and [3:7] share token 3's
    # position; the targets are the stream's tokens 1..6 (token 0 is only context, 7 is dropped)
    stream = [1, 2, 3, 4, 5, 6, 7, 7]
    root = _write(tmp_path / "ds", [("train", stream), ("val", [1, 1, 1, 1])], layout="packed", seq_len=3)
    counts = target_counts(root, "train")
    assert counts.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_documents_layout_targets_skip_each_first_token(tmp_path):
    root = _write(tmp_path / "ds", [
        ("train", [6, 6, 6, 2]),  # targets 6 6 2
        ("train", [1, 2]),        # target 2
        ("val", [6, 2]),          # target 2
        ("val", [7, 6, 7, 2]),    # targets 6 7 2
    ], layout="documents", seq_len=None)
    assert target_counts(root, "train").tolist() == [0, 0, 2, 0, 0, 0, 2, 0]
    p = {2: 3 / 12, 6: 3 / 12, 7: 1 / 12}  # (count + 1) / (4 + 8)
    expected = -sum(math.log(p[t]) for t in (2, 6, 7, 2)) / 4
    assert unigram_entropy(root) == pytest.approx(expected, rel=1e-12)


def test_documents_longer_than_a_loader_row(tmp_path):
    """Documents cut across loader rows (rows are 512 tokens) still count every doc[1:] once."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, V, n).tolist() + [2] for n in (700, 5, 1300, 40)]
    root = _write(tmp_path / "ds", [("train", d) for d in docs] + [("val", [3, 4])],
                  layout="documents", seq_len=None)
    expected = sum(np.bincount(np.array(d[1:]), minlength=V) for d in docs)
    assert target_counts(root, "train", cache_dir=str(tmp_path / "cache")).tolist() == expected.tolist()


def test_errors_name_the_problem(tmp_path):
    root = _write(tmp_path / "ds", [("train", [1, 2, 3, 4])], layout="packed", seq_len=3, rows=True)
    with pytest.raises(ValueError, match="no split 'val'"):
        unigram_entropy(root)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        unigram_entropy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_rows"):
        target_counts(root, "train", max_rows=0)
