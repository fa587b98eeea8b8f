"""Render the SLURM batch script (the checkout's launch/slurm_train.sbatch) for a training run.

Pure string work, no SLURM needed: :class:`SlurmJobSpec` holds every choice, :func:`validate`
checks it (one-line ``ValueError`` naming the option), :func:`render_sbatch` fills the template.
The design (task per node with torchrun vs task per process, signals, requeue, retries) is
described in the template's header and in docs/launch.md.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

# Package data: pyproject.toml maps the checkout's launch/ folder onto this package, so the same
# file is found in the checkout and in an installed wheel, whatever the working directory.
DEFAULT_TEMPLATE = Path(str(files("miras_pretrain.launch.templates") / "slurm_train.sbatch"))

# `miras-pretrain train` exit codes (miras_pretrain/train/signals.py): 75 = checkpoint saved after
# SIGTERM/SIGUSR1, requeue; 2 = bad config/flag/file, retrying cannot help.
TRAIN_REQUEUE_EXIT_CODE = 75
TRAIN_USAGE_EXIT_CODE = 2

LAUNCHERS = ("torchrun", "srun")
NCCL_DEBUG_LEVELS = ("VERSION", "WARN", "INFO", "TRACE")
# an interface name, a prefix list ("ib,eth"), or NCCL's ^exclude / =exact forms
_IFNAME_RE = re.compile(r"^[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*$")
_TIME_FORMS = "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_PLACEHOLDER_RE = re.compile(r"@([A-Z_]+)@")


def parse_time_limit(text: str) -> int:
    """SLURM ``--time`` string -> seconds; ValueError naming the accepted forms otherwise."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise ValueError(f"--time {text!r} is not a SLURM time limit: use {_TIME_FORMS}")
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"--time {text!r} must be a positive time limit ({_TIME_FORMS})")
    return seconds


@dataclass
class SlurmJobSpec:
    """Everything the batch script needs. Paths should be absolute (the job may start anywhere).

    ``train_argv`` is the python target and its arguments, e.g. ``["-m", "miras_pretrain.cli",
    "train", "--config", "/abs/run.yaml", "--resume", "auto"]``; torchrun runs it as its
    training script, srun mode as ``python <train_argv>``.
    """

    job_name: str
    train_argv: list[str]
    nodes: int
    time: str
    log_dir: Path
    workdir: Path
    gpus_per_node: int = 0
    procs_per_node: int = 1  # used when gpus_per_node == 0 (CPU clusters, tests)
    launcher: str = "torchrun"
    partition: str | None = None
    account: str | None = None
    cpus_per_node: int | None = None  # None: ask for whole nodes (--exclusive)
    signal_lead: int = 300  # seconds before the time limit that SIGUSR1 is sent
    max_retries: int = 3
    max_requeues: int = 100
    venv: Path | None = None
    # shell lines run in the batch shell before the venv is activated ("module load cuda/12.8")
    setup: list[str] = field(default_factory=list)
    nccl_debug: str | None = None  # NCCL_DEBUG for the job (None: inherited, else WARN)
    nccl_socket_ifname: str | None = None  # NCCL_SOCKET_IFNAME (None: NCCL picks an interface)
    extra_sbatch: list[str] = field(default_factory=list)  # verbatim "--qos=high" style options
    env: dict[str, str] = field(default_factory=dict)  # exported in the job, before the step
    requeue_exit_code: int = TRAIN_REQUEUE_EXIT_CODE
    no_retry_exit_codes: tuple[int, ...] = (TRAIN_USAGE_EXIT_CODE,)
    template: Path = DEFAULT_TEMPLATE
    # lines printed before submitting (global batch, node-local path warnings): launch.checks
    notes: list[str] = field(default_factory=list)
    # a job array (`miras-pretrain study --slurm`): array task i appends `--config array_configs[i]`
    # to train_argv; empty = one ordinary job
    array_configs: list[str] = field(default_factory=list)
    array_parallel: int | None = None  # at most this many array tasks at once (sbatch --array=...%N)

    @property
    def nproc_per_node(self) -> int:
        """Trainer processes per node: one per GPU, else ``procs_per_node``."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.procs_per_node

    @property
    def tasks_per_node(self) -> int:
        """SLURM tasks per node: 1 (torchrun spawns the workers) or one per process."""
        return 1 if self.launcher == "torchrun" else self.nproc_per_node

    @property
    def shutdown_timeout(self) -> int:
        """Seconds torchrun gives its workers to save after a signal: nearly the whole lead."""
        return max(10, self.signal_lead - 10)


def validate(spec: SlurmJobSpec) -> None:
    """Raise ValueError with one line naming the bad option and the fix."""
    if not _NAME_RE.match(spec.job_name):
        raise ValueError(f"--job-name {spec.job_name!r}: use letters, digits and . _ + - only")
    if spec.nodes < 1:
        raise ValueError(f"--nodes {spec.nodes} must be >= 1")
    if spec.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {spec.gpus_per_node} must be >= 0 (0 = CPU nodes)")
    if spec.procs_per_node < 1:
        raise ValueError(f"--procs-per-node {spec.procs_per_node} must be >= 1")
    if spec.launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {spec.launcher!r} must be one of {', '.join(LAUNCHERS)}")
    limit = parse_time_limit(spec.time)
    if spec.signal_lead < 1:
        raise ValueError(f"--signal-lead {spec.signal_lead} must be >= 1 second")
    if spec.signal_lead >= limit:
        raise ValueError(f"--signal-lead {spec.signal_lead} s must be shorter than --time {spec.time} "
                         f"({limit} s): lower it or raise the time limit")
    if spec.cpus_per_node is not None:
        if spec.cpus_per_node < spec.tasks_per_node or spec.cpus_per_node % spec.tasks_per_node:
            raise ValueError(f"--cpus-per-node {spec.cpus_per_node} must be a positive multiple of the "
                             f"{spec.tasks_per_node} task(s) per node")
    if spec.max_retries < 0:
        raise ValueError(f"--max-retries {spec.max_retries} must be >= 0")
    if spec.max_requeues < 0:
        raise ValueError(f"--max-requeues {spec.max_requeues} must be >= 0")
    for name, value in (("--partition", spec.partition), ("--account", spec.account)):
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(f"{name} {value!r}: use letters, digits and . _ + - only")
    for opt in spec.extra_sbatch:
        if not opt.startswith("--") or "\n" in opt:
            raise ValueError(f"--sbatch-option {opt!r} must be one long sbatch option such as --qos=high")
    for key in spec.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {key!r} is not a valid environment variable name")
    for line in spec.setup:
        if not line.strip() or "\n" in line or "\r" in line:
            raise ValueError(f"--setup {line!r} must be one non-empty shell line, e.g. --setup 'module load cuda/12.8' "
                             f"(repeat --setup for several)")
    if spec.nccl_debug is not None and spec.nccl_debug not in NCCL_DEBUG_LEVELS:
        raise ValueError(f"--nccl-debug {spec.nccl_debug!r} must be one of {', '.join(NCCL_DEBUG_LEVELS)}")
    if spec.nccl_socket_ifname is not None and not _IFNAME_RE.match(spec.nccl_socket_ifname):
        raise ValueError(f"--nccl-socket-ifname {spec.nccl_socket_ifname!r} is not an interface list: use e.g. "
                         f"ib0, eth or ^docker,lo")
    if spec.venv is not None and not (Path(spec.venv) / "bin" / "activate").is_file():
        raise ValueError(f"--venv {spec.venv}: no bin/activate there; give a virtualenv directory")
    if not Path(spec.template).is_file():
        raise FileNotFoundError(f"batch script template {spec.template} not found (launch/slurm_train.sbatch)")
    if not spec.train_argv:
        raise ValueError("the training command is empty")
    for path in spec.array_configs:
        if not path or "\n" in path:
            raise ValueError(f"job array config {path!r} must be one non-empty path")
    if spec.array_parallel is not None and spec.array_parallel < 1:
        raise ValueError(f"job array: at most {spec.array_parallel} tasks at once must be >= 1")


def sbatch_directives(spec: SlurmJobSpec) -> list[str]:
    """The ``#SBATCH`` lines: resources, logs, requeue and the early warning signal."""
    # an array task's log is named by the array's job id and the task index (%A_%a)
    log = spec.log_dir / f"{spec.job_name}-{'%A_%a' if spec.array_configs else '%j'}.out"
    lines = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
    ]
    if spec.array_configs:
        limit = f"%{spec.array_parallel}" if spec.array_parallel else ""
        lines.append(f"--array=0-{len(spec.array_configs) - 1}{limit}")
    if spec.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_node is not None:
        lines.append(f"--cpus-per-task={spec.cpus_per_node // spec.tasks_per_node}")
    else:
        lines.append("--exclusive")  # whole nodes: the trainer sizes its threads from them
    lines.append(f"--time={spec.time}")
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines += [
        f"--chdir={spec.workdir}",
        f"--output={log}",
        f"--error={log}",
        # requeued runs append to the same job log instead of truncating it
        "--open-mode=append",
        "--requeue",
        # B: = signal the batch shell only; its trap forwards to the step and remembers that
        # the stop was a preemption, which torchrun's own exit status cannot tell.
        f"--signal=B:USR1@{spec.signal_lead}",
    ]
    lines += spec.extra_sbatch
    return [f"#SBATCH {line}" for line in lines]


def launch_env(spec: SlurmJobSpec) -> list[str]:
    """``export`` lines fixed by ``launch slurm`` itself; they win over the submitting shell's.

    ``MIRAS_GPUS_PER_NODE`` tells the trainer how many GPUs the job asked for, so that a job with
    GPUs whose torch cannot use them stops with one line instead of training on the CPU
    (:func:`miras_pretrain.train.dist.choose_device`).
    """
    q = shlex.quote
    lines = [f"export MIRAS_GPUS_PER_NODE={spec.gpus_per_node}"]
    if spec.nccl_debug is not None:
        lines.append(f"export NCCL_DEBUG={q(spec.nccl_debug)}")
    if spec.nccl_socket_ifname is not None:
        lines.append(f"export NCCL_SOCKET_IFNAME={q(spec.nccl_socket_ifname)}")
    return lines


def render_sbatch(spec: SlurmJobSpec) -> str:
    """The complete batch script text for ``spec`` (validated first)."""
    validate(spec)
    q = shlex.quote
    env_lines = "".join(f"export {k}={q(v)}\n" for k, v in spec.env.items())
    values = {
        "SBATCH_DIRECTIVES": "\n".join(sbatch_directives(spec)),
        "LAUNCHER": spec.launcher,
        "PROCS_PER_NODE": str(spec.nproc_per_node),
        "TASKS_PER_NODE": str(spec.tasks_per_node),
        "MAX_RETRIES": str(spec.max_retries),
        "MAX_REQUEUES": str(spec.max_requeues),
        "REQUEUE_EXIT_CODE": str(spec.requeue_exit_code),
        "NO_RETRY_EXIT_CODES": " ".join(str(c) for c in spec.no_retry_exit_codes),
        "SHUTDOWN_TIMEOUT": str(spec.shutdown_timeout),
        "LOG_DIR": q(str(spec.log_dir)),
        "VENV": q(str(spec.venv)) if spec.venv else "''",
        "TRAIN_ARGV": " ".join(q(a) for a in spec.train_argv),
        "ARRAY_CONFIGS": " ".join(q(c) for c in spec.array_configs),
        "EXTRA_ENV": env_lines.rstrip("\n"),
        "LAUNCH_ENV": "\n".join(launch_env(spec)),
        # each line runs in this shell (module load changes PATH/LD_LIBRARY_PATH here); a failing
        # one stops the job with a FATAL line instead of training in the wrong environment
        "SETUP_LINES": "\n".join(f"run_setup {q(line)}" for line in spec.setup) or ":  # none (--setup)",
    }
    text = Path(spec.template).read_text()
    missing = set(_PLACEHOLDER_RE.findall(text)) - set(values)
    if missing:
        raise ValueError(f"template {spec.template} has unknown placeholders: {', '.join(sorted(missing))}")
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)
