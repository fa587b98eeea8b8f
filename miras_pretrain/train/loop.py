"""Small pieces of the training loop that need no model: the console, the log window, the time
limit and how a run ended. :class:`~miras_pretrain.train.trainer.Trainer` strings them together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.signals import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so an early or diverged loss cannot overflow."""
    return math.exp(min(loss, 50.0))


class Console:
    """What the main rank shows: a tqdm progress bar (``log.progress_bar``) and one-line messages
    written through it (so they do not tear the bar). Silent on other ranks and when quiet."""

    def __init__(self, bar: Any = None, enabled: bool = True) -> None:
        self._bar = bar
        self._enabled = enabled

    @classmethod
    def open(cls, *, enabled: bool, progress_bar: bool, total: int, initial: int, desc: str) -> "Console":
        """A console for a run of ``total`` steps starting at ``initial``."""
        bar = None
        if enabled and progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, smoothing=0.1)
        return cls(bar, enabled)

    def say(self, message: str) -> None:
        """Print one line (on the main rank, unless quiet)."""
        if not self._enabled:
            return
        (self._bar.write if self._bar is not None else print)(message)

    def advance(self) -> None:
        """One step done."""
        if self._bar is not None:
            self._bar.update(1)

    def show(self, **postfix: str) -> None:
        """The latest numbers next to the bar (redrawn with the next step)."""
        if self._bar is not None:
            self._bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LogWindow:
    """The steps since the last log row: their applied losses and wall time, for the row's mean
    loss and tokens/s. Skipped (non-finite) steps count in the time but not in the loss."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.steps = 0
        self._t0 = self._clock()

    def add(self, loss: Optional[float]) -> None:
        """One optimizer step; ``loss`` is None when the step was skipped."""
        self.steps += 1
        if loss is not None:
            self.losses.append(loss)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * self.steps / max(self._clock() - self._t0, 1e-9)


class TimeLimit:
    """``train.time_limit_minutes`` measured from the loop's start. :meth:`reached` is a
    collective: the ranks' clocks differ slightly, so they agree on it (any rank over = all)."""

    def __init__(self, minutes: Optional[float], clock: Callable[[], float] = time.perf_counter) -> None:
        self.minutes = minutes
        self._limit_s = minutes * 60 if minutes else None
        self._clock = clock
        self._t0 = clock()

    @property
    def enabled(self) -> bool:
        return self._limit_s is not None

    def reached(self) -> bool:
        """Collective when enabled: every rank must call it at the same step."""
        if self._limit_s is None:
            return False
        return mdist.all_reduce_max(1.0 if self._clock() - self._t0 > self._limit_s else 0.0) > 0


@dataclass(frozen=True)
class RunEnd:
    """Why the loop stopped, the process exit code that says it, and the line that told the user.

    ``reason``: ``"done"`` (max_steps), ``"time_limit"`` and ``"signal"`` (checkpoint saved,
    exit :data:`EXIT_REQUEUE` so the scheduler requeues), ``"nonfinite"`` (too many skipped steps).
    """

    exit_code: int = EXIT_OK
    reason: str = "done"
    message: str = ""

    @classmethod
    def time_limit(cls, message: str) -> "RunEnd":
        return cls(EXIT_REQUEUE, "time_limit", message)

    @classmethod
    def signal(cls, message: str) -> "RunEnd":
        return cls(EXIT_REQUEUE, "signal", message)

    @classmethod
    def nonfinite(cls, message: str) -> "RunEnd":
        return cls(EXIT_NONFINITE, "nonfinite", message)

    @property
    def tracker_exit_code(self) -> int:
        """What W&B records: a requeue is a clean stop of this attempt, not a failure."""
        return 0 if self.exit_code in (EXIT_OK, EXIT_REQUEUE) else self.exit_code

    @property
    def plots(self) -> bool:
        """Whether the run got far enough for a loss curve (finished or ran out of time)."""
        return self.reason in ("done", "time_limit")
