"""Run a planned study on this machine: one run after another, or N at a time, resumably.

Every run is the real trainer in a subprocess, ``python -m miras_pretrain.cli train --config
OUT/configs/<id>.yaml --resume auto --threads T`` (T = CPUs // N), its output appended to
``OUT/runs/<id>/train.log``. After a run exits 0 this process evaluates it and writes
``OUT/runs/<id>/study_result.json``; that file marks the run finished.

Restarting the same command continues where the study stopped: finished runs are skipped, a run
whose last checkpoint is at ``max_steps`` is only evaluated, and an interrupted run resumes from
its newest checkpoint (``--resume auto``). SIGTERM, SIGUSR1 or Ctrl-C to the study stop it the
trainer's way: each running trainer gets one SIGTERM (checkpoint, exit 75 -- never a second
SIGINT, which would make it abort without saving), no new run starts, and the study exits 75.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from miras_pretrain.study.evaluate import evaluate_run, read_result, trained_step
from miras_pretrain.study.plan import PlannedRun, StudyPlan

EXIT_STOPPED = 75  # as the trainer: stopped by a signal, rerun the same command to resume
Say = Callable[[str], None]


def say_line(line: str) -> None:
    print(f"[study] {line}", flush=True)


def check_out_dir(plan: StudyPlan) -> None:
    """Refuse (one line) to continue a run directory that was started from another config:
    resuming it would mix two experiments. Called before anything is written."""
    for r in plan.runs:
        if not r.config_path.is_file() or not r.out_dir.is_dir() or not any(r.out_dir.iterdir()):
            continue
        import yaml

        old = yaml.safe_load(r.config_path.read_text()) or {}
        diff = _first_difference(old, r.config)
        if diff is not None:
            raise ValueError(f"{r.out_dir} was started with another config ({diff} changed, see {r.config_path}): "
                             f"use another --out for the changed study, or delete {r.out_dir}")


def _first_difference(a, b, prefix: str = "") -> Optional[str]:
    """The first dotted key whose value differs between two nested mappings, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
        return None
    return None if a == b else (prefix or "the config")


def prepare_data(plan: StudyPlan, say: Say = say_line) -> None:
    """Prepare the study's own data (MQAR or the embedded corpus) once; reused when unchanged."""
    if plan.data is None:
        return
    kind, root, kw = plan.data
    t0 = time.perf_counter()
    if kind == "mqar":
        from miras_pretrain.study.config import mqar_prepare_function

        prepared = mqar_prepare_function()(str(root), **kw)
    else:
        from miras_pretrain.data import prepare_embedded_corpus

        prepared = prepare_embedded_corpus(str(root), overwrite=True, **kw)
    splits = prepared.manifest.splits
    sizes = ", ".join(f"{name} {s.num_tokens:,} tokens" for name, s in splits.items())
    say(f"data ({kind}): {'reused' if prepared.reused else 'prepared'} {root} in "
        f"{time.perf_counter() - t0:.1f} s: {sizes}")


class StudyLock:
    """``OUT/.study.lock`` held (flock) while a study process works in OUT: a second one there
    would train the same runs twice. Released by the OS when the process dies."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".study.lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "StudyLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 100).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"another study process (pid {holder}) is working in {self.path.parent}: wait for it "
                             f"or stop it; two would train the same runs") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Running:
    run: PlannedRun
    index: int
    proc: subprocess.Popen
    started: float
    log: object
    signalled: bool = False


@dataclass
class Outcome:
    """How the local run of a study ended."""

    finished: list[str] = field(default_factory=list)  # ids finished by this call
    skipped: list[str] = field(default_factory=list)  # ids finished before it
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    stopped: bool = False

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return EXIT_STOPPED
        return 1 if self.failed else 0


def train_command(run: PlannedRun, threads: int) -> list[str]:
    """The trainer's own command line for one run."""
    return [sys.executable, "-m", "miras_pretrain.cli", "train", "--config", str(run.config_path),
            "--resume", "auto", "--threads", str(threads)]


def threads_per_run(parallel: int) -> int:
    """Torch threads of each of ``parallel`` concurrent runs, decided as for every command
    (:func:`miras_pretrain.threads.decide_threads`): the CPUs // ``parallel``, capped by
    OMP_NUM_THREADS / SLURM_CPUS_PER_TASK, fewer on a machine other programs keep busy."""
    from miras_pretrain.threads import available_cpus, decide_threads, load_average

    env = {**os.environ, "LOCAL_WORLD_SIZE": str(parallel)}  # the runs share the CPUs like local ranks
    return decide_threads(None, env=env, cpus=available_cpus(), load=load_average()).threads


class _Stop:
    """Signal handlers that ask the scheduler loop to stop; restored by :meth:`restore`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "_Stop":
        for sig in self.SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def run_local(plan: StudyPlan, *, parallel: int = 1, threads: Optional[int] = None, say: Say = say_line) -> Outcome:
    """Train and evaluate every unfinished run of ``plan``; see the module docstring."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel} must be >= 1")
    threads = threads or threads_per_run(parallel)
    outcome = Outcome()
    todo: list[tuple[int, PlannedRun]] = []
    total = len(plan.runs)
    for i, r in enumerate(plan.runs, 1):
        if read_result(r) is not None:
            outcome.skipped.append(r.id)
            say(f"run {i}/{total} {r.id}: finished earlier, skipped ({r.result_path})")
        else:
            todo.append((i, r))
    stop = _Stop().install()
    running: list[_Running] = []
    try:
        while (todo or running) and not (stop.received and not running):
            if stop.received:
                for job in running:
                    if not job.signalled and job.proc.poll() is None:
                        job.proc.send_signal(signal.SIGTERM)  # one SIGTERM: checkpoint, exit 75
                        job.signalled = True
                todo.clear()
            while todo and len(running) < parallel and not stop.received:
                i, r = todo.pop(0)
                job = _start(i, total, r, plan, threads, outcome, say)
                if job is not None:
                    running.append(job)
            for job in list(running):
                if job.proc.poll() is None:
                    continue
                running.remove(job)
                job.log.close()
                _finish(job, total, plan, threads, outcome, say, stopping=stop.received is not None)
            time.sleep(0.2)
    finally:
        for job in running:  # an exception in this loop: do not leave trainers behind
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
                job.proc.wait()
        stop.restore()
    if stop.received:
        outcome.stopped = True
        name = signal.Signals(stop.received).name
        say(f"stopped by {name}: {len(outcome.finished)} run(s) finished now, the others keep their checkpoints; "
            f"rerun the same command to continue")
    return outcome


def _start(i: int, total: int, r: PlannedRun, plan: StudyPlan, threads: int, outcome: Outcome,
           say: Say) -> Optional[_Running]:
    """Start run ``r``'s trainer, or evaluate it at once when its training is complete."""
    done_step = trained_step(r)
    if done_step >= r.max_steps:
        say(f"run {i}/{total} {r.id}: trained earlier (step {done_step}), evaluating")
        _evaluate(i, total, r, plan, threads, outcome, say, seconds=None)
        return None
    r.out_dir.mkdir(parents=True, exist_ok=True)
    log = open(r.log_path, "ab")
    how = f"resuming from step {done_step}" if done_step else "starting"
    say(f"run {i}/{total} {r.id}: {how}: {r.max_steps} steps x {r.tokens_per_step:,} tokens, {threads} thread(s); "
        f"log {r.log_path}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(train_command(r, threads), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)
    return _Running(r, i, proc, time.perf_counter(), log)


def _finish(job: _Running, total: int, plan: StudyPlan, threads: int, outcome: Outcome, say: Say,
            stopping: bool) -> None:
    r, rc = job.run, job.proc.returncode
    seconds = time.perf_counter() - job.started
    if rc == 0:
        _evaluate(job.index, total, r, plan, threads, outcome, say, seconds=seconds)
    elif stopping and rc in (EXIT_STOPPED, -signal.SIGTERM):  # -15: signalled before its handler was in place
        say(f"run {job.index}/{total} {r.id}: stopped at step {trained_step(r)} (checkpoint kept; log {r.log_path})")
    else:
        reason = f"trainer exited with {rc}"
        outcome.failed.append((r.id, reason))
        say(f"run {job.index}/{total} {r.id}: FAILED ({reason}); see {r.log_path}")


def _evaluate(i: int, total: int, r: PlannedRun, plan: StudyPlan, threads: int, outcome: Outcome, say: Say,
              seconds: Optional[float]) -> None:
    try:
        res = evaluate_run(plan.study, r, train_seconds=seconds, threads=threads)
    except (ValueError, FileNotFoundError, ImportError) as err:
        outcome.failed.append((r.id, str(err)))
        say(f"run {i}/{total} {r.id}: evaluation FAILED: {err}")
        return
    outcome.finished.append(r.id)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    tps = f", {res['tokens_per_s']:,.0f} tokens/s" if res.get("tokens_per_s") else ""
    extra = ""
    if "recall" in res:
        accs = [a for row in res["recall"].values() for a in row.values()]
        extra = f", recall {sum(accs) / len(accs):.3f} (mean over the grid)"
    say(f"run {i}/{total} {r.id}: done{took}: val loss {res['val_loss']:.4f} (ppl {res['val_ppl']:.2f}){tps}"
        f"{extra}; {r.out_dir}")
