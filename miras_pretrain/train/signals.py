"""Checkpoint-and-exit on SIGTERM / SIGUSR1 / SIGINT (scheduler preemption, requeue, Ctrl-C).

The handler only sets a flag; the training loop checks it after each optimizer step, agrees
on it across ranks (all-reduce max, since a scheduler may signal ranks at slightly different
times), saves a checkpoint and exits with :data:`EXIT_REQUEUE`. A second SIGINT (Ctrl-C
pressed again) aborts at once with :data:`EXIT_ABORTED`: checkpoints are written atomically, so
the previous one stays intact.

``miras-pretrain train`` installs the flag before its slow imports (torch, deepspeed take
seconds) with :func:`install_early`; the trainer then takes the same flag over with
:meth:`StopFlag.for_run`, so a signal received at any moment of the job is acted on.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any, Optional

# Exit codes of `miras-pretrain train` (documented in docs/training.md)
EXIT_OK = 0
EXIT_USAGE = 2  # bad config / flag / missing file (one-line error)
EXIT_NONFINITE = 3  # aborted after train.max_consecutive_skips non-finite steps in a row
# checkpoint saved after SIGTERM/SIGUSR1/SIGINT: requeue and `--resume auto` (EX_TEMPFAIL of sysexits.h)
EXIT_REQUEUE = 75
# interrupted by Ctrl-C without a checkpoint (the shell's 128 + SIGINT)
EXIT_ABORTED = 128 + signal.SIGINT

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _is_main_rank() -> bool:
    """Rank 0 (or a lone process): the one that tells the user; read from the launcher's env
    because the handler may run before any process group exists."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def launch_is_single_process() -> bool:
    """Whether this job is one process, from the launcher's environment alone (the same rules as
    :func:`miras_pretrain.train.cp.launch_world_size`, which imports torch): torchrun/deepspeed
    set ``WORLD_SIZE``, srun ``SLURM_NTASKS`` with ``SLURM_PROCID``."""
    if "WORLD_SIZE" in os.environ:
        return os.environ["WORLD_SIZE"] == "1"
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return os.environ["SLURM_NTASKS"] == "1"
    return True


def _write_line(line: str) -> None:
    """One line on stderr from a signal handler: ``os.write`` is safe there, whereas print()
    may hit a buffered stream in the middle of a write (reentrant call error)."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError):
        pass  # no usable stderr: the exit code still tells


class StopFlag:
    """Installs handlers for :data:`HANDLED`; ``received`` holds the first signal's number.

    A SIGINT after any signal already received aborts the process at once (exit
    :data:`EXIT_ABORTED`, one line). Forked children (data-loader workers) inherit the handler
    but ignore signals: the main process decides and tears them down.
    """

    def __init__(self, command: str = "train") -> None:
        self.received: Optional[int] = None
        self.command = command
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._release_restores = True

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:  # noqa: ARG002
        if os.getpid() != self._pid:
            return
        if self.received is None:
            self.received = signum
            if signum == signal.SIGINT and _is_main_rank():
                # a user at a terminal needs to know the first Ctrl-C was heard (a step may take long)
                _write_line(f"miras-pretrain {self.command}: SIGINT: saving a checkpoint after the current "
                            f"step, then exiting {EXIT_REQUEUE}; press Ctrl-C again to abort without saving")
        elif signum == signal.SIGINT:
            self._abort()

    def _abort(self) -> None:
        """Exit now, skipping every cleanup that could block (collectives, a save in progress):
        checkpoints are atomic, so the last complete one is untouched and `--resume auto` uses it."""
        try:
            sys.stdout.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: interrupted inside a write
            pass
        if _is_main_rank():
            _write_line(f"miras-pretrain {self.command}: aborted by a second SIGINT without saving; "
                        "the last complete checkpoint is intact")
        os._exit(EXIT_ABORTED)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopFlag":
        for sig in HANDLED:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (e.g. `nohup ... &`): keep it so, as Python does
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @classmethod
    def for_run(cls) -> "StopFlag":
        """The flag of one training run: the one :func:`install_early` installed (a signal it
        already got counts; it stays installed after the run, as the CLI owns it), else a new
        one that :meth:`release` removes again."""
        if _early is not None and _early.installed:
            _early._release_restores = False
            return _early
        return cls().install()

    def release(self) -> None:
        """End of a run: restore the previous handlers unless the CLI owns this flag."""
        if self._release_restores:
            self.restore()


# the process-wide flag of `miras-pretrain train` / `demo`, installed before the slow imports
_early: Optional[StopFlag] = None


def install_early(command: str) -> StopFlag:
    """Install the process-wide stop flag now (idempotent); the trainer takes it over."""
    global _early
    if _early is None or not _early.installed:
        _early = StopFlag(command).install()
    return _early
