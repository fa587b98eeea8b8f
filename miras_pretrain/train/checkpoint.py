"""Atomic, verified, pruned DeepSpeed checkpoints and ``--resume auto``.

Layout under the checkpoint root::

    latest                   text file with the newest complete tag (DeepSpeed's own format,
                             so ``engine.load_checkpoint(root)`` also understands it)
    step_00000100/           DeepSpeed's sharded files (model, ZeRO optimizer partitions,
                             lr scheduler) + trainer_state_rank<R>.pt per rank (step, RNG,
                             data-loader state, counters) + meta.json (written last, with the
                             size and digest of every other file: ``checkpoint_manifest.py``)
    .tmp-step_00000200/      a save in progress (or a save killed mid-way: ignored, removed)

A save writes everything into ``.tmp-<tag>``, waits for all ranks, hashes the files, then rank 0
writes ``meta.json``, renames the directory to ``<tag>`` and only then replaces ``latest``. A
process killed at any point therefore leaves the previous checkpoint intact and ``latest``
naming a complete directory. Loading goes through :func:`resolve_checkpoint`, which follows
``latest`` and verifies the files against the manifest first (walking back for ``--resume``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.checkpoint_manifest import (
    META,
    HASH_NAME,
    CheckpointCorrupt,
    checkpoint_files,
    hash_files,
    read_meta_file,
    verify_checkpoint,
)

TAG_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``[(step, dir)]`` of complete checkpoints (with meta.json), oldest first."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and d.is_dir() and (d / META).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def _pointer_target(root: Path) -> tuple[Optional[Path], str]:
    """``(complete checkpoint that root/latest names or None, why not)``."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{pointer} is unreadable"
    target = root / tag
    if not TAG_RE.match(tag) or not (target / META).is_file():
        return None, f"{pointer} names {tag!r}, which is not a complete checkpoint (dangling)"
    return target, ""


def find_latest(root: str | Path) -> Optional[Path]:
    """The complete checkpoint ``root/latest`` names; when the pointer is missing or dangling,
    the newest complete one (highest step with meta.json). Nothing is verified here (see
    :func:`resolve_checkpoint`). A higher-numbered directory that ``latest`` does not name is
    never preferred: it may be another run's, or a save whose pointer update never happened
    (then the run resumes one checkpoint earlier, which is still exact)."""
    root = Path(root)
    target, _ = _pointer_target(root)
    if target is not None:
        return target
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def read_meta(ckpt_dir: str | Path) -> dict:
    """The ``meta.json`` of a complete checkpoint directory (layout, step, model and run config,
    file manifest); an unreadable one is a one-line :class:`CheckpointCorrupt`."""
    return read_meta_file(Path(ckpt_dir))


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# checkpoints verified by this process, keyed by (path, (name, size, mtime_ns) of every file):
# export and consolidation resolve the same directory twice, and a second full read would double
# the cost; any write to a file changes its key, so a file changed since is verified again
_VERIFIED: set[tuple] = set()


def _stat_key(ckpt: Path) -> tuple:
    stats = []
    for p in sorted(ckpt.rglob("*")):
        if p.is_file():
            st = p.stat()
            stats.append((p.relative_to(ckpt).as_posix(), st.st_size, st.st_mtime_ns))
    return (str(ckpt.resolve()), tuple(stats))


def _verify_once(ckpt: Path, report: Callable[[str], None]) -> None:
    """Verify ``ckpt`` (raise :class:`CheckpointCorrupt`), once per process and state of its
    files; say so in one line when it predates manifests."""
    key = _stat_key(ckpt)
    if key in _VERIFIED:
        return
    if not verify_checkpoint(ckpt):
        report(f"checkpoint {ckpt} has no file checksums (written before they were recorded): loading it unverified")
    _VERIFIED.add(key)


def _newest_verifying(root: Path, flag: str, spec: str, *, walk_back: bool,
                      report: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint under ``root`` to load: the one ``latest`` names if it verifies. If it does
    not, with ``walk_back`` the newest older one that verifies (one line per skipped checkpoint),
    without it a one-line error naming the bad file. With ``latest`` missing or dangling, the
    newest complete checkpoint that verifies (said in a line). None when there is no complete
    checkpoint at all."""
    ckpts = complete_checkpoints(root)
    if not ckpts:
        return None
    target, why = _pointer_target(root)
    if target is None:
        candidates = [d for _, d in reversed(ckpts)]
        report(f"{flag} {spec}: {why}; taking the newest complete checkpoint that verifies")
    else:
        top = int(TAG_RE.match(target.name).group(1))
        candidates = [d for s, d in reversed(ckpts) if s <= top]
    for ckpt in candidates:
        try:
            _verify_once(ckpt, report)
            return ckpt
        except CheckpointCorrupt as err:
            if not walk_back:
                raise
            report(f"{flag} {spec}: skipping {ckpt.name}: {err.path.name} {err.reason}")
    raise CheckpointCorrupt(root, f"holds no checkpoint that verifies ({len(candidates)} tried)",
                            "the files were damaged; restore them or start a new run with another run.out_dir")


def resolve_checkpoint(spec: str | Path, *, root: str | Path | None = None,
                       flag: str = "checkpoint", walk_back: bool = False,
                       report: Callable[[str], None] = _say_stderr) -> Optional[Path]:
    """The complete, verified checkpoint directory that ``spec`` names (the one place paths are
    resolved and checked against their manifest before anything loads them).

    ``spec`` is one of:

    * ``"auto"`` -- the checkpoint ``root/latest`` names, or ``None`` when there is none yet
      (a first start and a requeued job run the same command);
    * ``"latest"`` -- the same; an error when there is none;
    * ``<root>/latest`` -- the same for the root it sits in;
    * a checkpoints root -- the checkpoint its ``latest`` names;
    * a ``step_*`` directory -- itself, if complete (has ``meta.json``).

    For the forms naming a root, a missing or dangling ``latest`` falls back to the newest
    complete checkpoint (one line through ``report``), never to a higher step than the pointer
    names otherwise. A checkpoint that fails verification is a one-line
    :class:`CheckpointCorrupt` naming the file; with ``walk_back`` (``--resume`` with a root
    form) the newest older one that verifies is taken instead, each skipped one reported in a
    line. A step directory given explicitly is never replaced by another.

    ``flag`` names the option the user gave it with (``--resume``, ``--checkpoint``), so the
    one-line ``FileNotFoundError`` / ``ValueError`` names both the option and the path.
    """
    if str(spec) in ("auto", "latest"):
        if root is None:
            raise ValueError(f"{flag} {spec} needs the run's checkpoints root: pass <run>/checkpoints/latest "
                             "or a step_* directory instead")
        root = Path(root)
        found = _newest_verifying(root, flag, str(spec), walk_back=walk_back, report=report)
        if found is None and str(spec) == "latest":
            raise FileNotFoundError(f"{flag} latest: no complete checkpoint (with {META}) under {root}: "
                                    "train longer, or use --resume auto to start from step 0")
        return found
    p = Path(spec)
    if p.name == LATEST and not p.is_dir():  # the pointer file, or where it would be
        if not p.parent.is_dir():
            raise FileNotFoundError(f"{flag} {p}: checkpoint root {p.parent} does not exist: "
                                    "pass <run>/checkpoints/<step|latest>")
        found = _newest_verifying(p.parent, flag, str(p), walk_back=walk_back, report=report)
        if found is None:
            raise FileNotFoundError(f"{flag} {p}: no complete checkpoint (with {META}) under {p.parent}: "
                                    "train longer or pass an existing step directory")
        return found
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p} does not exist: pass <run>/checkpoints/<step|latest>")
    if p.is_dir() and (p / META).is_file():
        _verify_once(p, report)
        return p
    found = _newest_verifying(p, flag, str(p), walk_back=walk_back, report=report) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"{flag} {p} is partial or not a checkpoint directory (no {META}): a save was "
            "interrupted, or this is not a checkpoint; pass a complete step_* directory or "
            "<run>/checkpoints/latest"
        )
    return found  # a checkpoints root: the checkpoint its latest names


def resolve_resume_checkpoint(spec: str, root: Path, report: Callable[[str], None]) -> Optional[Path]:
    """:func:`resolve_checkpoint` for ``--resume`` on every rank: rank 0 resolves and verifies
    (walking back for the root forms) and tells the others, so the files are read once and all
    ranks load the same directory; an error on rank 0 is raised, as one line, on every rank."""
    import torch.distributed as dist

    walk_back = not (Path(spec).is_dir() and (Path(spec) / META).is_file())  # an explicit step dir: no substitute
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return resolve_checkpoint(spec, root=root, flag="--resume", walk_back=walk_back, report=report)
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            found = resolve_checkpoint(spec, root=root, flag="--resume", walk_back=walk_back, report=report)
            answer[0] = ("ok", None if found is None else str(found))
        except (ValueError, FileNotFoundError) as err:
            answer[0] = (type(err).__name__, str(err))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "ok":
        return None if value is None else Path(value)
    raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(value)


# layout keys a resume must match (a checkpoint without "cp" predates context parallelism: 1)
RESUME_KEYS = ("world_size", "tp", "pp", "cp", "zero_stage")
_KEY_NAMES = {"world_size": "the number of processes", "tp": "parallel.tensor_parallel_size",
              "pp": "parallel.pipeline_parallel_size", "cp": "parallel.context_parallel_size",
              "zero_stage": "train.zero_stage"}


def check_resume_layout(meta: dict[str, Any], mine: dict[str, Any], ckpt_dir: str | Path) -> None:
    """Refuse (one-line ValueError) to resume a checkpoint written with another parallel layout.

    The DeepSpeed shards are per (TP, PP, DP x CP) rank and the loader/RNG state per rank, so a
    different world size, TP, PP, CP size or ZeRO stage cannot load them. ``cp_scheme`` may
    differ (both schemes are exact and keep no state between steps)."""
    for key in RESUME_KEYS:
        have = meta.get(key, 1 if key == "cp" else None)
        if have != mine[key]:
            raise ValueError(
                f"checkpoint {ckpt_dir} was written with {key}={have} but this run has {key}={mine[key]} "
                f"({_KEY_NAMES[key]}): resume with the same layout, or consolidate the weights with "
                f"`python tools/consolidate.py {ckpt_dir} --out weights.pt` and start a new run from them "
                "(--set train.init_from=weights.pt, a new run.out_dir)"
            )


def params_finite(engine) -> bool:
    """True on every rank iff every rank's (local shard of the) weights is finite."""
    ok = True
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 keeps the local shard there
        if t is not None and t.numel() and not torch.isfinite(t.detach()).all():
            ok = False
            break
    return mdist.all_reduce_max(0.0 if ok else 1.0) == 0.0


class CheckpointWriteError(ValueError):
    """A save that could not be written (full disk, I/O error); its partial directory is removed
    and the previous checkpoint is intact. A ``ValueError`` so that the CLI prints one line."""


# torch's zip writer reports a failed write (e.g. a full disk) as a RuntimeError with these
# texts instead of an OSError with an errno
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "unexpected pos", "basic_ios", "file write failed")
_FULL_DISK_BYTES = 64 << 20  # after a failed write, less free space than this means the disk filled up


def _is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) or (isinstance(err, RuntimeError)
                                        and any(t in str(err) for t in _TORCH_WRITE_FAILURES))


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _write_error_message(err: BaseException, step: int, root: Path, free: Optional[int]) -> str:
    """One line: what failed, where, the free space, and what to do."""
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain) or (
        free is not None and free < _FULL_DISK_BYTES)
    free_txt = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
    if full:
        what = f"no space left on the device of {root} ({free_txt} free)"
        fix = "free space, lower checkpoint.keep_last, or set run.out_dir on a larger disk, then --resume auto"
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = f"writing into {root} failed ({type(err).__name__}: {first}; {free_txt} free)"
        fix = "check the directory's permissions and device, then --resume auto"
    return (f"checkpoint at step {step} not saved: {what}; its partial directory was removed and the "
            f"previous checkpoint is intact: {fix}")


def _release_frames(err: BaseException) -> None:
    """Close the files a failed writer left open. torch.save's zip writer raises from its
    ``__exit__`` before closing its file, so the handle lives on in the traceback's frames (and
    a removed file's blocks stay allocated while it is open): drop the tracebacks of the whole
    chain, then collect the frames' reference cycles."""
    import gc

    seen = 0
    while err is not None and seen < 8:
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
        seen += 1
    gc.collect()


def _remove_if_exists(path: Path) -> None:
    """Remove a partial checkpoint directory, best effort (it may itself fail on a broken disk)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _gather_manifest(tmp: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` manifest of the directory all ranks just wrote. Each rank hashes its share
    of the files (so the cost is divided, not multiplied, by the world size); rank 0 merges and
    hashes anything no other rank covered (e.g. a listing that differed on a shared filesystem)."""
    import torch.distributed as dist

    rels = checkpoint_files(tmp)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return hash_files(tmp, rels)
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = hash_files(tmp, rels[rank::world])
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part)
    if rank == 0:
        merged.update(hash_files(tmp, [r for r in rels if r not in merged]))
    return dict(sorted(merged.items()))


def is_good(meta: dict[str, Any]) -> bool:
    """A checkpoint written with no non-finite streak in progress (its last step was applied)."""
    return int(meta.get("nonfinite_streak", 0)) == 0


class CheckpointManager:
    """Saves and restores training state through a DeepSpeed engine."""

    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint directory.

        ``meta["nonfinite_streak"]`` (the trainer's count of consecutive skipped steps) marks a
        checkpoint written during a non-finite streak; pruning never removes the newest one
        written outside a streak. A write that fails (full disk, I/O error) on any rank removes
        the partial directory and raises a one-line :class:`CheckpointWriteError` on every rank."""
        if not params_finite(engine):
            raise RuntimeError(
                f"refusing to save a checkpoint at step {step}: the weights contain NaN/Inf "
                "(the previous complete checkpoint is kept)"
            )
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        final = self.root / tag
        tmp = self.root / tmp_tag
        if mdist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        mdist.barrier()
        failure: Optional[BaseException] = None
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            torch.save(trainer_state, tmp / f"trainer_state_rank{mdist.rank()}.pt")
        except (OSError, RuntimeError) as err:
            if not _is_write_failure(err):
                raise
            failure = err
        # every rank learns whether any rank failed, so none waits at a barrier for a dead save
        if mdist.all_reduce_max(1.0 if failure is not None else 0.0) > 0:
            self._abandon(tmp, step, failure)
        mdist.barrier()
        files = _gather_manifest(tmp)
        if mdist.rank() == 0:
            record = {**meta, "step": step, "tag": tag, "nonfinite_streak": int(meta.get("nonfinite_streak", 0)),
                      "hash": HASH_NAME, "files": files}
            try:
                # meta.json (with the manifest) last: a directory with it is complete and checkable
                _fsync_write(tmp / META, json.dumps(record, indent=1))
            except OSError as err:
                failure = err
        if mdist.all_reduce_max(1.0 if failure is not None else 0.0) > 0:
            self._abandon(tmp, step, failure)
        if mdist.rank() == 0:
            if final.exists():  # re-saving a step (e.g. a signal right after resuming)
                shutil.rmtree(final)
            os.rename(tmp, final)
            try:
                _fsync_write(self.root / LATEST, tag)
            except OSError as err:
                raise CheckpointWriteError(
                    f"checkpoint {final} is complete but {self.root / LATEST} could not be updated "
                    f"({err.strerror or err}; {(_free_bytes(self.root) or 0) / 2**20:.1f} MiB free): "
                    f"free space, then --resume {final}") from None
            self._prune()
        mdist.barrier()
        return final

    def _abandon(self, tmp: Path, step: int, failure: Optional[BaseException]) -> None:
        """Remove the partial save (after every rank stopped writing) and raise one line."""
        free = _free_bytes(self.root)  # measured before cleanup: what the writer ran into
        if failure is not None:
            _release_frames(failure)
        mdist.barrier()
        if mdist.rank() == 0:
            _remove_if_exists(tmp)
        mdist.barrier()
        if failure is None:  # another rank failed: its message is in that rank's output
            raise CheckpointWriteError(f"checkpoint at step {step} not saved: a write failed on another rank "
                                       f"(see its error); the partial directory {tmp} was removed")
        raise CheckpointWriteError(_write_error_message(failure, step, self.root, free)) from None

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints, and also the newest good one
        (written outside a non-finite streak) so that a run that goes non-finite can always be
        resumed from before the streak; remove debris of killed saves."""
        ckpts = complete_checkpoints(self.root)
        protected = self._newest_good(ckpts)
        for _, d in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            if d != protected:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".tmp-*"):  # debris of saves killed mid-way
            shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _newest_good(ckpts: list[tuple[int, Path]]) -> Optional[Path]:
        for _, d in reversed(ckpts):
            try:
                if is_good(read_meta_file(d)):
                    return d
            except CheckpointCorrupt:
                continue
        return None

    # ---------------------------------------------------------------- load
    def load(self, engine, ckpt_dir: Path) -> dict[str, Any]:
        """Load engine state (model, optimizer, scheduler) and this rank's trainer state."""
        load_path, _ = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir} (files missing?)")
        state_file = ckpt_dir / f"trainer_state_rank{mdist.rank()}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file} is missing: resume with the same number of processes as the run that wrote it"
            )
        return torch.load(state_file, map_location="cpu", weights_only=False)
