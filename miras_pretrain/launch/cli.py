"""``miras-pretrain launch slurm``: render the batch script for a training config and submit it.

    miras-pretrain launch slurm --config configs/run.yaml --nodes 4 --gpus-per-node 8 \\
        --time 2-00:00:00 [--partition P] [--account A] [--venv PATH] \\
        [--setup "module load cuda/12.8"] [--nccl-socket-ifname ib0] [--dry-run]

The script (launch/slurm_train.sbatch) runs ``miras-pretrain train --config <abs> --resume auto``
on every node, asks SLURM for SIGUSR1 ``--signal-lead`` seconds before the time limit, requeues
itself after the trainer has saved, and retries a crashing run at most ``--max-retries`` times.
A job with GPUs is refused at submission when the venv it activates has a CPU build of torch
(``--allow-cpu-venv`` overrides). See docs/launch.md and docs/install_gpu.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from miras_pretrain.cli import CLIError


def register(subparsers) -> None:
    launch = subparsers.add_parser("launch", help="launch training on a cluster (SLURM)",
                                   description="Launch training runs on a cluster scheduler.")
    sub = launch.add_subparsers(dest="launcher_kind", metavar="SCHEDULER")
    sub.required = True
    p = sub.add_parser(
        "slurm", help="render and submit a multi-node SLURM batch job",
        description="Render launch/slurm_train.sbatch for a training config and submit it with "
                    "sbatch (or print it with --dry-run). The job requeues itself on SIGUSR1 before "
                    "its time limit and resumes from the last checkpoint (--resume auto).")
    req = p.add_argument_group("required")
    req.add_argument("--config", required=True, help="training YAML (as for `miras-pretrain train`)")
    add_job_options(p, req)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed on to `miras-pretrain train` (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.set_defaults(func=run)


def add_job_options(p, req, *, required: bool = True) -> None:
    """The job's options (resources, signals, retries, environment), shared with ``miras-pretrain
    study --slurm``; ``required=False`` leaves --nodes/--gpus-per-node/--time to the caller's check."""
    req.add_argument("--nodes", required=required, type=int, help="number of nodes")
    req.add_argument("--gpus-per-node", required=required, type=int,
                     help="GPUs per node = trainer processes per node; 0 for CPU nodes (then "
                          "--procs-per-node sets the process count and no GPUs are requested)")
    req.add_argument("--time", required=required, help="time limit per run: MINUTES, HH:MM:SS, D-HH:MM:SS, ...")
    p.add_argument("--partition", help="SLURM partition to submit to (default: the cluster's default partition)")
    p.add_argument("--account", help="SLURM account charged for the job (default: your default account)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="trainer processes per node when --gpus-per-node is 0 (default: 1)")
    p.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun",
                   help="torchrun: one task per node running torchrun (c10d rendezvous); "
                        "srun: one task per process, RANK etc. mapped from SLURM variables")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help="CPUs to request per node (default: whole nodes, --exclusive)")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit at which SLURM sends SIGUSR1")
    p.add_argument("--max-retries", type=int, default=3,
                   help="requeues after a crash before giving up; preemptions do not count")
    p.add_argument("--max-requeues", type=int, default=100,
                   help="stop requeuing once SLURM_RESTART_COUNT reaches this, whatever the cause")
    p.add_argument("--job-name", help="job name (default: run.name from the config)")
    p.add_argument("--log-dir", help="job and rank logs (default: <run.out_dir>/slurm)")
    p.add_argument("--venv", help="virtualenv to activate in the job (default: the one running this command)")
    p.add_argument("--no-venv", action="store_true", help="activate no virtualenv in the job")
    p.add_argument("--allow-cpu-venv", action="store_true",
                   help="submit a job with --gpus-per-node > 0 even though the venv has a CPU build of torch "
                        "(the trainer then stops at start; install the CUDA build with tools/setup_env.sh --gpu)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before the venv is activated, e.g. --setup 'module load "
                        "cuda/12.8' (repeatable, in order; a failing line stops the job)")
    p.add_argument("--nccl-debug", choices=["VERSION", "WARN", "INFO", "TRACE"], default=None,
                   help="NCCL_DEBUG in the job (default: the submitting shell's, else WARN)")
    p.add_argument("--nccl-socket-ifname", default=None, metavar="IFACE",
                   help="NCCL_SOCKET_IFNAME in the job: the network interface(s) NCCL's bootstrap uses, e.g. "
                        "ib0, eth or ^docker,lo (default: NCCL's choice). TORCH_NCCL_ASYNC_ERROR_HANDLING=1 is "
                        "always set unless the submitting shell sets it")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable exported in the job (repeatable)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="--OPT=VALUE",
                   help="extra #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")


def _default_venv() -> Path | None:
    # the interpreter running this command is the one the job should use
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def build_spec(args: argparse.Namespace):
    """Validate the options and the config; return the job spec (no SLURM needed)."""
    from miras_pretrain.launch.render import SlurmJobSpec, validate

    config = Path(args.config)
    if not config.is_file():
        raise FileNotFoundError(f"--config {args.config}: file not found")
    config = config.resolve()
    if args.gpus_per_node > 0 and args.procs_per_node not in (None, args.gpus_per_node):
        raise ValueError(f"--procs-per-node {args.procs_per_node} conflicts with --gpus-per-node "
                         f"{args.gpus_per_node}: with GPUs there is one process per GPU; drop --procs-per-node")
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must be KEY=VALUE (e.g. --set train.lr=3e-4)")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r} must be NAME=VALUE")
        env[key] = value

    # The trainer's own loader validates every key now, at submission, rather than in the job.
    from miras_pretrain.train.config import load_config

    cfg = load_config(config, args.overrides)
    job_name = args.job_name or cfg.run.name
    if args.job_name is None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", job_name):
        raise ValueError(f"run.name {job_name!r} is not usable as a SLURM job name: pass --job-name")
    workdir = Path.cwd()
    log_dir = Path(args.log_dir).resolve() if args.log_dir else (workdir / cfg.out_dir / "slurm").resolve()
    if args.no_venv:
        venv = None
    elif args.venv:
        venv = Path(args.venv).resolve()
    else:
        venv = _default_venv()

    from miras_pretrain.train.signals import EXIT_REQUEUE, EXIT_USAGE

    train_argv = ["-m", "miras_pretrain.cli", "train", "--config", str(config), "--resume", "auto"]
    for item in args.overrides:
        train_argv += ["--set", item]
    spec = SlurmJobSpec(
        job_name=job_name, train_argv=train_argv, nodes=args.nodes, time=args.time, log_dir=log_dir,
        workdir=workdir, gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node if args.procs_per_node is not None else 1,
        launcher=args.launcher, partition=args.partition, account=args.account,
        cpus_per_node=args.cpus_per_node, signal_lead=args.signal_lead, max_retries=args.max_retries,
        max_requeues=args.max_requeues, venv=venv, setup=list(args.setup), nccl_debug=args.nccl_debug,
        nccl_socket_ifname=args.nccl_socket_ifname, extra_sbatch=list(args.sbatch_option), env=env,
        requeue_exit_code=EXIT_REQUEUE, no_retry_exit_codes=(EXIT_USAGE,),
    )
    validate(spec)
    # before anything is queued: the config's files, the global batch, node-local paths
    from miras_pretrain.launch.checks import check_launch

    checked = check_launch(cfg, world_size=spec.nodes * spec.nproc_per_node, workdir=workdir, log_dir=log_dir)
    spec.notes = checked.notes
    return spec


def cpu_venv_problem(spec) -> str | None:
    """One line when a job that asks for GPUs would activate a venv whose torch cannot use them
    (a CPU build, or no torch); None when fine or not checkable (no venv, no GPUs asked)."""
    from miras_pretrain.launch.venv_check import torch_build

    if spec.gpus_per_node <= 0 or spec.venv is None:
        return None
    build = torch_build(spec.venv)
    fix = "install the CUDA build there with `bash tools/setup_env.sh --gpu` (docs/install_gpu.md), pass --venv"
    if build is None:
        return (f"--gpus-per-node {spec.gpus_per_node} but the venv {spec.venv} has no torch: {fix} "
                f"with another venv, or --allow-cpu-venv")
    if not build.gpu:
        return (f"--gpus-per-node {spec.gpus_per_node} but the venv {spec.venv} has torch {build.version}, a CPU "
                f"build: {fix} with a CUDA venv, or --allow-cpu-venv")
    return None


def submit(script: str, spec) -> int:
    """sbatch the script; keep a copy next to the job log; return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise CLIError("sbatch not found on PATH: run this on a SLURM login node, or use --dry-run to print the script")
    spec.log_dir.mkdir(parents=True, exist_ok=True)  # #SBATCH --output must point into an existing dir
    proc = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise CLIError(f"sbatch rejected the job: {msg}")
    job_id = int(proc.stdout.strip().split(";")[0])
    (spec.log_dir / f"{spec.job_name}-{job_id}.sbatch").write_text(script)
    return job_id


def render_and_submit(spec, *, dry_run: bool, allow_cpu_venv: bool) -> int | None:
    """Render ``spec``'s batch script. ``dry_run``: print it (with what submitting would refuse)
    and return None; else refuse a CPU-only venv for a GPU job (CLIError) and submit it, returning
    the job id. The spec's notes (global batch, node-local paths) go to stderr either way."""
    from miras_pretrain.launch.render import render_sbatch

    script = render_sbatch(spec)
    problem = None if allow_cpu_venv else cpu_venv_problem(spec)
    if dry_run:
        if problem:  # printing the script is fine; say what submitting it would refuse
            print(f"warning: submitting would be refused: {problem}", file=sys.stderr)
        for line in spec.notes:
            print(line, file=sys.stderr)
        sys.stdout.write(script)
        return None
    if problem:
        raise CLIError(problem)
    for line in spec.notes:
        print(line, file=sys.stderr)
    return submit(script, spec)


def run(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    job_id = render_and_submit(spec, dry_run=args.dry_run, allow_cpu_venv=args.allow_cpu_venv)
    if job_id is None:
        return 0
    print(f"submitted job {job_id} ({spec.nodes} nodes x {spec.nproc_per_node} processes); "
          f"log: {spec.log_dir / f'{spec.job_name}-{job_id}.out'}")
    return 0
