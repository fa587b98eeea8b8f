"""Checkpoint-and-exit on SIGTERM / SIGUSR1 (scheduler preemption and requeue).

The handler only sets a flag; the training loop checks it after each optimizer step, agrees
on it across ranks (all-reduce max, since a scheduler may signal ranks at slightly different
times), saves a checkpoint and exits with :data:`EXIT_REQUEUE`.
"""

from __future__ import annotations

import signal
from typing import Optional

# Exit codes of `miras-pretrain train` (documented in docs/training.md)
EXIT_OK = 0
EXIT_USAGE = 2  # bad config / flag / missing file (one-line error)
EXIT_NONFINITE = 3  # aborted after train.max_consecutive_skips non-finite steps in a row
# checkpoint saved after SIGTERM/SIGUSR1: requeue and `--resume auto` (EX_TEMPFAIL of sysexits.h)
EXIT_REQUEUE = 75

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Installs handlers for :data:`HANDLED`; ``received`` holds the first signal's number."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signum

    def install(self) -> "StopFlag":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
