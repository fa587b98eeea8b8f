"""Checks a training run makes on its data before building a model: cheap (manifests and the
tokenizer only, no shard is read) and one line each, instead of a failure deep in a step.

* every stream has the training split and the validation split (``data.eval_split``): a dataset
  prepared with ``--val-fraction 0`` has no ``val/``, and the trainer always evaluates, so it is
  refused with the fix rather than run without validation;
* the model's vocabulary holds every token id the tokenizer can produce: a smaller
  ``model.vocab_size`` would otherwise fail as an ``IndexError`` inside the embedding.
"""

from __future__ import annotations

from miras_pretrain.data.config import DataConfig


def tokenizer_vocab(cfg: DataConfig) -> tuple[int, str]:
    """``(vocab size, where it comes from)``: ``data.tokenizer`` when set, else the first
    stream's manifest (what the shards were tokenized with)."""
    from miras_pretrain.data.loader import check_manifests
    from miras_pretrain.data.tokenizer import Tokenizer

    if cfg.tokenizer is not None:
        return Tokenizer(cfg.tokenizer).vocab_size, f"tokenizer {cfg.tokenizer}"
    manifest = check_manifests(cfg, cfg.train_split)[0]
    return manifest.vocab_size, f"the manifest of {cfg.streams[0].path}"


def check_model_vocab(model_vocab_size: int, cfg: DataConfig) -> None:
    """Refuse a model whose embedding cannot hold every token id of the run's tokenizer."""
    vocab, source = tokenizer_vocab(cfg)
    if model_vocab_size < vocab:
        raise ValueError(f"model.vocab_size {model_vocab_size} is smaller than the vocabulary of "
                         f"{source} ({vocab} pieces): set model.vocab_size >= {vocab} or use the "
                         "tokenizer the model is meant for")


def check_training_data(cfg: DataConfig, *, model_vocab_size: int) -> None:
    """The training and validation splits exist in every stream, the manifests agree with
    ``cfg`` and the model's vocabulary fits the tokenizer (see the module docstring)."""
    from miras_pretrain.data.loader import check_manifests

    check_manifests(cfg, cfg.train_split)
    check_manifests(cfg, cfg.eval_split)
    check_model_vocab(model_vocab_size, cfg)
