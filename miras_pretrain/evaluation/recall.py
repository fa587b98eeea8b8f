"""Recall accuracy of a native model on held-out multi-query associative recall (MQAR) rows.

The rows are exactly the training rows of the built-in MQAR data set
(:func:`miras_pretrain.data.embedded.generate_assoc_recall`, written by ``prepare_assoc_recall``):
``BOS k1 v1 ... kN vN SEP q1 a1 q2 a2 ...``. A model reads ``row[:-1]`` (teacher forced, one
forward pass) and is scored at the query keys, where the next token is the answer (the value
bound to that key): :func:`~miras_pretrain.data.embedded.assoc_recall_answer_mask` marks them.
The rows come from a random stream that no integer training seed can produce (``[tag, seed]``
seeds the generator; the data preparation seeds it with a bare integer), so they are held out.

Not the same format as :func:`miras_pretrain.evaluation.synthetic.mqar_batch` (the HF-export
``eval`` task: no BOS/SEP, ``length // 4`` pairs, keys and values from ``vocab - 3`` ids): that
one probes a language model zero-shot; this one scores a model trained on the MQAR data itself.
"""

from __future__ import annotations

import numpy as np
import torch

from miras_pretrain.data.embedded import (assoc_recall_answer_mask, check_assoc_recall_shape,
                                          generate_assoc_recall)

# First word of the held-out generator seed ``[RECALL_STREAM, seed]`` (ASCII "RECALL"): a
# two-word seed sequence never equals a training one (``prepare_assoc_recall`` seeds with ints).
RECALL_STREAM = 0x524543414C4C


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"recall_accuracy: {name}={value!r} must be an integer >= 1")
    return int(value)


def held_out_rows(*, vocab_size: int, seq_len: int, num_pairs: int, n_samples: int,
                  seed: int = 0) -> np.ndarray:
    """The ``[n_samples, seq_len + 1]`` MQAR rows :func:`recall_accuracy` scores (same format as
    the training data, from the held-out stream ``[RECALL_STREAM, seed]``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"recall_accuracy: seed={seed!r} must be an integer >= 0")
    return generate_assoc_recall(n_samples, seq_len=seq_len, vocab_size=vocab_size,
                                 num_pairs=num_pairs, seed=[RECALL_STREAM, int(seed)])


def _logits_of(out: object) -> torch.Tensor:
    """A native model returns the logits tensor; an HF wrapper an object with ``.logits``."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"recall_accuracy: the model returned {type(out).__name__}, expected logits "
                        "[B, T, V] (a tensor or an object with .logits)")
    return logits


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, *, vocab_size: int, seq_len: int, num_pairs: int,
                    n_samples: int, seed: int = 0, batch_size: int = 64) -> float:
    """Fraction of queried answers predicted correctly (argmax) on ``n_samples`` held-out rows.

    ``model(input_ids [B, seq_len] long)`` must return logits ``[B, seq_len, V]`` with
    ``V >= vocab_size`` (e.g. :func:`miras_pretrain.model.build_model`'s model). The rows are those
    of the training data for the same ``(vocab_size, seq_len, num_pairs)``; every answer position
    that fits in ``seq_len`` inputs counts once (``n_samples x`` the number of complete queries).
    The model runs in eval mode on its own device; its training flag is restored afterwards.
    Deterministic for a given ``seed``.
    """
    vocab_size = _positive_int("vocab_size", vocab_size)
    seq_len = _positive_int("seq_len", seq_len)
    num_pairs = _positive_int("num_pairs", num_pairs)
    n_samples = _positive_int("n_samples", n_samples)
    batch_size = _positive_int("batch_size", batch_size)
    try:
        check_assoc_recall_shape(seq_len=seq_len, vocab_size=vocab_size, num_pairs=num_pairs)
    except ValueError as err:
        raise ValueError(f"recall_accuracy: {err}") from None
    rows = held_out_rows(vocab_size=vocab_size, seq_len=seq_len, num_pairs=num_pairs,
                         n_samples=n_samples, seed=seed)
    mask = torch.from_numpy(assoc_recall_answer_mask(seq_len, num_pairs))  # [T] bool
    params = next(model.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for i in range(0, n_samples, batch_size):
            chunk = torch.from_numpy(rows[i:i + batch_size].astype(np.int64))  # [b, T + 1]
            x, y = chunk[:, :-1], chunk[:, 1:]  # inputs and next tokens, [b, T] each
            logits = _logits_of(model(x.to(device)))
            if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape) or \
                    logits.shape[2] < vocab_size:
                raise ValueError(f"recall_accuracy: model output has shape {tuple(logits.shape)}, "
                                 f"expected [{x.shape[0]}, {seq_len}, >= {vocab_size}] logits")
            pred = logits[:, mask].argmax(-1).cpu()  # [b, answers per row]
            hits += int((pred == y[:, mask]).sum())
            total += pred.numel()
    finally:
        model.train(was_training)
    return hits / total
