"""Per-run cache directories and cleanup of what mosaicml-streaming leaves behind.

streaming keys its shared memory (``/dev/shm/NNNNNN_*``) and file locks
(``$TMPDIR/NNNNNN_*_filelock``) by an integer prefix tied to the ``local`` cache directories, and
refuses a ``local`` directory another live dataset uses. So every loader gets a fresh
``<cache_root>/<job_id>/loader<k>/`` (job_id shared by all ranks of one job, so ranks on one
machine share the cache), and we record our prefix and owner processes in it. On a clean exit
``close()`` removes the segments, locks and directory; after a crash (``kill -9``) the next loader
started on that cache root finds the job directory whose owners are all dead and removes the same
things. ``streaming.base.util.clean_stale_shared_memory()`` is not used: it unlinks every job's
segments, live ones included.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

SHM_NAMES = ["locals", "barrier", "next_epoch", "cache_usage", "shard_states",
             "shard_access_times", "resume", "epoch_shape", "epoch_data"]  # streaming.base.constant
FILELOCK_NAMES = ["barrier_filelock", "cache_filelock"]


def default_cache_root() -> str:
    """``$MIRAS_DATA_CACHE`` or ``<tmp>/miras-data-cache-<uid>``."""
    return os.environ.get("MIRAS_DATA_CACHE") or os.path.join(
        tempfile.gettempdir(), f"miras-data-cache-{os.getuid()}")


def _proc_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of ``pid``, or None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # zombie: dead
        return None
    return fields[19]


def owner_alive(rec: dict) -> bool:
    if rec.get("host") != socket.gethostname():
        return True  # another machine sharing the cache root: not ours to judge
    return _proc_start(int(rec["pid"])) == rec.get("start")


def _locals_ino(prefix: int) -> int | None:
    try:
        return os.stat(f"/dev/shm/{prefix:06}_locals").st_ino
    except OSError:
        return None


def remove_streaming_state(prefix: int, filelock_dir: str, locals_ino: int | None) -> None:
    """Unlink streaming's shared-memory segments and file locks for one prefix -- only while the
    prefix still belongs to the job that recorded it: its ``NNNNNN_locals`` segment must be the
    very one (same inode) it registered. If that segment is gone (Python's resource tracker may
    have unlinked the segments of a killed process) another job may have taken the prefix since,
    so only the file locks, which then block nobody's live state, are removed; a different inode
    means a live job owns the prefix now and nothing is touched."""
    current = _locals_ino(prefix)
    if current is not None and current != locals_ino:
        return
    if current is not None:
        for name in SHM_NAMES:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{prefix:06}_{name}")
    for name in FILELOCK_NAMES:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(filelock_dir, f"{prefix:06}_{name}"))


def clean_stale(root: str) -> list[str]:
    """Remove job dirs under ``root`` whose owner processes (on this host) are all dead,
    with their shared memory and file locks. Returns the removed directories."""
    removed = []
    rootp = Path(root)
    if not rootp.is_dir():
        return removed
    for job in rootp.iterdir():
        if not job.is_dir():
            continue
        owners = []
        for f in job.glob("loader*/owner-*.json"):
            with contextlib.suppress(OSError, ValueError):
                owners.append(json.loads(f.read_text()))
        if not owners or any(owner_alive(o) for o in owners):
            # no owner file yet: a job being set up right now; leave it
            continue
        seen = set()
        for o in owners:
            key = (o.get("prefix"), o.get("filelock_dir"))
            if o.get("prefix") is not None and key not in seen:
                seen.add(key)
                remove_streaming_state(int(o["prefix"]), o["filelock_dir"], o.get("locals_ino"))
        shutil.rmtree(job, ignore_errors=True)
        removed.append(str(job))
    return removed


@contextlib.contextmanager
def machine_lock(root: str):
    """Exclusive flock that serializes streaming's shm-prefix choice between jobs starting at
    once on one machine.

    The lock file lives in ``/dev/shm`` (node-local by definition, like the segments it guards),
    not under ``root``: a cache root on a shared file system would otherwise make the node
    leaders of one multi-node job wait on each other's lock while streaming's construction waits
    on all of them -- a deadlock seen on a 2-node SLURM emulation. ``root`` is the fallback where
    ``/dev/shm`` is missing."""
    Path(root).mkdir(parents=True, exist_ok=True)
    lock_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(root)
    with open(lock_dir / "miras_pretrain_construct.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LoaderCache:
    """The cache directory of one loader in this process, and its owner record."""

    def __init__(self, root: str, job_id: str, index: int):
        self.root = root
        self.job_dir = Path(root, job_id)
        self.dir = self.job_dir / f"loader{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._owner = self.dir / f"owner-{socket.gethostname()}-{os.getpid()}.json"
        self.prefix: int | None = None
        self.locals_ino: int | None = None
        self._write_owner()

    def _write_owner(self) -> None:
        rec = {"pid": os.getpid(), "start": _proc_start(os.getpid()),
               "host": socket.gethostname(), "prefix": self.prefix,
               "locals_ino": self.locals_ino,
               "filelock_dir": tempfile.gettempdir()}
        tmp = self._owner.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self._owner)

    def set_prefix(self, prefix: int) -> None:
        self.prefix = prefix
        self.locals_ino = _locals_ino(prefix)
        self._write_owner()

    def stream_dir(self, i: int) -> str:
        return str(self.dir / f"stream{i}")

    def close(self) -> None:
        """Drop our owner record; the last live owner on this host removes everything."""
        with contextlib.suppress(OSError):
            self._owner.unlink()
        others = []
        for f in self.dir.glob("owner-*.json"):
            with contextlib.suppress(OSError, ValueError):
                others.append(json.loads(f.read_text()))
        if any(owner_alive(o) for o in others):
            return
        if self.prefix is not None:
            remove_streaming_state(self.prefix, tempfile.gettempdir(), self.locals_ino)
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.job_dir.rmdir()  # only when empty (no other loader of this job left)
