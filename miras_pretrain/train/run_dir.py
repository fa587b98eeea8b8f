"""A run directory belongs to one run: a lock held while training, and no fresh run over an old one.

Two failures this prevents: two trainers writing the same ``out_dir`` (their checkpoints and
metric rows interleave), and a fresh run started into a directory that still holds an earlier
run (its rows are appended to the old ``metrics.jsonl`` under the old W&B id, and its checkpoints
are pruned against the old run's). Both are refused with one line before anything is written;
``--overwrite`` deletes the old run's traces first when a fresh start is really wanted.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

from miras_pretrain.train.checkpoint import LATEST, TAG_RE

LOCK_NAME = ".lock"
# files of the run directory that belong to one run's history (config.yaml and
# deepspeed_config.json are rewritten by every start, so they carry nothing over)
RUN_FILES = ("metrics.jsonl", "wandb_run_id", "loss_curve.png")
WANDB_DIR = "wandb"


class RunDirError(ValueError):
    """A run-directory conflict; a ValueError so the CLI prints it as one line with exit code 2."""


class RunDirLock:
    """An exclusive ``flock`` on ``<out_dir>/.lock``, held from before the first write to the end.

    The kernel drops the lock when the process dies (even by SIGKILL), so a crashed run never
    leaves a stale lock behind; the PID written into the file is only there to name the holder.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirError` naming the directory and the holder's PID."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another trainer ({holder}): wait for it "
                "to finish or stop it, or choose another run.out_dir"
            ) from None
        except OSError as err:
            # some cluster file systems are mounted without flock support: training must still
            # run there, so say that the directory is unguarded instead of refusing
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"warning: cannot lock {self.path} ({err.strerror}): nothing stops a second trainer "
                  "from using this run directory", file=sys.stderr, flush=True)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock). Safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    """``PID <pid> on <host>`` from the lock file, as far as the holder wrote it."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "PID unknown"
    return f"PID {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


def _checkpoint_entries(ckpt_dir: Path) -> list[Path]:
    """What a run wrote under the checkpoint root: ``step_*``, ``.tmp-step_*`` and ``latest``.
    Only these are touched, as ``checkpoint.dir`` may point at a directory holding other files."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if TAG_RE.match(p.name) or p.name.startswith(".tmp-step_") or p.name == LATEST)


def old_run_traces(out_dir: str | Path, ckpt_dir: str | Path) -> list[Path]:
    """The files and directories of an earlier run in this run directory (empty when there is none)."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    found = _checkpoint_entries(ckpt_dir)
    # an empty metrics.jsonl is what a job that failed before its first row leaves: no history
    found += [out_dir / name for name in RUN_FILES
              if (out_dir / name).exists() and not (name == "metrics.jsonl" and _is_empty(out_dir / name))]
    if (out_dir / WANDB_DIR).is_dir():
        found.append(out_dir / WANDB_DIR)
    return found


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def claim_fresh_run(out_dir: str | Path, ckpt_dir: str | Path, *, overwrite: bool) -> list[Path]:
    """For a run started without ``--resume``: refuse (one line) when the directory holds an
    earlier run, or with ``overwrite`` delete that run's traces. Returns what was deleted.

    Call it with the directory's lock held, so a live run's files are never deleted."""
    out_dir = Path(out_dir)
    traces = old_run_traces(out_dir, ckpt_dir)
    if not traces:
        return []
    if not overwrite:
        shown = ", ".join(_short(p, out_dir) for p in traces[:4]) + (", ..." if len(traces) > 4 else "")
        raise RunDirError(
            f"run directory {out_dir} already holds a run ({shown}): continue it with --resume auto, "
            "choose a new run.out_dir, or pass --overwrite to delete that run's checkpoints, metrics, "
            "plot and W&B run and start again"
        )
    for p in traces:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return traces


def _short(path: Path, out_dir: Path) -> str:
    try:
        return str(path.relative_to(out_dir))
    except ValueError:
        return str(path)


def agree_on_error(message: Optional[str]) -> Optional[str]:
    """Rank 0's error message (or None) on every rank, so all ranks stop together with one line.
    Collective when a process group is up; a plain pass-through otherwise."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]
