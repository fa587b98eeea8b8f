"""``DataConfig``: the ``data:`` section of a training YAML, validated at load.

YAML shape::

    data:
      streams:                      # prepared dataset roots (local path or s3://, gs://, ...)
        - {path: runs/data/stdlib/data, weight: 3.0}
        - {path: runs/data/mqar, weight: 1.0}   # a bare string means weight 1.0
      layout: documents             # packed | documents
      seq_len: 512
      micro_batch_size: 8
      num_workers: 2
      shuffle: true
      shuffle_seed: 1234
      train_split: train
      eval_split: val
      eval_batches: null            # cap per eval pass (null: one full pass)
      cache_dir: null               # null: $MIRAS_DATA_CACHE or <tmp>/miras-data-cache-<uid>
      tokenizer: runs/data/stdlib/tokenizer.model   # checked against every manifest (null: skip)
      num_canonical_nodes: 1        # streaming's sample-order unit; keep fixed across resumes
      verify_shards: true           # hash-check local shards before loading
      predownload: null
      download_timeout: 60.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from miras_pretrain.data.manifest import LAYOUTS


@dataclass
class StreamSpec:
    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    streams: list[StreamSpec] = field(default_factory=list)
    layout: str = "documents"
    seq_len: int = 512
    micro_batch_size: int = 8
    num_workers: int = 2
    shuffle: bool = True
    shuffle_seed: int = 1234
    train_split: str = "train"
    eval_split: str = "val"
    eval_batches: int | None = None
    cache_dir: str | None = None
    tokenizer: str | None = None
    num_canonical_nodes: int = 1
    verify_shards: bool = True
    predownload: int | None = None
    download_timeout: float = 60.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "data") -> "DataConfig":
        """Build and validate from a mapping (e.g. the YAML ``data:`` section)."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        d = dict(d)
        raw = d.pop("streams", [])
        if isinstance(raw, (str, dict)):
            raw = [raw]
        if not isinstance(raw, list):
            raise ValueError(f"{where}.streams: must be a list of paths or {{path, weight}}")
        streams = []
        for i, s in enumerate(raw):
            if isinstance(s, str):
                streams.append(StreamSpec(s))
            elif isinstance(s, dict):
                extra = set(s) - {"path", "weight"}
                if extra or "path" not in s:
                    raise ValueError(f"{where}.streams[{i}]: needs keys path (and optional "
                                     f"weight), got {sorted(s)}")
                streams.append(StreamSpec(str(s["path"]), s.get("weight", 1.0)))
            else:
                raise ValueError(f"{where}.streams[{i}]: must be a path or {{path, weight}}")
        cfg = cls(streams=streams, **d)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, where: str = "data") -> None:
        """Raise a one-line ``ValueError`` naming the first bad key."""
        def pos_int(name, allow_none=False, minimum=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{where}.{name}: must be an integer >= {minimum}, got {v!r}")

        if not self.streams:
            raise ValueError(f"{where}.streams: at least one prepared dataset path is required")
        for i, s in enumerate(self.streams):
            if not isinstance(s.path, str) or not s.path:
                raise ValueError(f"{where}.streams[{i}].path: must be a non-empty string")
            w = s.weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                raise ValueError(f"{where}.streams[{i}].weight: must be a number > 0, got {w!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{where}.layout: must be one of {LAYOUTS}, got {self.layout!r}")
        pos_int("seq_len")
        pos_int("micro_batch_size")
        pos_int("num_workers", minimum=0)
        pos_int("shuffle_seed", minimum=0)
        pos_int("eval_batches", allow_none=True)
        pos_int("num_canonical_nodes")
        pos_int("predownload", allow_none=True)
        for name in ("shuffle", "verify_shards"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}.{name}: must be true or false")
        for name in ("train_split", "eval_split"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or "/" in v:
                raise ValueError(f"{where}.{name}: must be a split directory name, got {v!r}")
        for name in ("cache_dir", "tokenizer"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{where}.{name}: must be a path string or null")
        t = self.download_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"{where}.download_timeout: must be a number > 0, got {t!r}")
