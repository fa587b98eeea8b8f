"""The unigram baseline of a prepared dataset: the loss a model that ignores context would get.

Every language model should beat it; a trained model whose validation loss stays above it has
learned nothing but token frequencies (issue: every model's validation loss falls below the
unigram entropy of the corpus).

What is counted: the *prediction targets* the trainer scores, so the number is in the same units
as the trainer's validation loss (nats per target token):

* ``packed`` layout: every stored sample holds ``seq_len + 1`` tokens and the trainer predicts
  ``sample[1:]`` from ``sample[:-1]``; the targets are ``sample[1:]`` of every sample.
* ``documents`` layout: every document is scored on its own (nothing crosses a document start),
  so the targets are ``doc[1:]`` of every document.

The unigram model: ``P(v) = (n_v + 1) / (N + V)`` from the target counts ``n_v`` of the train
split (``N`` targets, add-one smoothing over the manifest's vocabulary of ``V`` ids, so an id never
seen in train still gets a finite loss). :func:`unigram_entropy` returns its cross-entropy on the
evaluated split, ``-(1/M) sum_v m_v log P(v)`` with ``m_v`` the split's target counts (``M`` in
all). :func:`empirical_entropy` is the evaluated split's own entropy ``-sum_v (m_v/M) log(m_v/M)``
(the best unigram model *for that split*, a lower bound of the cross-entropy; the two differ by
the KL divergence between the split's frequencies and the smoothed train estimate).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from miras_pretrain.data.manifest import read_manifest


@dataclass
class UnigramStats:
    """Both entropies of one (train, evaluated) split pair, in nats per target token."""

    cross_entropy: float  # add-one unigram estimated on train, evaluated on the split
    empirical_entropy: float  # the evaluated split's own entropy
    train_targets: int
    eval_targets: int
    vocab_size: int

    def to_dict(self) -> dict:
        return {"cross_entropy": self.cross_entropy, "empirical_entropy": self.empirical_entropy,
                "perplexity": math.exp(self.cross_entropy), "train_targets": self.train_targets,
                "eval_targets": self.eval_targets, "vocab_size": self.vocab_size}


def target_counts(dataset_root: str, split: str, max_rows: int | None = None,
                  cache_dir: str | None = None) -> np.ndarray:
    """Counts of every token id among the prediction targets of ``split`` (see the module
    docstring), as an int64 array of length ``vocab_size``.

    The targets are the labels of the project's own evaluation loader (one unshuffled pass over
    the split, padding labels ``-100`` dropped), so they are by construction what the trainer's
    validation loss scores. ``max_rows`` stops after the first loader rows in stored order (packed
    layout: a row is a stored sample, and the trainer's evaluation reads the first ``eval.batches
    x micro_batch_size``; documents layout: rows of 512 tokens);
    ``cache_dir`` is the loader's shard cache (None: as for training, ``$MIRAS_DATA_CACHE`` or a
    temp dir).
    """
    from miras_pretrain.data import DataConfig, build_eval_loader

    manifest = read_manifest(dataset_root)
    if split not in manifest.splits:
        raise ValueError(f"{dataset_root}: no split {split!r} "
                         f"(prepared: {', '.join(sorted(manifest.splits))})")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be >= 1 or None")
    # packed: a loader row is one stored sample; documents: rows re-pack whole documents, and a
    # document cut at a row end keeps its next token as that row's last label, so the row length
    # changes nothing about which tokens are targets (any length works; 512 keeps rows few)
    seq_len = manifest.seq_len if manifest.layout == "packed" and manifest.seq_len else 512
    batch = 1 if max_rows is not None else 64  # a row cap needs one-row batches
    cfg = DataConfig.from_dict({
        "streams": [dataset_root], "layout": manifest.layout, "seq_len": seq_len,
        "micro_batch_size": batch, "num_workers": 0, "shuffle": False, "eval_split": split,
        "eval_batches": max_rows, "cache_dir": cache_dir,
    })
    counts = np.zeros(manifest.vocab_size, dtype=np.int64)
    loader = build_eval_loader(cfg)
    try:
        for b in loader:
            labels = b["labels"].numpy().ravel()
            counts += np.bincount(labels[labels >= 0], minlength=manifest.vocab_size)
    finally:
        loader.close()
    return counts


def unigram_stats(dataset_root: str, split: str = "val", train_split: str = "train",
                  max_rows: int | None = None) -> UnigramStats:
    """Cross-entropy of the add-one unigram model of ``train_split`` on ``split``, and ``split``'s
    own empirical entropy (nats/token). ``max_rows`` limits the *evaluated* split (train is
    always counted in full; see :func:`target_counts`)."""
    train = target_counts(dataset_root, train_split)
    evald = target_counts(dataset_root, split, max_rows)
    V = len(train)
    N, M = int(train.sum()), int(evald.sum())
    if M == 0:
        raise ValueError(f"{dataset_root}/{split}: no target tokens to evaluate")
    log_p = np.log(train + 1.0) - math.log(N + V)
    cross = float(-(evald * log_p).sum() / M)
    f = evald[evald > 0] / M
    own = float(-(f * np.log(f)).sum())
    return UnigramStats(cross_entropy=cross, empirical_entropy=own, train_targets=N,
                        eval_targets=M, vocab_size=V)


def unigram_entropy(dataset_root: str, split: str = "val", train_split: str = "train") -> float:
    """The unigram bar in nats/token: cross-entropy on ``split`` of the add-one-smoothed unigram
    model estimated on ``train_split`` (:func:`unigram_stats` has the split's own entropy too)."""
    return unigram_stats(dataset_root, split, train_split).cross_entropy


def empirical_entropy(dataset_root: str, split: str = "val") -> float:
    """Entropy (nats/token) of ``split``'s own target-token frequencies: no smoothing, no train
    split; the lowest loss any context-free model can reach on that split."""
    counts = target_counts(dataset_root, split)
    M = int(counts.sum())
    if M == 0:
        raise ValueError(f"{dataset_root}/{split}: no target tokens")
    f = counts[counts > 0] / M
    return float(-(f * np.log(f)).sum())


def main(argv: list[str] | None = None) -> int:
    """``python -m miras_pretrain.evaluation.unigram ROOT [--split val] [--max-rows N]``:
    print both entropies as JSON."""
    import argparse

    ap = argparse.ArgumentParser(description="unigram entropy of a prepared dataset (nats/token)")
    ap.add_argument("root", help="prepared dataset root (manifest.json + split dirs)")
    ap.add_argument("--split", default="val", help="evaluated split (default: val)")
    ap.add_argument("--train-split", default="train", help="split the frequencies come from (default: train)")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="evaluate only the first N loader rows of --split (packed: samples; the "
                         "trainer's eval reads eval.batches x micro_batch_size)")
    args = ap.parse_args(argv)
    stats = unigram_stats(args.root, args.split, args.train_split, args.max_rows)
    print(json.dumps(stats.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
