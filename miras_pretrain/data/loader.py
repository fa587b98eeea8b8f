"""Rank-aware mosaicml-streaming loader with exact resume.

How streaming is made to see the data-parallel layout
-----------------------------------------------------
mosaicml-streaming reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` when a
``StreamingDataset`` is built and uses them for two different things: (1) coordination of the
processes on one machine (one "local leader" creates the shared memory, the others attach) and
(2) which slice of the global sample order a process reads. Setting those variables to the DP
rank/size breaks (1) under TP/PP > 1 (two processes with the same DP rank on one machine both
claim to be the local leader and collide). So around construction we set the env to the
*physical* layout (from ``torch.distributed``, or a lone process when it is not initialized),
and then give the dataset the DP view for (2): its ``_parallel_rank_world`` -- the object that
streaming's own ``replication`` option sets -- becomes ``World(num_nodes=dp_world_size,
ranks_per_node=1, worker=dp_rank)``. That is ``replication`` generalised to any rank order
(Megatron's TP-fastest order with PP puts a DP group's ranks far apart). ``num_canonical_nodes``
is fixed (config, default 1), so the global sample order does not depend on the DP size.

Layouts
-------
``packed``: sample ``[T+1]`` -> one row; each rank reads its own slice (``dp_rank`` of
``dp_world_size``). Resume: after every rank took ``n`` samples the consumed set is exactly the
first ``P = start + dp_world_size * n`` samples of the epoch; the state is ``(epoch, P)``. A new
DP size ``R'`` resumes exactly when ``R'`` divides ``P`` (true when the global batch is kept);
otherwise ``load_state_dict`` refuses with a clear error instead of repeating samples.

``documents``: rows are packed at load time, so ranks would use documents at different rates and
their consumed sets would stop being a prefix of the order. Instead every rank reads the global
document order (a DP view of size 1), packs the same global rows, and keeps rows
``[s*R*B + r*B, s*R*B + (r+1)*B)`` of global step ``s``; only its own rows are materialized.
The state ``(epoch, document position, token offset)`` is identical on all ranks, so resuming
with any DP size or worker count continues with exactly the next rows. Cost: each rank reads
(not trains on) all documents -- fine up to moderate DP sizes; use ``packed`` beyond that.

Train loaders are infinite (epochs follow each other; a batch may straddle two); eval loaders make
one pass, padding the last batch with ``labels = -100`` rows so every rank yields the same count.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import os
import uuid
import weakref
from collections.abc import Iterator
from math import ceil
from typing import Any

import numpy as np

from miras_pretrain.data import cache as cache_mod
from miras_pretrain.data._streaming import import_streaming
from miras_pretrain.data.config import DataConfig
from miras_pretrain.data.manifest import (VALIDATE_HASH, Manifest, is_remote, read_manifest,
                                          verify_local_shards)
from miras_pretrain.data.packing import IGNORE, DocItem, DocPacker, flat_cu_seqlens

STATE_VERSION = 1
_loader_counter = itertools.count()


def _collate_list(batch: list[dict]) -> list[dict]:
    """Keep samples as a list: rows are built in the main process (exact consumption count)."""
    return batch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextlib.contextmanager
def _physical_env():
    """Set streaming's env to this process's physical place, restore afterwards."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    dist = _dist()
    if dist is not None:
        rank, world = dist.get_rank(), dist.get_world_size()
        lws = int(saved["LOCAL_WORLD_SIZE"] or world)
        lr = int(saved["LOCAL_RANK"] if saved["LOCAL_RANK"] is not None else rank % lws)
    else:
        rank, world, lr, lws = 0, 1, 0, 1
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(lr),
                      LOCAL_WORLD_SIZE=str(lws))
    try:
        yield lr
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shared_job_id() -> str:
    """One id per job: rank 0's, broadcast, so ranks on a machine share cache dirs."""
    obj = [uuid.uuid4().hex[:12]]
    dist = _dist()
    if dist is not None:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def check_manifests(cfg: DataConfig, split: str) -> list[Manifest]:
    """Read every stream's manifest; all must agree with each other and with ``cfg``."""
    from miras_pretrain.data.tokenizer import file_sha256

    manifests = [read_manifest(s.path, timeout=cfg.download_timeout) for s in cfg.streams]
    first = manifests[0]
    want_tok = None
    if cfg.tokenizer is not None:
        if not os.path.isfile(cfg.tokenizer):
            raise FileNotFoundError(f"data.tokenizer: {cfg.tokenizer} does not exist")
        want_tok = file_sha256(cfg.tokenizer)
    for spec, m in zip(cfg.streams, manifests):
        if want_tok is not None and m.tokenizer_sha256 != want_tok:
            raise ValueError(f"{spec.path}: shards were tokenized with a different tokenizer "
                             f"(sha256 {m.tokenizer_sha256[:12]}) than data.tokenizer "
                             f"{cfg.tokenizer} ({want_tok[:12]}); re-run data prepare")
        if m.tokenizer_sha256 != first.tokenizer_sha256:
            raise ValueError(f"{spec.path}: tokenizer (sha256 {m.tokenizer_sha256[:12]}) differs "
                             f"from {cfg.streams[0].path} ({first.tokenizer_sha256[:12]}); mixed "
                             "streams must share one tokenizer")
        if m.layout != cfg.layout:
            raise ValueError(f"{spec.path}: prepared with layout {m.layout!r} but data.layout is "
                             f"{cfg.layout!r}")
        if m.layout == "packed" and m.seq_len != cfg.seq_len:
            raise ValueError(f"{spec.path}: packed with seq_len {m.seq_len} but data.seq_len is "
                             f"{cfg.seq_len}; re-run data prepare or change data.seq_len")
        if m.label_positions != first.label_positions:
            raise ValueError(f"{spec.path}: label_positions {m.label_positions} differ from "
                             f"{cfg.streams[0].path}'s {first.label_positions}; mixed streams must "
                             "train on the same positions (prepare them alike)")
        if split not in m.splits:
            raise ValueError(f"{spec.path}: no split {split!r} (has {sorted(m.splits)}); prepare "
                             "the data with one (`data prepare --val-fraction F` with F > 0 writes "
                             "'val') or name an existing one in data.train_split/data.eval_split")
    return manifests


class MirasDataLoader:
    """Iterates batches ``{"input_ids": [B,T] int64, "labels": [B,T] int64[, "cu_seqlens":
    [N+1] int32]}`` for one data-parallel rank; ``state_dict()`` / ``load_state_dict()`` resume
    with exactly the next samples. Use :func:`build_train_loader` / :func:`build_eval_loader`.
    """

    def __init__(self, cfg: DataConfig, *, split: str, train: bool, dp_rank: int,
                 dp_world_size: int, micro_batch_size: int, seed: int):
        import torch  # noqa: F401  (streaming needs it; fail early and clearly)

        cfg.validate()
        if not (isinstance(dp_world_size, int) and dp_world_size >= 1):
            raise ValueError(f"dp_world_size must be an integer >= 1, got {dp_world_size!r}")
        if not (isinstance(dp_rank, int) and 0 <= dp_rank < dp_world_size):
            raise ValueError(f"dp_rank={dp_rank!r} must be in [0, {dp_world_size})")
        if not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
            raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
        self.cfg, self.split, self.train = cfg, split, train
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.B, self.T, self.seed = micro_batch_size, cfg.seq_len, seed
        self.layout = cfg.layout
        self.manifests = check_manifests(cfg, split)
        m0 = self.manifests[0]
        self.vocab_size, self.eos_id = m0.vocab_size, m0.eos_id
        self.pad_id = m0.pad_id if m0.pad_id is not None else m0.eos_id  # input id under -100
        self.tokenizer_sha256 = m0.tokenizer_sha256
        # packed rows whose manifest names the trained positions (MQAR answers): [T] bool or None
        self.label_keep = m0.label_keep() if self.layout == "packed" else None
        if cfg.verify_shards:
            for s in cfg.streams:
                if not is_remote(s.path):
                    verify_local_shards(s.path, split)
        # DP view: packed = own slice; documents = the whole order (see module docstring)
        self._view_rank, self._view_world = ((dp_rank, dp_world_size) if self.layout == "packed"
                                             else (0, 1))
        self._closed = False
        root = cfg.cache_dir or cache_mod.default_cache_root()
        with cache_mod.machine_lock(root):  # no job starts on a prefix while we clean it
            cache_mod.clean_stale(root)
        self._cache = cache_mod.LoaderCache(root, _shared_job_id(), next(_loader_counter))
        try:
            self._build(root)
        except BaseException:
            self._cache.close()
            raise
        # cleanup on normal interpreter exit even if the user never calls close()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda o: o.close() if o is not None else None)(ref())
        atexit.register(self._atexit)
        self._epoch = 0  # epoch the next samples come from
        self._start = 0  # global sample_in_epoch where this run's reading of _epoch begins
        self._offset = 0  # documents: tokens of the first document already consumed
        self._position = (0, 0, 0)  # state after the last yielded batch
        self._batches_yielded = 0
        self._active = None  # live DataLoader iterator

    # ---------------------------------------------------------------- construction
    def _build(self, root: str) -> None:
        streaming = import_streaming()
        from streaming.base.world import World

        cfg = self.cfg
        weighted = len(cfg.streams) > 1
        streams = [streaming.Stream(remote=s.path, local=self._cache.stream_dir(i),
                                    split=self.split, proportion=s.weight if weighted else None)
                   for i, s in enumerate(cfg.streams)]
        kwargs: dict[str, Any] = dict(
            streams=streams, batch_size=self.B, shuffle=cfg.shuffle and self.train,
            shuffle_seed=self.seed, num_canonical_nodes=cfg.num_canonical_nodes,
            partition_algo="orig", validate_hash=VALIDATE_HASH,
            download_timeout=cfg.download_timeout, predownload=cfg.predownload)
        with _physical_env() as local_rank:
            lock = (cache_mod.machine_lock(root) if _dist() is None or local_rank == 0
                    else contextlib.nullcontext())
            with lock:
                ds = _dataset_class()(**kwargs)
        self._cache.set_prefix(int(ds._shm_prefix_int))
        ds._parallel_rank_world = World(num_nodes=self._view_world, ranks_per_node=1,
                                        workers_per_rank=1, worker=self._view_rank)
        ds.length = ceil(ds.epoch_size / self._view_world)
        self.dataset = ds
        self._dl = streaming.StreamingDataLoader(
            ds, batch_size=self.B, num_workers=cfg.num_workers, collate_fn=_collate_list,
            persistent_workers=False)

    # ---------------------------------------------------------------- iteration
    def _epoch_samples(self) -> Iterator[dict]:
        """One epoch of this process's streaming order, starting where the state says."""
        # streaming's epoch counter lives in shared memory and counts every __iter__; pin it to
        # ours so a resume (or a second iterator) reads the epoch we mean
        self.dataset.next_epoch = self._epoch
        self._active = iter(self._dl)
        try:
            for batch in self._active:
                yield from batch
        finally:
            self._shutdown_iter()

    def _shutdown_iter(self) -> None:
        # StreamingDataLoader.__iter__ is a generator wrapping torch's worker iterator: closing it
        # drops the last reference to that iterator, whose __del__ stops and joins the workers
        # now (not at some later garbage collection, after the cache dir is gone)
        it, self._active = self._active, None
        if it is not None:
            it.close()

    def _check_tokens(self, sample: dict) -> np.ndarray:
        tokens = sample["tokens"]
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            sid = int(sample["sample_id"])
            shard_id, idx = self.dataset.spanner[sid]
            shard = self.dataset.shards[shard_id]
            stream = self.cfg.streams[int(self.dataset.stream_per_shard[shard_id])].path
            name = (shard.zip_data or shard.raw_data).basename
            raise ValueError(f"{stream}/{self.split}/{name}: sample {idx} holds token id "
                             f"{int(tokens.max())} >= vocab_size {self.vocab_size}; the shard does "
                             "not match its manifest, re-run data prepare")
        return tokens

    def _samples(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(epoch, global position, tokens)`` in this rank's order, across epochs (train)."""
        empty_epochs = 0
        while True:
            epoch, start, n = self._epoch, self._start, 0
            for sample in self._epoch_samples():
                yield epoch, start + self._view_world * n, self._check_tokens(sample)
                n += 1
            if not self.train:
                return
            empty_epochs = empty_epochs + 1 if n == 0 else 0
            if empty_epochs > 1:
                raise RuntimeError(f"split {self.split!r} yields no samples")
            self._epoch, self._start, self._offset = epoch + 1, 0, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._closed:
            raise RuntimeError("loader is closed")
        if self._active is not None or self._batches_yielded:
            # a second iterator continues from the last yielded batch, never replays
            self._shutdown_iter()
            if self.train:
                self.load_state_dict(self.state_dict())
        gen = self._iter_packed() if self.layout == "packed" else self._iter_documents()
        return gen

    def _emit(self, tokens: np.ndarray, labels: np.ndarray, cu=None) -> dict[str, Any]:
        import torch

        out = {"input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}
        if cu is not None:
            out["cu_seqlens"] = torch.from_numpy(cu)
        self._batches_yielded += 1
        return out

    def _labels(self, nxt: np.ndarray) -> np.ndarray:
        """Labels [b, T] of packed rows from their next tokens [b, T]: -100 outside the
        manifest's ``label_positions`` (when it has them)."""
        labels = np.array(nxt, dtype=np.int64)  # a copy: the rows stay as read
        if self.label_keep is not None:
            labels[:, ~self.label_keep] = IGNORE
        return labels

    def _iter_packed(self) -> Iterator[dict[str, Any]]:
        B, T = self.B, self.T
        limit = self.cfg.eval_batches if not self.train else None
        rows: list[np.ndarray] = []
        produced = 0
        for epoch, pos, tokens in self._samples():
            if len(tokens) != T + 1:
                raise ValueError(f"split {self.split!r}: sample at position {pos} has "
                                 f"{len(tokens)} tokens, expected seq_len+1={T + 1}")
            rows.append(tokens)
            if len(rows) == B:
                x = np.stack(rows).astype(np.int64)
                rows = []
                # after every rank took this sample, the first pos + R samples are consumed
                self._position = (epoch, pos + self._view_world, 0)
                yield self._emit(np.ascontiguousarray(x[:, :-1]), self._labels(x[:, 1:]))
                produced += 1
                if limit is not None and produced >= limit:
                    return
        if rows:  # eval tail: pad to B rows so every rank yields the same number of batches
            x = np.full((B, T + 1), self.pad_id, dtype=np.int64)
            x[:len(rows)] = np.stack(rows)
            labels = np.full((B, T), IGNORE, dtype=np.int64)
            labels[:len(rows)] = self._labels(x[:len(rows), 1:])
            yield self._emit(np.ascontiguousarray(x[:, :-1]), labels)

    def _doc_items(self) -> Iterator[DocItem]:
        first = True
        for epoch, pos, tokens in self._samples():
            start = self._offset if first else 0
            first = False
            if start > len(tokens):
                raise ValueError(f"resume offset {start} beyond document at position {pos} "
                                 f"({len(tokens)} tokens): the data changed since the checkpoint")
            yield DocItem(epoch, pos, tokens, start)

    def _iter_documents(self) -> Iterator[dict[str, Any]]:
        B, T, R, r = self.B, self.T, self.dp_world_size, self.dp_rank
        packer = DocPacker(self._doc_items(), T, self.pad_id)
        limit = self.cfg.eval_batches if not self.train else None
        produced = 0
        while True:
            mine: list = []
            any_row = False
            for g in range(R * B):  # global step: R*B rows, ours are [r*B, (r+1)*B)
                own = r * B <= g < (r + 1) * B
                row = packer.row(materialize=own)
                any_row = any_row or row is not None
                if own:
                    mine.append(row)
            if not any_row:
                return  # all ranks run the same packer, so they stop at the same step
            self._position = packer.position
            tokens = np.full((B, T), self.pad_id, dtype=np.int64)
            labels = np.full((B, T), IGNORE, dtype=np.int64)
            starts: list[list[int]] = []
            for i, row in enumerate(mine):
                if row is None:  # eval tail: a padding row
                    starts.append([0])
                    continue
                tokens[i], labels[i] = row[0], row[1]
                starts.append(row[2])
            yield self._emit(tokens, labels, flat_cu_seqlens(starts, T))
            produced += 1
            if limit is not None and produced >= limit:
                return

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch this loader yielded (identical on every DP rank)."""
        epoch, sample_in_epoch, offset = self._position
        return {"version": STATE_VERSION, "layout": self.layout, "epoch": int(epoch),
                "sample_in_epoch": int(sample_in_epoch), "doc_offset": int(offset),
                "tokenizer_sha256": self.tokenizer_sha256, "seed": self.seed,
                "num_canonical_nodes": self.cfg.num_canonical_nodes,
                "streams": [[s.path, float(s.weight)] for s in self.cfg.streams],
                "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which ``state`` was taken (any DP size / worker count)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else state
            raise ValueError(f"data loader state: unsupported or missing version (got {got!r})")
        for key, mine in (("layout", self.layout), ("tokenizer_sha256", self.tokenizer_sha256),
                          ("seed", self.seed),
                          ("num_canonical_nodes", self.cfg.num_canonical_nodes),
                          ("streams", [[s.path, float(s.weight)] for s in self.cfg.streams]),
                          ("split", self.split)):
            if state.get(key) != mine:
                raise ValueError(f"data loader state: {key} {state.get(key)!r} does not match this "
                                 f"loader's {mine!r}; resume with the same data config")
        epoch, pos, off = int(state["epoch"]), int(state["sample_in_epoch"]), \
            int(state["doc_offset"])
        if pos % self._view_world:
            raise ValueError(
                f"data loader state: resume position {pos} is not divisible by dp_world_size "
                f"{self._view_world}; with layout 'packed' keep the global batch size "
                "(dp_world_size * micro_batch_size) a divisor of the samples consumed")
        self._shutdown_iter()
        self.dataset.load_state_dict({
            "epoch": epoch, "sample_in_epoch": pos,
            "num_canonical_nodes": self.cfg.num_canonical_nodes, "shuffle_seed": self.seed,
            "initial_physical_nodes": None})
        self._epoch, self._start, self._offset = epoch, pos, off
        self._position = (epoch, pos, off)
        self._batches_yielded = 0

    # ---------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Stop workers, remove this loader's cache dir, shared memory and file locks."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._shutdown_iter()
        ds = getattr(self, "dataset", None)
        if ds is not None:
            if hasattr(ds, "_iterator"):
                with contextlib.suppress(Exception):
                    ds._iterator.exit()
            handles = _shm_handles(ds)
            _unlink_created_shm(handles)
            # drop the dataset (its numpy views pin the mappings), then close every segment:
            # streaming registers each handle with atexit, which keeps it -- two descriptors and
            # the mapping per segment -- alive until the interpreter exits (12 descriptors per
            # loader; a long test session ran out of select()-able descriptors)
            self.dataset = self._dl = ds = None
            _close_shm(handles)
        self._cache.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)

    def __enter__(self) -> "MirasDataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _shm_handles(ds) -> list:
    """streaming's SharedMemory wrappers this dataset holds (None where an attribute is absent)."""
    handles = [getattr(ds, "_locals_shm", None), getattr(ds, "_resume_shm", None)]
    for attr in ("_next_epoch", "_cache_usage"):
        handles.append(getattr(getattr(getattr(ds, attr, None), "arr", None), "shm", None))
    for attr in ("_shard_states", "_shard_access_times"):
        handles.append(getattr(getattr(ds, attr, None), "shm", None))
    handles.append(getattr(getattr(getattr(ds, "_shared_barrier", None), "_arr", None), "shm",
                           None))
    return [h for h in handles if h is not None]


def _unlink_created_shm(handles: list) -> None:
    """Unlink the segments this process created through streaming's own handles, which also
    unregisters them from Python's resource tracker (a raw unlink would make it warn at exit).
    What remains (segments another process created) is removed by ``LoaderCache.close``."""
    for h in handles:
        for shm in getattr(h, "created_shms", []):
            with contextlib.suppress(Exception):
                shm.unlink()


def _close_shm(handles: list) -> None:
    """Unmap and close every segment of ``handles`` and drop streaming's atexit hook for it (its
    unlink already happened). A segment something still views stays open (BufferError)."""
    gc.collect()  # the dataset's arrays over the mappings may sit in a reference cycle
    for h in handles:
        with contextlib.suppress(Exception):
            atexit.unregister(h.cleanup)
        for shm in [*getattr(h, "created_shms", []), *getattr(h, "opened_shms", [])]:
            with contextlib.suppress(BufferError, OSError):
                shm.close()


def _make_dataset_class():
    streaming = import_streaming()

    class _SampleIdDataset(streaming.StreamingDataset):
        """StreamingDataset whose samples also carry their global sample id (for errors that
        name the shard)."""

        def get_item(self, sample_id: int, retry: int = 7) -> dict:
            sample = super().get_item(sample_id, retry)
            return {"tokens": sample["tokens"], "sample_id": sample_id}

    _SampleIdDataset.__module__ = __name__
    _SampleIdDataset.__qualname__ = "_SampleIdDataset"
    return _SampleIdDataset


def _dataset_class():
    cls = globals().get("_SampleIdDataset")
    if cls is None:
        cls = globals()["_SampleIdDataset"] = _make_dataset_class()
    return cls


def __getattr__(name: str):
    # The class is made lazily so importing this module does not import streaming (slow: pulls
    # torch and transformers); DataLoader workers unpickle it by module path, which lands here.
    if name == "_SampleIdDataset":
        return _dataset_class()
    raise AttributeError(name)


def build_train_loader(cfg: DataConfig, *, dp_rank: int = 0, dp_world_size: int = 1,
                       micro_batch_size: int | None = None, seed: int | None = None,
                       ) -> MirasDataLoader:
    """Infinite, shuffled training loader for one data-parallel rank.

    ``dp_rank``/``dp_world_size`` come from the parallel layout (not the global rank when TP/PP >
    1). Collective when ``torch.distributed`` is initialized: every rank must call it (streaming
    barriers on the default group). ``micro_batch_size``/``seed`` default to the config's.
    """
    return MirasDataLoader(cfg, split=cfg.train_split, train=True, dp_rank=dp_rank,
                           dp_world_size=dp_world_size,
                           micro_batch_size=micro_batch_size or cfg.micro_batch_size,
                           seed=cfg.shuffle_seed if seed is None else seed)


def build_eval_loader(cfg: DataConfig, *, dp_rank: int = 0, dp_world_size: int = 1,
                      micro_batch_size: int | None = None, seed: int | None = None,
                      ) -> MirasDataLoader:
    """One unshuffled pass over ``cfg.eval_split`` (capped at ``cfg.eval_batches``); every rank
    yields the same number of batches (the tail is padded with ``labels = -100``)."""
    return MirasDataLoader(cfg, split=cfg.eval_split, train=False, dp_rank=dp_rank,
                           dp_world_size=dp_world_size,
                           micro_batch_size=micro_batch_size or cfg.micro_batch_size,
                           seed=cfg.shuffle_seed if seed is None else seed)
