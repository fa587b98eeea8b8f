"""Data pipeline: sentencepiece tokenizer, MDS shard preparation, embedded corpora, and a
rank-aware mosaicml-streaming loader with exact resume. See docs/data.md.

Public API (imports are light; streaming/torch load only when a loader is built)::

    from miras_pretrain.data import (DataConfig, StreamSpec, Tokenizer, train_tokenizer,
        prepare_files, prepare_embedded_corpus, prepare_assoc_recall, build_train_loader,
        build_eval_loader, MirasDataLoader, read_manifest, Manifest)
"""

from __future__ import annotations

from miras_pretrain.data.config import DataConfig, StreamSpec
from miras_pretrain.data.manifest import Manifest, read_manifest
from miras_pretrain.data.tokenizer import Tokenizer, train_tokenizer

_LAZY = {
    "prepare_files": "miras_pretrain.data.prepare",
    "write_dataset": "miras_pretrain.data.prepare",
    "prepare_embedded_corpus": "miras_pretrain.data.embedded",
    "prepare_assoc_recall": "miras_pretrain.data.embedded",
    "PreparedData": "miras_pretrain.data.embedded",
    "build_train_loader": "miras_pretrain.data.loader",
    "build_eval_loader": "miras_pretrain.data.loader",
    "MirasDataLoader": "miras_pretrain.data.loader",
}

__all__ = ["DataConfig", "StreamSpec", "Manifest", "read_manifest", "Tokenizer",
           "train_tokenizer", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'miras_pretrain.data' has no attribute {name!r}")
