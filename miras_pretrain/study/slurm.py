"""Submit a study's unfinished runs as ONE SLURM job array through the launcher.

The batch script is the launcher's own (launch/slurm_train.sbatch, rendered by
:mod:`miras_pretrain.launch.render`) with an array of configs: array task ``i`` runs ``miras-pretrain
train --resume auto --config OUT/configs/<i-th run>.yaml`` with every guarantee of a single job
(preemption signal -> checkpoint -> requeue -> resume, retry limit). The options and checks are
`launch slurm`'s (:func:`miras_pretrain.launch.cli.build_spec`). The array trains; evaluating
and collecting is the same study command run again without ``--slurm`` once the array is done:
it finds every run trained to its last step, evaluates it and writes the results.
"""

from __future__ import annotations

import argparse
import copy

from miras_pretrain.study.evaluate import read_result, trained_step
from miras_pretrain.study.plan import PlannedRun, StudyPlan


def array_runs(plan: StudyPlan) -> list[PlannedRun]:
    """The runs the array must train: not finished and not trained to their last step."""
    return [r for r in plan.runs if read_result(r) is None and trained_step(r) < r.max_steps]


def build_array_spec(plan: StudyPlan, runs: list[PlannedRun], args: argparse.Namespace):
    """The launcher's job spec for ``runs`` as one array (validated, data checked)."""
    from miras_pretrain.launch.cli import build_spec

    missing = [flag for flag, v in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                                    ("--time", args.time)) if v is None]
    if missing:
        raise ValueError(f"--slurm needs {', '.join(missing)} (e.g. --nodes 1 --gpus-per-node 1 --time 2:00:00)")
    ns = copy.copy(args)
    # the launcher validates the first config with the trainer's loader and checks its data; every
    # run of a study shares the data and the batch, and plan_study validated each config already
    ns.config = str(runs[0].config_path)
    ns.overrides = []
    ns.job_name = args.job_name or plan.study.name
    ns.log_dir = args.log_dir or str(plan.out / "slurm")
    spec = build_spec(ns)
    argv = list(spec.train_argv)
    i = argv.index("--config")
    del argv[i:i + 2]  # each array task appends its own --config
    spec.train_argv = argv
    spec.array_configs = [str(r.config_path) for r in runs]
    spec.array_parallel = args.parallel if args.parallel and args.parallel > 1 else None
    return spec


def submit_array(plan: StudyPlan, args: argparse.Namespace, *, dry_run: bool, say) -> int:
    """Render (``dry_run``: print) or submit the array; returns the exit code."""
    from miras_pretrain.launch.cli import render_and_submit

    runs = array_runs(plan)
    if not runs:
        say("every run is trained already: run the same command without --slurm to evaluate and collect them")
        return 0
    spec = build_array_spec(plan, runs, args)
    job_id = render_and_submit(spec, dry_run=dry_run, allow_cpu_venv=args.allow_cpu_venv)
    if job_id is None:
        return 0
    for i, r in enumerate(runs):
        say(f"array task {i}: {r.id} ({r.max_steps} steps; config {r.config_path}; "
            f"log {spec.log_dir / f'{spec.job_name}-{job_id}_{i}.out'})")
    say(f"submitted job array {job_id} ({len(runs)} tasks x {spec.nodes} node(s)); when it has finished, run the "
        f"same study command without --slurm: it evaluates the trained runs (no retraining) and writes "
        f"{plan.out / 'results.md'}")
    return 0
