"""Tokenize documents in parallel worker processes and write mosaicml-streaming MDS shards.

Two layouts (``Manifest.layout``):

* ``packed``: the token stream of all documents (each ending in EOS) is cut into samples of
  ``seq_len + 1`` tokens with stride ``seq_len`` (one token overlap, so every token but the first is
  a label exactly once); the tail shorter than ``seq_len + 1`` is dropped and counted.
* ``documents``: one sample per document (tokens + EOS, kept whole); the loader packs them into
  rows of ``seq_len`` with ``cu_seqlens`` at load time.

Columns: ``tokens`` as ``ndarray:uint16`` when the vocab fits in 16 bits, else ``ndarray:uint32``;
zstd compression; sha1 + xxh64 shard hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miras_pretrain.data.manifest import (LAYOUTS, SHARD_HASHES, Manifest, SplitInfo,
                                          check_label_positions, write_manifest)
from miras_pretrain.data.sources import Document

# ---------------------------------------------------------------------------------------------
# parallel tokenization

_WORKER_TOKENIZER = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    from miras_pretrain.data.tokenizer import Tokenizer

    _WORKER_TOKENIZER = Tokenizer(model_path)


def _init_pool_worker(model_path: str) -> None:
    """A tokenizer pool process: :func:`_init_worker`, deaf to Ctrl-C."""
    import signal

    # Ctrl-C reaches the whole process group: only the parent may act on it. A worker killed by
    # KeyboardInterrupt while holding the task queue's lock deadlocks the parent's pool.terminate().
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(model_path)


@contextlib.contextmanager
def _sigint_blocked():
    """Block Ctrl-C in this process while it spawns workers. The signal mask survives exec, so a
    spawned worker is deaf to Ctrl-C from its first instruction, not only from its initializer on
    (a Ctrl-C while a worker was still unpickling its bootstrap printed that worker's traceback
    next to the one-line message). A Ctrl-C that arrives meanwhile stays pending in this process
    and is delivered when the mask is restored, so it is not lost."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    tok = _WORKER_TOKENIZER
    dtype = tok.token_dtype
    out = []
    for ids in tok.encode_batch(texts):
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tok.eos_id
        out.append(arr)
    return out


def _chunks(docs: Iterable[Document], chunk_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_documents(docs: Iterable[Document], model_path: str, *, num_workers: int = 1,
                       chunk_chars: int = 1 << 20, progress: bool = True,
                       desc: str = "tokenize") -> Iterator[tuple[Document, np.ndarray]]:
    """Yield ``(doc, ids + [EOS])`` in input order, tokenizing in ``num_workers`` processes.

    ``num_workers <= 1`` tokenizes in this process (same code, no pool). Each array has the
    tokenizer's ``token_dtype``.
    """
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr,
               mininterval=1.0)
    chunk_iter = _chunks(docs, chunk_chars)
    pool = None
    try:
        if num_workers <= 1:
            _init_worker(model_path)
            results = ((c, _encode_chunk([d.text for d in c])) for c in chunk_iter)
        else:
            # spawn: workers import only sentencepiece/numpy, never a parent's torch/threads state
            with _sigint_blocked():  # the workers start deaf to Ctrl-C
                pool = mp.get_context("spawn").Pool(num_workers, _init_pool_worker, (model_path,))
            results = _ordered_pool_results(pool, chunk_iter, num_workers * 2)
        for chunk, arrays in results:
            for doc, arr in zip(chunk, arrays):
                bar.update(len(arr))
                yield doc, arr
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _ordered_pool_results(pool, chunk_iter, max_inflight: int):
    """Bounded-memory ordered map: at most ``max_inflight`` chunks queued in the pool."""
    from collections import deque

    inflight: deque = deque()
    for chunk in chunk_iter:
        inflight.append((chunk, pool.apply_async(_encode_chunk, ([d.text for d in chunk],))))
        if len(inflight) >= max_inflight:
            c, r = inflight.popleft()
            yield c, r.get()
    while inflight:
        c, r = inflight.popleft()
        yield c, r.get()


# ---------------------------------------------------------------------------------------------
# MDS writing


@dataclass
class _Stats:
    num_samples: int = 0
    num_tokens: int = 0
    num_documents: int = 0
    max_doc_len: int = 0
    dropped_tokens: int = 0


class SplitWriter:
    """Writes one split of token documents as MDS shards in the chosen layout.

    Shapes: each ``add(doc)`` takes a 1-D token array (EOS already appended); samples written are
    ``[seq_len + 1]`` (packed) or ``[len(doc)]`` (documents).
    """

    def __init__(self, out: str, *, layout: str, seq_len: int | None, vocab_size: int,
                 size_limit: int = 1 << 25, rows: bool = False):
        from miras_pretrain.data._streaming import import_streaming

        import_streaming()
        from streaming import MDSWriter

        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
        if layout == "packed" and (seq_len is None or seq_len < 1):
            raise ValueError("seq_len must be >= 1 for layout 'packed'")
        self.out, self.layout, self.seq_len, self.vocab_size = out, layout, seq_len, vocab_size
        self.rows = rows  # packed only: each record is already one sample of seq_len + 1 tokens
        self.dtype = np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
        self._writer = MDSWriter(out=out, columns={"tokens": f"ndarray:{self.dtype.name}"},
                                 compression="zstd", hashes=SHARD_HASHES, size_limit=size_limit,
                                 exist_ok=True)
        self._buf: list[np.ndarray] = []
        self._buf_len = 0
        self.stats = _Stats()

    def add(self, tokens: np.ndarray, where: str = "") -> None:
        if len(tokens) == 0:
            return
        if int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"{where}: token id {int(tokens.max())} >= vocab_size "
                             f"{self.vocab_size}; the tokenizer does not match the vocab size")
        tokens = tokens.astype(self.dtype, copy=False)
        st = self.stats
        st.num_documents += 1
        st.max_doc_len = max(st.max_doc_len, len(tokens))
        if self.layout == "packed" and self.rows:
            if len(tokens) != self.seq_len + 1:
                raise ValueError(f"{where}: row has {len(tokens)} tokens, expected seq_len+1="
                                 f"{self.seq_len + 1}")
            self._writer.write({"tokens": tokens})
            st.num_samples += 1
            st.num_tokens += len(tokens) - 1
            return
        if self.layout == "documents":
            self._writer.write({"tokens": tokens})
            st.num_samples += 1
            st.num_tokens += len(tokens)
            return
        self._buf.append(tokens)
        self._buf_len += len(tokens)
        if self._buf_len >= self.seq_len + 1:
            self._flush_packed()

    def _flush_packed(self) -> None:
        T = self.seq_len
        stream = np.concatenate(self._buf)
        n = (len(stream) - 1) // T  # samples [i*T, i*T + T + 1)
        for i in range(n):
            self._writer.write({"tokens": stream[i * T:i * T + T + 1]})
        self.stats.num_samples += n
        self.stats.num_tokens += n * T
        rest = stream[n * T:]  # keeps the overlap token as the next sample's first
        self._buf, self._buf_len = [rest], len(rest)

    def finish(self) -> SplitInfo:
        if self.layout == "packed":
            self.stats.dropped_tokens = max(self._buf_len - 1, 0) if self.stats.num_samples \
                else self._buf_len
        self._writer.finish()
        st = self.stats
        return SplitInfo(num_samples=st.num_samples, num_tokens=st.num_tokens,
                         num_documents=st.num_documents, max_doc_len=st.max_doc_len,
                         dropped_tokens=st.dropped_tokens)


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic train/val assignment by a hash of ``key`` (a file path or doc id)."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") / 2.0**64
    return "val" if h < val_fraction else "train"


def write_dataset(out_dir: str, token_docs: Iterable[tuple[str, str, np.ndarray]], *,
                  layout: str, seq_len: int | None, vocab_size: int, eos_id: int,
                  bos_id: int | None = None, pad_id: int | None = None,
                  tokenizer_sha256: str, tokenizer_path: str = "", sources: list[str] | None = None,
                  skipped: dict[str, int] | None = None, params: dict | None = None,
                  size_limit: int = 1 << 25, rows: bool = False,
                  label_positions: dict[str, int] | None = None) -> Manifest:
    """Write ``(split, where, tokens)`` records as MDS splits under ``out_dir`` plus the manifest.

    ``where`` names the record's origin (``file:line``) for error messages. ``rows=True`` (packed
    layout): every record already is one ``[seq_len + 1]`` sample. ``label_positions`` (packed
    layout): ``{"start": s, "step": k}``, train and score only the labels at those positions
    (:attr:`Manifest.label_positions`). Raises ``ValueError`` when a packed split gets no
    complete sequence (``seq_len`` longer than all its text).
    """
    check_label_positions(label_positions, seq_len, layout)
    writers: dict[str, SplitWriter] = {}
    root = str(out_dir).rstrip("/")
    for split, where, tokens in token_docs:
        if split not in writers:
            writers[split] = SplitWriter(f"{root}/{split}", layout=layout, seq_len=seq_len,
                                         vocab_size=vocab_size, size_limit=size_limit,
                                         rows=rows)
        writers[split].add(tokens, where)
    if not writers:
        raise ValueError(f"{out_dir}: no documents to write (all inputs empty or skipped)")
    splits = {name: w.finish() for name, w in writers.items()}
    for name, info in splits.items():
        if info.num_samples == 0:
            raise ValueError(
                f"{out_dir}: split {name!r} has {info.dropped_tokens} tokens (longest document "
                f"{info.max_doc_len}), fewer than one sequence of seq_len+1={seq_len + 1}; lower "
                "seq_len or add data")
    manifest = Manifest(tokenizer_sha256=tokenizer_sha256, tokenizer_path=tokenizer_path,
                        vocab_size=vocab_size, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id,
                        layout=layout, seq_len=seq_len,
                        dtype=next(iter(writers.values())).dtype.name, splits=splits,
                        sources=sources or [], skipped=dict(skipped or {}), params=params or {},
                        label_positions=label_positions)
    write_manifest(root, manifest)
    return manifest


def prepare_files(inputs: list[str], out_dir: str, tokenizer_path: str, *, layout: str,
                  seq_len: int | None, fmt: str = "auto", text_field: str = "text",
                  split: str = "train", val_fraction: float = 0.0, num_workers: int = 0,
                  progress: bool = True, size_limit: int = 1 << 25,
                  overwrite: bool = False) -> Manifest:
    """Tokenize text/JSONL/Parquet ``inputs`` into MDS shards under ``out_dir``.

    With ``val_fraction > 0`` documents go to ``train``/``val`` by a hash of ``file:line``;
    otherwise all go to ``split`` (no validation split). ``num_workers`` 0 means
    ``min(4, cpu count)``. A non-empty ``out_dir`` is refused unless ``overwrite``, which first
    removes the previous preparation there (:func:`~miras_pretrain.data.output_dir.claim_output_dir`).
    """
    from miras_pretrain.data.output_dir import claim_output_dir
    from miras_pretrain.data.sources import SkipCounter, expand_inputs, read_documents
    from miras_pretrain.data.tokenizer import Tokenizer

    if layout == "packed" and not seq_len:
        raise ValueError("--seq-len is required for layout 'packed'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data prepare: --val-fraction must be in [0, 1), got {val_fraction}")
    tok = Tokenizer(tokenizer_path)
    paths = expand_inputs(inputs)
    # inputs checked first: a bad tokenizer or input path must not cost the old data
    claim_output_dir(out_dir, overwrite=overwrite, keep=(str(tok.path), *map(str, paths)))
    skips = SkipCounter()
    docs = read_documents(paths, fmt=fmt, text_field=text_field, skips=skips)
    workers = num_workers or min(4, os.cpu_count() or 1)

    def records():
        for doc, arr in tokenize_documents(docs, str(tok.path), num_workers=workers,
                                           progress=progress):
            where = f"{doc.source}:{doc.line}"
            name = split_of(where, val_fraction) if val_fraction > 0 else split
            yield name, where, arr

    manifest = write_dataset(
        out_dir, records(), layout=layout, seq_len=seq_len if layout == "packed" else None,
        vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id, pad_id=tok.pad_id,
        tokenizer_sha256=tok.sha256, tokenizer_path=str(tok.path),
        sources=[str(p) for p in paths], skipped=skips.counts, size_limit=size_limit)
    if skips.total:
        print(f"data prepare: {skips.summary()}", file=sys.stderr)
    return manifest


def prepare_documents_from_files(file_split: list[tuple[Path, str]], out_dir: str, tok, *,
                                 layout: str, seq_len: int | None, params: dict,
                                 num_workers: int = 0, progress: bool = False) -> Manifest:
    """Tokenize whole text files, each assigned to a split, into MDS shards (embedded corpus)."""
    from miras_pretrain.data.sources import read_text_file

    split_of_file = {str(p): s for p, s in file_split}

    def docs():
        for p, _ in file_split:
            yield from read_text_file(p)

    workers = num_workers or min(4, os.cpu_count() or 1)

    def records():
        for doc, arr in tokenize_documents(docs(), str(tok.path), num_workers=workers,
                                           progress=progress):
            yield split_of_file[doc.source], doc.source, arr

    return write_dataset(out_dir, records(), layout=layout,
                         seq_len=seq_len if layout == "packed" else None,
                         vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id,
                         pad_id=tok.pad_id, tokenizer_sha256=tok.sha256,
                         tokenizer_path=str(tok.path), sources=[str(p) for p, _ in file_split],
                         params=params)
