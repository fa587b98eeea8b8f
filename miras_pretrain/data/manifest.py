"""The manifest written next to prepared MDS shards, and checks run before loading them.

Layout of a prepared dataset (local directory or any remote streaming supports)::

    <root>/manifest.json          tokenizer hash, vocab size, layout, seq_len, token counts, sources
    <root>/<split>/index.json     mosaicml-streaming MDS index (per-shard sizes and hashes)
    <root>/<split>/shard.*.mds.zstd
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT = "miras-mds-v1"
LAYOUTS = ("packed", "documents")
SHARD_HASHES = ["sha1", "xxh64"]  # sorted, as MDSWriter requires
VALIDATE_HASH = "xxh64"


def is_remote(path: str) -> bool:
    """True for a cloud URL (s3://, gs://, ...); ``file://`` is not supported by streaming."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    if scheme == "file":
        raise ValueError(f"{path}: file:// URLs are not supported; give a plain path")
    return len(scheme) > 1  # one letter would be a Windows drive


@dataclass
class SplitInfo:
    num_samples: int
    num_tokens: int  # tokens stored (layout packed: overlap tokens counted once per sample)
    num_documents: int
    max_doc_len: int
    dropped_tokens: int = 0  # packed layout: tail shorter than one sequence


@dataclass
class Manifest:
    tokenizer_sha256: str
    tokenizer_path: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    layout: str
    seq_len: int | None  # packed layout: samples hold seq_len + 1 tokens
    dtype: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # what produced it (idempotency check)
    format: str = FORMAT
    # packed layout only: the input positions whose next token is trained on and scored,
    # {"start": s, "step": k} = positions s, s + k, ... < seq_len (the loader sets the other
    # labels to -100); None = every position. MQAR data uses it for answer-only loss.
    label_positions: dict[str, int] | None = None

    def label_keep(self) -> "np.ndarray | None":
        """``[seq_len]`` bool of the positions :attr:`label_positions` keeps, or None (all)."""
        return label_keep_mask(self.label_positions, self.seq_len)

    def to_json(self) -> str:
        obj = asdict(self)
        if obj["label_positions"] is None:
            del obj["label_positions"]  # manifests of ordinary data stay as before the field
        return json.dumps(obj, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            obj = json.loads(text)
            if obj.get("format") != FORMAT:
                raise ValueError(f"format {obj.get('format')!r} != {FORMAT!r}")
            obj["splits"] = {k: SplitInfo(**v) for k, v in obj["splits"].items()}
            check_label_positions(obj.get("label_positions"), obj.get("seq_len"), obj.get("layout"))
            return cls(**obj)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{where}: not a valid miras data manifest ({err}); re-run "
                             "`miras-pretrain data prepare`") from None


def check_label_positions(label_positions: Any, seq_len: int | None, layout: str) -> None:
    """Refuse a ``label_positions`` that is not ``{"start": s, "step": k}`` with
    ``0 <= s < seq_len`` and ``k >= 1`` on a packed layout (one-line ``ValueError``)."""
    if label_positions is None:
        return
    if layout != "packed" or not seq_len:
        raise ValueError(f"label_positions needs layout 'packed' with a seq_len, got layout {layout!r}")
    ok = (isinstance(label_positions, dict) and set(label_positions) == {"start", "step"}
          and all(isinstance(v, int) and not isinstance(v, bool) for v in label_positions.values()))
    if not ok or not (0 <= label_positions["start"] < seq_len and label_positions["step"] >= 1):
        raise ValueError(f"label_positions={label_positions!r} must be {{'start': s, 'step': k}} with "
                         f"0 <= s < seq_len={seq_len} and k >= 1")


def label_keep_mask(label_positions: dict[str, int] | None, seq_len: int | None) -> "np.ndarray | None":
    """``[seq_len]`` bool: True at ``start, start + step, ...``; None when ``label_positions`` is."""
    if label_positions is None:
        return None
    import numpy as np

    keep = np.zeros(int(seq_len), dtype=bool)
    keep[label_positions["start"]::label_positions["step"]] = True
    return keep


def write_manifest(root: str, manifest: Manifest) -> None:
    if is_remote(root):
        from miras_pretrain.data._streaming import import_streaming

        import_streaming()
        from streaming.base.storage.upload import CloudUploader

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, MANIFEST_NAME).write_text(manifest.to_json())
            CloudUploader.get((tmp, root), exist_ok=True).upload_file(MANIFEST_NAME)
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(root, MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, Path(root, MANIFEST_NAME))  # atomic: a crash never leaves half a manifest


def read_manifest(root: str, *, timeout: float = 60.0) -> Manifest:
    """Read ``<root>/manifest.json`` (downloading it for a remote root)."""
    if is_remote(root):
        from miras_pretrain.data._streaming import import_streaming

        import_streaming()
        from streaming.base.storage.download import download_file

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, MANIFEST_NAME)
            download_file(f"{root.rstrip('/')}/{MANIFEST_NAME}", local, timeout)
            return Manifest.from_json(Path(local).read_text(), f"{root}/{MANIFEST_NAME}")
    path = Path(root, MANIFEST_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; prepare the data with "
                                "`miras-pretrain data prepare` first")
    return Manifest.from_json(path.read_text(), str(path))


def verify_local_shards(root: str, split: str) -> int:
    """Check every shard of a local split against its index: present, size, xxh64 hash.

    Returns the number of shards checked. Raises ``ValueError`` naming the shard on a truncated or
    corrupted file, so a bad shard is never decoded into a silently wrong batch.
    """
    from miras_pretrain.data._streaming import import_streaming

    import_streaming()
    from streaming.base.hashing import get_hash

    index_path = Path(root, split, "index.json")
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist; split {split!r} was not prepared")
    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{index_path}: corrupted MDS index ({err}); re-run data prepare"
                         ) from None
    for shard in shards:
        info = shard.get("zip_data") or shard["raw_data"]
        path = Path(root, split, info["basename"])
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} is missing; re-run data prepare")
        data = path.read_bytes()
        if len(data) != info["bytes"]:
            raise ValueError(f"shard {path} is truncated or altered: {len(data)} bytes, index says "
                             f"{info['bytes']}; re-run data prepare")
        want = info.get("hashes", {}).get(VALIDATE_HASH)
        if want is not None and get_hash(VALIDATE_HASH, data) != want:
            raise ValueError(f"shard {path} fails its {VALIDATE_HASH} hash (corrupted); re-run "
                             "data prepare")
    return len(shards)
