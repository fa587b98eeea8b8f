"""How many CPU threads a command's process uses (torch intra-op threads), decided in one place.

Every CPU-heavy command (``train``, ``demo``, ``eval``, ``data prepare``) takes ``--threads N``
(``train`` also ``train.threads`` in its config) and otherwise calls :func:`decide_threads`:

* start from the CPUs this process may run on (``os.sched_getaffinity``: a SLURM task's or a
  container's CPU set, not the whole machine), divided by the processes of this launch that
  share them (``LOCAL_WORLD_SIZE``, set by torchrun and by ``launch slurm``);
* cap by ``OMP_NUM_THREADS`` (threads per process, as OpenMP means it) and by
  ``SLURM_CPUS_PER_TASK`` (a task's CPUs; under torchrun one task holds all local workers, so
  it is divided among them);
* when neither caps it, leave the cores other programs keep busy (the 1-minute load average):
  OpenMP threads spin-wait at every parallel region, and on cores shared with busy processes a
  1-second step became minutes (47-283 tokens/s at load 3-6 on a 2-core machine).

The choice is printed once per process (by the caller's main rank) with the reason, so a slow
run's log says what it used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

# set once the choice was printed in this process (the demo decides, then its trainer applies it)
_announced: Optional[int] = None


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count and the one-phrase reason for it (printed with it)."""

    threads: int
    reason: str

    def line(self, label: str = "threads") -> str:
        """``threads: 2 per process (4 CPUs / 2 local processes)``."""
        return f"{label}: {self.threads} per process ({self.reason}; --threads N to choose)"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _positive_int(env: Mapping[str, str], name: str) -> Optional[int]:
    """``env[name]`` as an integer >= 1; None when unset or not such a number (then it caps nothing,
    as OpenMP and SLURM themselves ignore a malformed value)."""
    raw = env.get(name, "").strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def check_threads(requested: Optional[int], field: str = "--threads") -> None:
    """One-line error for a thread count below 1 (None means automatic)."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f"{field} {requested!r} is not valid: use an integer >= 1, or leave it out for the "
                         "automatic choice (CPUs / local processes, capped by OMP_NUM_THREADS and SLURM_CPUS_PER_TASK)")


def decide_threads(requested: Optional[int] = None, *, env: Mapping[str, str], cpus: int,
                   load: Optional[float] = None, field: str = "--threads") -> ThreadChoice:
    """The thread count of one process (pure: the environment, CPU count and load are inputs).

    ``requested`` (``--threads`` / ``train.threads``) wins. Otherwise ``cpus // local processes``
    (at least 1), capped by ``OMP_NUM_THREADS`` and ``SLURM_CPUS_PER_TASK`` (divided among the
    local workers when torchrun runs them in one task); with neither cap set, the cores that
    the load average says are busy are left out.
    """
    check_threads(requested, field)
    if requested is not None:
        return ThreadChoice(requested, field)
    local = _positive_int(env, "LOCAL_WORLD_SIZE") or 1
    n = max(1, cpus // local)
    parts = [f"{cpus} CPUs" + (f" / {local} local processes" if local > 1 else "")]
    capped = False
    omp = _positive_int(env, "OMP_NUM_THREADS")
    if omp is not None:
        capped = True
        if omp < n:
            n = omp
            parts.append(f"OMP_NUM_THREADS={omp}")
    slurm = _positive_int(env, "SLURM_CPUS_PER_TASK")
    if slurm is not None:
        capped = True
        # torchrun (TORCHELASTIC_RUN_ID) starts all local workers inside one SLURM task
        per = max(1, slurm // local) if env.get("TORCHELASTIC_RUN_ID") else slurm
        if per < n:
            n = per
            parts.append(f"SLURM_CPUS_PER_TASK={slurm}" + (f" / {local}" if per != slurm else ""))
    if not capped and load is not None:
        free = max(1, int(cpus - load + 0.5))  # cores not kept busy by other programs
        if free // local < n:
            n = max(1, free // local)
            parts.append(f"load average {load:.1f}")
    reason = parts[0] + (", capped by " + ", ".join(parts[1:]) if len(parts) > 1 else "")
    return ThreadChoice(n, reason)


def apply_threads(requested: Optional[int] = None, *, announce: bool = True, label: str = "threads",
                  field: str = "--threads", env: Optional[Mapping[str, str]] = None) -> ThreadChoice:
    """Decide for this process (:func:`decide_threads` on ``os.environ``), set torch's thread
    count, and print the choice once per process when ``announce`` (callers pass their main rank)."""
    global _announced
    import torch

    choice = decide_threads(requested, env=os.environ if env is None else env, cpus=available_cpus(),
                            load=load_average(), field=field)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if announce and _announced != choice.threads:
        print(choice.line(label), flush=True)
        _announced = choice.threads
    return choice
