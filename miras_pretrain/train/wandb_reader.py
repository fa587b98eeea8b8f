"""Read an offline W&B run file (``run-<id>.wandb``) back into Python.

wandb >= 0.30 ships no reader, so this decodes the format directly: a 7-byte header
(``:W&B``, magic 0xBEE1, version), then LevelDB-log framing -- 32 KiB blocks of records with a
``<IHB`` header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), a block's tail of
fewer than 7 bytes is zero padding -- around serialized ``wandb_internal_pb2.Record`` messages.
Used by the tests to check what the trainer logged, and handy for inspecting a run offline.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

_BLOCK = 32 * 1024
_HEADER = 7
_REC = struct.Struct("<IHB")


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield each record's payload (the serialized protobuf bytes)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (missing ':W&B' header)")
    pos = _HEADER
    pending = b""
    while pos + _REC.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _REC.size:  # zero padding at the end of a block
            pos += room
            continue
        _crc, length, rtype = _REC.unpack_from(data, pos)
        pos += _REC.size
        if rtype == 0 and length == 0:  # preallocated/zeroed tail
            break
        chunk = data[pos:pos + length]
        pos += length
        if rtype == 1:
            yield chunk
        elif rtype == 2:
            pending = chunk
        elif rtype == 3:
            pending += chunk
        elif rtype == 4:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown record type {rtype} at byte {pos}")


def read_history(path: str | Path) -> list[dict]:
    """The logged ``history`` rows: ``[{"_step": 10, "train/loss": 3.2, ...}, ...]``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key if item.key else "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_config(path: str | Path) -> dict:
    """The run config as logged (merged over all config records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    cfg: dict = {}
    for payload in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        # the initial config travels inside the "run" record, later changes as "config" records
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for item in updates:
            if item.key != "_wandb" or item.nested_key:
                key = item.key if item.key else "/".join(item.nested_key)
                cfg[key] = json.loads(item.value_json)
    return cfg


def find_run_files(run_dir: str | Path) -> list[Path]:
    """All ``*.wandb`` files under ``<run_dir>/wandb``, oldest first."""
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
