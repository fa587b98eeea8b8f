"""Small pieces of the training loop that need no model: the console, the log window, the time
limit and how a run ended. :class:`~miras_pretrain.train.trainer.Trainer` strings them together.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.signals import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so an early or diverged loss cannot overflow."""
    return math.exp(min(loss, 50.0))


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a batch job's log file or pipe is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``83`` -> ``'0:01:23'``; ``'?'`` while unknown (no step timed yet)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_log_line(step: int, total: int, row: dict[str, float], eta_s: float) -> str:
    """The plain log line of one log step: step, loss, lr, tokens/s, MFU (percent), ETA."""
    return (f"step {step}/{total}  loss {row['train/loss']:.4f}  lr {row['train/lr']:.3e}  "
            f"{row['train/tokens_per_s']:,.0f} tok/s  MFU {100 * row['train/mfu']:.2f}%  "
            f"ETA {format_duration(eta_s)}")


class Console:
    """What the main rank shows. On a terminal: a tqdm progress bar (``log.progress_bar``) with
    loss, lr, tokens/s and MFU next to it, and one-line messages written through it (so they do
    not tear the bar). Otherwise (a batch job's log file or pipe, or the bar turned off): one
    plain line per log step, since a bar there writes ``\r``-joined redraws that a log viewer
    shows as one growing line. Silent on other ranks and when quiet."""

    def __init__(self, bar: Any = None, enabled: bool = True, *, total: int = 0, initial: int = 0,
                 out: Any = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._bar = bar
        self._enabled = enabled
        self._out = out  # None: sys.stdout at the time of writing (pytest's capture swaps it)
        self._total = total
        self._initial = initial
        self._clock = clock
        self._t0 = clock()

    @classmethod
    def open(cls, *, enabled: bool, progress_bar: bool, total: int, initial: int, desc: str,
             stream: Any = None, out: Any = None) -> "Console":
        """A console for a run of ``total`` steps starting at ``initial``. ``stream`` is where a
        bar would draw (tqdm's default, stderr), ``out`` where lines go (default stdout): the bar
        is used only when both are terminals, so that a log file (``train > log``) always gets
        the plain lines."""
        stream = sys.stderr if stream is None else stream
        bar = None
        if enabled and progress_bar and is_terminal(stream) and is_terminal(sys.stdout if out is None else out):
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, smoothing=0.1,
                       file=stream)
        return cls(bar, enabled, total=total, initial=initial, out=out)

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def _print(self, message: str) -> None:
        print(message, file=self._out if self._out is not None else sys.stdout, flush=True)

    def say(self, message: str) -> None:
        """Print one line (on the main rank, unless quiet)."""
        if not self._enabled:
            return
        if self._bar is not None:
            # tqdm.write clears the bar, prints the line to ``out`` and redraws the bar
            self._bar.write(message, file=self._out if self._out is not None else sys.stdout)
        else:
            self._print(message)

    def advance(self) -> None:
        """One step done."""
        if self._bar is not None:
            self._bar.update(1)

    def eta_seconds(self, step: int) -> float:
        """Seconds left to ``total`` at the pace of this job's steps so far (evaluations and
        checkpoints included: they recur); NaN before the first step."""
        done = step - self._initial
        if done <= 0:
            return float("nan")
        return (self._clock() - self._t0) / done * max(0, self._total - step)

    def report(self, step: int, row: dict[str, float]) -> None:
        """A log step's numbers (``train/loss``, ``train/lr``, ``train/tokens_per_s``,
        ``train/mfu``): next to the bar (redrawn with the next step), or as one plain line."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row['train/lr']:.2e}",
                                  tok_s=f"{row['train/tokens_per_s']:.0f}",
                                  mfu=f"{100 * row['train/mfu']:.2f}%", refresh=False)
        else:
            self._print(format_log_line(step, self._total, row, self.eta_seconds(step)))

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
        """Whether the run gets a loss curve: every run that ends through the loop -- finished,
        out of time, stopped by a signal or aborted on non-finite steps (the curve of an
        interrupted or diverged run is the one worth looking at)."""
        return self.reason in ("done", "time_limit", "signal", "nonfinite")

    def headline(self, step: int, max_steps: int) -> str:
        """The summary's first line: how the run ended, at which step, with what exit code."""
        how = {
            "done": "finished",
            "time_limit": "stopped at the time limit; requeue and rerun with --resume auto to continue",
            "signal": "interrupted by a signal; rerun with --resume auto to continue",
            "nonfinite": "aborted after non-finite steps; lower train.lr or resume from the checkpoint",
        }.get(self.reason, self.reason)
        return f"run ended at step {step}/{max_steps} (exit {self.exit_code}): {how}"


def wandb_run_url(run: Any) -> Optional[str]:
    """The URL of an online W&B run; None for an offline (or no) run."""
    if run is None or getattr(run, "offline", True):
        return None
    return getattr(run, "url", None)


def format_run_summary(end: RunEnd, *, step: int, max_steps: int, checkpoint: Optional[Path],
                       wandb_dir: Optional[str], wandb_url: Optional[str], plot: Optional[Path],
                       metrics: Optional[Path], val_history: list[tuple[int, float]]) -> str:
    """Where a run's results are (printed by the trainer at the end of every run; the demo's
    labels): checkpoint, W&B run (URL, or offline directory with its sync command), loss curve,
    metrics, and first -> last validation loss when there was an evaluation."""
    lines = [end.headline(step, max_steps),
             f"    checkpoint:   {checkpoint if checkpoint is not None else 'none written by this job'}"]
    if wandb_url:
        lines.append(f"    W&B:          {wandb_url}")
    elif wandb_dir:
        lines.append(f"    W&B (offline): {wandb_dir}   (upload later: wandb sync {wandb_dir})")
    else:
        lines.append("    W&B:          off (log.wandb)")
    lines.append(f"    loss curve:   {plot if plot is not None else 'none (no logged steps)'}")
    lines.append(f"    metrics:      {metrics if metrics is not None else 'none'}")
    if val_history:
        evals = [f"step {s}: {v:.4f} (ppl {perplexity(v):.1f})" for s, v in (val_history[0], val_history[-1])]
        lines.append(f"    val loss:     {evals[0] if len(val_history) == 1 else ' -> '.join(evals)}")
    return "\n".join(lines)
