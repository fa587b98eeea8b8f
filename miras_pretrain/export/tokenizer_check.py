"""Which tokenizer a checkpoint was trained with, and the check that an export uses that one.

The trainer records the sha256 of the tokenizer its shards were tokenized with in each
checkpoint's ``meta.json`` (``tokenizer_sha256``, from the data manifests). Checkpoints written
before that field existed fall back to the manifests of the run's own data streams (read from the
``config`` in ``meta.json``), when they are local and still there. The comparison is the one the
data loader makes between ``data.tokenizer`` and the manifests: sha256 of the ``.model`` file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ACCEPT_FLAG = "--accept-other-tokenizer"


@dataclass(frozen=True)
class TrainedTokenizer:
    """The tokenizer identity a checkpoint recorded."""

    sha256: str
    recorded_in: str  # the file that says so (meta.json or a data manifest)
    named_path: str | None  # data.tokenizer of the run config, for the error's fix


def _from_manifests(config: dict) -> tuple[str, str] | None:
    """``(sha256, manifest path)`` from the first local stream of the run's data config."""
    from miras_pretrain.data.manifest import MANIFEST_NAME, is_remote, read_manifest

    streams = (config.get("data") or {}).get("streams") or []
    for stream in streams:
        path = stream.get("path") if isinstance(stream, dict) else stream
        try:
            if not path or is_remote(str(path)):
                continue
            return read_manifest(str(path)).tokenizer_sha256, str(Path(path) / MANIFEST_NAME)
        except (OSError, ValueError):
            continue
    return None


def trained_tokenizer(ckpt_dir: str | os.PathLike) -> TrainedTokenizer | None:
    """The tokenizer checkpoint ``ckpt_dir`` was trained with, or None when nothing records it."""
    meta_path = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None  # resolving/verifying the checkpoint reports a bad meta.json, not this check
    config = meta.get("config") or {}
    named = (config.get("data") or {}).get("tokenizer")
    if meta.get("tokenizer_sha256"):
        return TrainedTokenizer(str(meta["tokenizer_sha256"]), str(meta_path), named)
    found = _from_manifests(config)
    if found is None:
        return None
    return TrainedTokenizer(found[0], found[1], named)


def check_export_tokenizer(tokenizer_path: str | os.PathLike, trained: TrainedTokenizer | None,
                           *, accept_other: bool = False,
                           accept_flag: str | None = ACCEPT_FLAG) -> None:
    """Refuse a tokenizer whose sha256 differs from the one the checkpoint was trained with.

    One-line ``ValueError`` naming both files and the fix (the training tokenizer, or
    ``accept_flag`` to export with this one anyway; None for a command without such a flag).
    No-op when nothing was recorded or ``accept_other``.
    """
    from miras_pretrain.data.tokenizer import file_sha256

    if trained is None or accept_other:
        return
    got = file_sha256(tokenizer_path)
    if got == trained.sha256:
        return
    fix = f"pass --tokenizer {trained.named_path}" if trained.named_path else \
        "pass the tokenizer the model was trained with"
    anyway = f", or {accept_flag} to export with this one anyway" if accept_flag else ""
    raise ValueError(
        f"tokenizer {tokenizer_path} (sha256 {got[:12]}) is not the one the model was trained "
        f"with ({trained.recorded_in} records {trained.sha256[:12]}): {fix}{anyway}")
