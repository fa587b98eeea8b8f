"""``DataConfig``: the ``data:`` section of a training YAML, validated by the schema engine.

YAML shape::

    data:
      streams:                      # prepared dataset roots (local path or s3://, gs://, ...)
        - {path: runs/data/stdlib/data, weight: 3.0}
        - runs/data/mqar            # a bare string means weight 1.0
      layout: documents             # packed | documents
      seq_len: 512
      num_workers: 2
      shuffle: true
      shuffle_seed: 1234
      train_split: train
      eval_split: val
      cache_dir: null               # null: $MIRAS_DATA_CACHE or <tmp>/miras-data-cache-<uid>
      tokenizer: runs/data/stdlib/tokenizer.model   # checked against every manifest (null: skip)
      num_canonical_nodes: 1        # streaming's sample-order unit; keep fixed across resumes
      verify_shards: true           # hash-check local shards before loading
      predownload: null
      download_timeout: 60.0

``micro_batch_size`` and ``eval_batches`` are the loaders' batch size and evaluation cap when the
data package is used on its own; a training config refuses them under ``data:`` (one home per
knob: ``train.micro_batch_size``, ``eval.batches``) and fills them in from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from miras_pretrain import schema
from miras_pretrain.data.manifest import LAYOUTS


@dataclass
class StreamSpec:
    """One prepared dataset and its mixing weight."""

    path: str = field(metadata=dict(nonempty=True, fix="give the prepared dataset's root directory or URL",
                                    doc="prepared dataset root (local path or s3://, gs://, ...)"))
    weight: float = field(default=1.0, metadata=dict(gt=0, finite=True, fix="use a number > 0",
                                                     doc="mixing weight"))


def _f(default: Any, doc: str, **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=list, metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class DataConfig:
    """Where the token shards are and how the loaders read them (see the module docstring)."""

    streams: list[StreamSpec] = _f([], "prepared datasets: paths or {path, weight} (mixed by weight)")
    layout: str = _f("documents", "packed (fixed rows) or documents (whole documents + cu_seqlens)",
                     choices=LAYOUTS)
    seq_len: int = _f(512, "tokens per row", ge=1)
    micro_batch_size: int = _f(8, "standalone loaders only; in a training config: train.micro_batch_size",
                               ge=1)
    num_workers: int = _f(2, "loader worker processes per rank", ge=0)
    shuffle: bool = _f(True, "shuffle training samples")
    shuffle_seed: int = _f(1234, "sample-order seed (not run.seed: a new init keeps the order)", ge=0)
    train_split: str = _f("train", "split directory read for training")
    eval_split: str = _f("val", "split directory read for validation")
    eval_batches: int | None = _f(None, "standalone loaders only; in a training config: eval.batches",
                                  ge=1)
    cache_dir: str | None = _f(None, "local shard cache; null = $MIRAS_DATA_CACHE or a temp dir",
                               nonempty=True)
    tokenizer: str | None = _f(None, "sentencepiece model checked against every manifest; null = skip",
                               nonempty=True)
    num_canonical_nodes: int = _f(1, "streaming's sample-order unit; keep fixed across resumes", ge=1)
    verify_shards: bool = _f(True, "hash-check local shards before loading")
    predownload: int | None = _f(None, "samples to download ahead (remote streams); null = streaming's",
                                 ge=1)
    download_timeout: float = _f(60.0, "seconds per remote shard download", gt=0, finite=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "data") -> "DataConfig":
        """Build and validate from a mapping (e.g. the YAML ``data:`` section)."""
        if isinstance(d, dict) and "streams" in d:
            d = dict(d, streams=_stream_list(d["streams"]))
        return schema.build(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, where: str = "data") -> None:
        """Re-check every field (a one-line ``ConfigError`` naming the first bad key)."""
        schema.validate(self, where)

    def check(self, where: str) -> None:
        """Rules beyond one field's type and bounds."""
        if not self.streams:
            raise schema.bad_value(f"{where}.streams", self.streams,
                                   "at least one prepared dataset path is required",
                                   "list the roots written by miras-pretrain data prepare")
        for name in ("train_split", "eval_split"):
            v = getattr(self, name)
            if not v or "/" in v:
                raise schema.bad_value(f"{where}.{name}", v, "must be a split directory name",
                                       "e.g. train or val")


def _stream_list(raw: Any) -> Any:
    """A bare path (or one mapping) -> a one-entry list; bare paths -> ``{path: ...}``."""
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if isinstance(raw, list):
        return [{"path": s} if isinstance(s, str) else s for s in raw]
    return raw
