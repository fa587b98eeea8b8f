"""recall_accuracy: an oracle that reads the pairs gets 1.0, a constant predictor gets about the
chance of its one value, a native model runs (and keeps its training flag), the rows are held out
from the training data but of the same format, and bad arguments fail in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miras_pretrain.data.embedded import assoc_recall_answer_mask, generate_assoc_recall
from miras_pretrain.evaluation.recall import held_out_rows, recall_accuracy

V, T, P = 64, 48, 6


class Oracle(torch.nn.Module):
    """Predicts, at every position, the value last bound to the current token in the pair
    section (perfect MQAR recall); elsewhere id 0. input_ids [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab: int, num_pairs: int) -> None:
        super().__init__()
        self.vocab, self.num_pairs = vocab, num_pairs
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            row = input_ids[i].tolist()
            pairs = dict(zip(row[1:2 * self.num_pairs:2], row[2:2 * self.num_pairs + 1:2]))
            for j, tok in enumerate(row):
                logits[i, j, pairs.get(tok, 0)] = 1.0
        return logits


class Constant(torch.nn.Module):
    """Always predicts ``token``."""

    def __init__(self, vocab: int, token: int) -> None:
        super().__init__()
        self.vocab, self.token = vocab, token
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_oracle_is_perfect_at_every_shape():
    for seq_len, pairs in ((T, P), (64, 8), (20, 8), (33, 1)):
        assert recall_accuracy(Oracle(V, pairs), vocab_size=V, seq_len=seq_len, num_pairs=pairs,
                               n_samples=20, batch_size=7) == 1.0


def test_constant_predictor_is_at_chance():
    n_vals = V - 4 - (V - 4) // 2  # 30 values, ids [34, 64)
    token = 4 + (V - 4) // 2 + 5
    acc = recall_accuracy(Constant(V, token), vocab_size=V, seq_len=T, num_pairs=P, n_samples=400)
    # each answer is a uniform value: P(answer == token) = 1/30; 400 rows x 17 answers
    assert abs(acc - 1 / n_vals) < 0.015
    assert recall_accuracy(Constant(V, 1), vocab_size=V, seq_len=T, num_pairs=P, n_samples=50) == 0.0


def test_native_model_runs_and_keeps_training_flag():
    from miras_pretrain.model import build_model

    torch.manual_seed(0)
    model = build_model({"vocab_size": V, "d_model": 32, "n_layers": 1, "n_heads": 2,
                         "ffn_hidden": 32, "layer_pattern": "T"})
    model.train()
    acc = recall_accuracy(model, vocab_size=V, seq_len=T, num_pairs=P, n_samples=10, batch_size=4)
    assert 0.0 <= acc <= 1.0 and model.training
    model.eval()
    again = recall_accuracy(model, vocab_size=V, seq_len=T, num_pairs=P, n_samples=10, batch_size=10)
    assert again == acc and not model.training  # deterministic, batch size does not matter


def test_rows_are_held_out_and_in_the_training_format():
    rows = held_out_rows(vocab_size=V, seq_len=T, num_pairs=P, n_samples=64, seed=0)
    assert rows.shape == (64, T + 1)
    train = generate_assoc_recall(64, seq_len=T, vocab_size=V, num_pairs=P, seed=0)
    val = generate_assoc_recall(64, seq_len=T, vocab_size=V, num_pairs=P, seed=1_000_003)
    seen = {r.tobytes() for r in np.concatenate([train, val])}
    assert not any(r.tobytes() in seen for r in rows)
    assert not np.array_equal(rows, held_out_rows(vocab_size=V, seq_len=T, num_pairs=P,
                                                  n_samples=64, seed=1))
    # same format as the training rows: BOS, pairs (keys then values ranges), SEP, queries
    mask = assoc_recall_answer_mask(T, P)
    keys = slice(4, 4 + (V - 4) // 2)
    for row in rows:
        assert row[0] == 1 and row[2 * P + 1] == 3
        assert all(keys.start <= k < keys.stop for k in row[1:2 * P:2])
        assert all(k >= keys.stop for k in row[2:2 * P + 1:2])
        assert all(k in set(row[1:2 * P:2].tolist()) for k in row[:-1][mask])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_pairs": 0}, r"^recall_accuracy: num_pairs=0 must be an integer >= 1$"),
    ({"n_samples": 2.5}, r"^recall_accuracy: n_samples=2.5 must be an integer >= 1$"),
    ({"batch_size": 0}, r"^recall_accuracy: batch_size=0 must be an integer >= 1$"),
    ({"seed": -1}, r"^recall_accuracy: seed=-1 must be an integer >= 0$"),
    ({"num_pairs": 31}, r"^recall_accuracy: num_pairs=31 must be in \[1, 30\] for vocab_size=64$"),
    ({"seq_len": 8}, r"^recall_accuracy: seq_len=8 too short for 6 pairs"),
    ({"vocab_size": 128}, r"^recall_accuracy: model output has shape \(4, 48, 64\), expected "),
])
def test_bad_arguments(kwargs, match):
    args = {**dict(vocab_size=V, seq_len=T, num_pairs=P, n_samples=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        recall_accuracy(Constant(V, 5), **args)
