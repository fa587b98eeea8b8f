"""Reading documents from text, JSONL and Parquet files.

Every reader yields ``Document(text, source, line)`` so errors downstream can name the file and
line. Bad input policy: an empty file, undecodable bytes or a missing Parquet column is a
``ValueError`` naming the file (and line); a JSONL line that is not JSON, not an object, or lacks
the text field is skipped, counted in ``SkipCounter`` and reported, since one bad line in a large
crawl should not stop a job.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}


@dataclass
class Document:
    text: str
    source: str  # file path
    line: int  # 1-based line (JSONL) or row index (Parquet); 1 for a whole text file


@dataclass
class SkipCounter:
    """Counts skipped records by reason and keeps the first few locations for the report."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))
        return f"skipped {self.total} records ({parts}); first: {'; '.join(self.examples[:3])}"


def file_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """'text' | 'jsonl' | 'parquet' from ``fmt`` or the file suffix."""
    if fmt != "auto":
        if fmt not in ("text", "jsonl", "parquet"):
            raise ValueError(f"format={fmt!r} is not one of auto, text, jsonl, parquet")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files given directly, or every regular file under a given directory (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not out:
        raise ValueError(f"no input files found in {inputs}")
    return out


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: undecodable bytes (not UTF-8) at byte {err.start}; "
                         "convert the file to UTF-8 or drop it") from None


def read_text_file(path: Path) -> Iterator[Document]:
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path}: empty file; remove it from the inputs")
    yield Document(_decode(data, path), str(path), 1)


def read_jsonl_file(path: Path, text_field: str, skips: SkipCounter) -> Iterator[Document]:
    n_docs = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: undecodable bytes (not UTF-8); convert the "
                                 "file to UTF-8 or drop the line") from None
            if not line.strip():
                skips.add("blank line", f"{path}:{lineno}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.add("invalid JSON", f"{path}:{lineno}")
                continue
            if not isinstance(obj, dict) or text_field not in obj:
                skips.add(f"no field {text_field!r}", f"{path}:{lineno}")
                continue
            text = obj[text_field]
            if not isinstance(text, str) or not text:
                skips.add(f"field {text_field!r} not a non-empty string", f"{path}:{lineno}")
                continue
            n_docs += 1
            yield Document(text, str(path), lineno)
    if n_docs == 0 and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; remove it from the inputs")


def read_parquet_file(path: Path, text_field: str, skips: SkipCounter) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                         "pass --text-field")
    if pf.metadata.num_rows == 0:
        raise ValueError(f"{path}: empty file (0 rows); remove it from the inputs")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str) or not text:
                skips.add(f"null/empty {text_field!r}", f"{path}:row {row}")
                continue
            yield Document(text, str(path), row)


def read_documents(paths: list[Path], *, fmt: str = "auto", text_field: str = "text",
                   skips: SkipCounter | None = None) -> Iterator[Document]:
    """All documents of ``paths`` in order."""
    skips = skips if skips is not None else SkipCounter()
    for path in paths:
        kind = file_format(path, fmt)
        if kind == "text":
            yield from read_text_file(path)
        elif kind == "jsonl":
            yield from read_jsonl_file(path, text_field, skips)
        else:
            yield from read_parquet_file(path, text_field, skips)
