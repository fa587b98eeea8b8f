"""Checksums of a checkpoint's files, and their verification before anything loads them.

A save records, for every file under its ``step_*`` directory (``meta.json`` itself excepted),
the size and a digest in ``meta.json["files"]`` (the algorithm in ``meta.json["hash"]``);
``meta.json`` is written last, so a checkpoint with a manifest is one whose every file was
complete when it was recorded. Verification reads every file again: a missing file, a size that
differs (truncation) or a digest that differs (flipped bytes) is a :class:`CheckpointCorrupt`
naming the file.

The digest is XXH3-128 (``xxhash``, already installed for mosaicml-streaming): the faults to
catch are disk and copy errors, not an adversary, and it runs at memory speed (~18 GB/s per
core here, against 1.7 GB/s for SHA-256 and 0.9 GB/s for blake2b), which is what keeps the
check small next to the save (``tools/bench_checkpoint.py``; numbers in docs/benchmarks.md).
Without ``xxhash`` a save records SHA-256; verification reads the algorithm from the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

META = "meta.json"
_CHUNK = 8 << 20  # bytes read per update: large enough that Python overhead is negligible


def _hashers() -> dict[str, Callable[[], Any]]:
    """Digest constructors by manifest name (``update(bytes)``, ``hexdigest()``)."""
    out: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256}
    try:
        import xxhash

        out["xxh3_128"] = xxhash.xxh3_128
    except ImportError:  # pragma: no cover - xxhash comes with mosaicml-streaming
        pass
    return out


HASHERS = _hashers()
HASH_NAME = "xxh3_128" if "xxh3_128" in HASHERS else "sha256"  # the one new saves record


class CheckpointCorrupt(ValueError):
    """A checkpoint whose files do not match its manifest (or whose ``meta.json`` is unreadable).

    A ``ValueError`` so that the CLI prints it as one line; ``path`` is the offending file and
    ``reason`` the short why, for walk-back messages."""

    def __init__(self, path: Path, reason: str, fix: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint file {self.path} {reason}" + (f": {fix}" if fix else ""))


def file_digest(path: Path, algorithm: str = HASH_NAME) -> str:
    """Hex digest of one file, read in large chunks into one reused buffer."""
    h = HASHERS[algorithm]()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file a manifest covers (all but ``meta.json`` and
    its ``.tmp`` while being written), sorted so that every rank sees the same order."""
    out = []
    for p in ckpt_dir.rglob("*"):
        rel = p.relative_to(ckpt_dir).as_posix()
        if p.is_file() and rel not in (META, META + ".tmp"):
            out.append(rel)
    return sorted(out)


def hash_files(ckpt_dir: Path, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{rel: {"size": bytes, "digest": hex}}`` (``HASH_NAME``) for the given files of ``ckpt_dir``."""
    return {rel: {"size": (ckpt_dir / rel).stat().st_size, "digest": file_digest(ckpt_dir / rel)}
            for rel in rels}


def read_meta_file(ckpt_dir: Path) -> dict[str, Any]:
    """``meta.json`` as a dict; unreadable or not a JSON object is :class:`CheckpointCorrupt`."""
    path = Path(ckpt_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(path, "is missing", "the save did not finish; pass a complete step_* directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointCorrupt(path, f"is unreadable ({type(err).__name__})",
                                "the checkpoint is damaged; use an older step_* directory") from None
    if not isinstance(meta, dict):
        raise CheckpointCorrupt(path, "is not a JSON object", "the checkpoint is damaged; use an older step_* directory")
    return meta


def verify_checkpoint(ckpt_dir: Path, meta: Optional[dict[str, Any]] = None) -> bool:
    """Check every file of ``ckpt_dir`` against its manifest.

    Returns True when verified, False for a checkpoint written before manifests existed (no
    ``files`` entry: loadable but unverified). Raises :class:`CheckpointCorrupt` naming the first
    file that is missing, of another size, or of another digest. Sizes are checked for all files
    before any is hashed, so a truncated or missing file is found without reading gigabytes."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta_file(ckpt_dir) if meta is None else meta
    files = meta.get("files")
    if files is None:
        return False
    fix = "the checkpoint is damaged; resume from an older one (--resume auto walks back) or pass an older step_* directory"
    if not isinstance(files, dict) or not files:
        raise CheckpointCorrupt(ckpt_dir / META, "has an empty or malformed 'files' manifest", fix)
    for rel, rec in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointCorrupt(path, "is missing", fix)
        size = path.stat().st_size
        if size != rec.get("size"):
            raise CheckpointCorrupt(path, f"has {size} bytes, the manifest records {rec.get('size')} (truncated?)", fix)
    algorithm = meta.get("hash", "sha256")
    if algorithm not in HASHERS:
        raise CheckpointCorrupt(ckpt_dir / META, f"records {algorithm!r} digests, which this installation cannot "
                                "compute", "pip install xxhash (a mosaicml-streaming dependency)")
    for rel, rec in files.items():
        digest = rec.get("digest")
        if digest is None:
            raise CheckpointCorrupt(ckpt_dir / META, f"records no digest for {rel}", fix)
        if file_digest(ckpt_dir / rel, algorithm) != digest:
            raise CheckpointCorrupt(ckpt_dir / rel, f"does not match its {algorithm} digest in {META} (bytes changed)", fix)
    return True
