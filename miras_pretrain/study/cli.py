"""``miras-pretrain study``: train a list of models on the same data and budget, evaluate and compare them.

    miras-pretrain study --config configs/studies/paper_lm_tiny.yaml [--out DIR] [--parallel N]
        [--quick] [--dry-run] [--slurm --nodes 1 --gpus-per-node 1 --time 2:00:00 ...]

See docs/study.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="train, evaluate and compare several models on one data set and token budget",
        description="Run a study file (configs/studies/NAME.yaml): one training run per model x seed from "
                    "one base config and one token budget, each evaluated (validation loss, optional MQAR "
                    "recall and S-NIAH), collected into OUT/results.json, OUT/results.md and PNG plots. "
                    "Resumable: rerun the same command after an interruption. Exit codes: 0 done, 1 a run "
                    "failed, 2 bad study file or option, 75 stopped by a signal (rerun to continue).")
    p.add_argument("--config", required=True, help="study YAML, or the name of a shipped study (paper_lm_tiny, mqar, "
                                                    "ablations)")
    p.add_argument("--out", default=None, help="output directory (default: runs/studies/<name>, with -quick for --quick)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs trained at once locally, each with CPUs // N torch threads; with --slurm: at most "
                        "this many array tasks at once (1 = no limit there)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: the CPUs this process may use // --parallel)")
    p.add_argument("--quick", action="store_true", help="run the study's quick: variant (smaller budget, fewer runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan, write nothing (with --slurm: prepare the data, write the "
                        "configs and print the batch script); train nothing")
    p.add_argument("--slurm", action="store_true",
                   help="submit the unfinished runs as one SLURM job array (options below as for `launch slurm`)")
    from miras_pretrain.launch.cli import add_job_options

    slurm = p.add_argument_group("SLURM (with --slurm)")
    add_job_options(slurm, slurm, required=False)
    for action in p._actions:  # the study's own defaults for these two
        if action.dest == "job_name":
            action.help = "job name (default: the study's name)"
        elif action.dest == "log_dir":
            action.help = "job and task logs (default: OUT/slurm)"
        elif action.dest in ("nodes", "gpus_per_node", "time"):
            action.help += " (required with --slurm)"
    p.set_defaults(func=run)


def default_out(name: str, quick: bool) -> Path:
    return Path("runs") / "studies" / (f"{name}-quick" if quick else name)


def _print_plan(plan) -> None:
    s = plan.study
    print(f"study {s.name} ({s.task}, {s.budget.tokens:,} tokens per run, seeds {list(s.seeds)}): "
          f"{len(plan.runs)} runs -> {plan.out}")
    for r in plan.runs:
        print(f"  {r.id:24s} {r.parameters:>12,} parameters  {r.max_steps:>6} steps x {r.tokens_per_step:,} tokens  "
              f"config {r.config_path}")


def run(args: argparse.Namespace) -> int:
    from miras_pretrain.study.config import load_study
    from miras_pretrain.study.plan import plan_study
    from miras_pretrain.study.runner import StudyLock, check_out_dir, prepare_data, run_local, say_line

    if args.parallel < 1:
        raise ValueError(f"--parallel {args.parallel} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1")
    study = load_study(args.config, quick=args.quick)
    out = Path(args.out) if args.out else default_out(study.name, args.quick)
    plan = plan_study(study, out)  # every bad key, preset, budget or file fails here, before anything runs
    check_out_dir(plan)
    if args.dry_run and not args.slurm:
        _print_plan(plan)
        return 0
    lock = StudyLock(plan.out).acquire()
    try:
        # with --slurm (--dry-run too) the script names the configs and the launcher checks the data:
        # both must exist on disk first
        # a dry run prints the script on stdout: progress lines go to stderr then
        say = (lambda line: print(f"[study] {line}", file=sys.stderr, flush=True)) if args.dry_run else say_line
        prepare_data(plan, say)
        plan.write()
        if args.slurm:
            from miras_pretrain.study.slurm import submit_array

            return submit_array(plan, args, dry_run=args.dry_run, say=say)
        outcome = run_local(plan, parallel=args.parallel, threads=args.threads)
        return finish(plan, outcome)
    finally:
        lock.release()


def finish(plan, outcome) -> int:
    """Collect what is finished (also after a stop or a failure) and say where everything is."""
    from miras_pretrain.study.collect import summarize, write_results
    from miras_pretrain.study.plots import write_plots
    from miras_pretrain.study.runner import say_line

    rows, results = summarize(plan)
    plots = write_plots(plan, rows, results) if results else {}
    js, md, rows = write_results(plan, plots)
    done = len(results)
    say_line(f"{done}/{len(plan.runs)} runs finished ({len(outcome.skipped)} earlier, {len(outcome.finished)} now"
             f"{', ' + str(len(outcome.failed)) + ' failed' if outcome.failed else ''})")
    for rid, reason in outcome.failed:
        say_line(f"  failed: {rid}: {reason}")
    say_line(f"results: {md} (table), {js} (every run and seed)")
    for name, path in plots.items():
        say_line(f"plot: {path} ({name})")
    say_line(f"runs: {plan.out / 'runs'}/<run>-s<seed> (train.log, metrics.jsonl, checkpoints/, study_result.json); "
             f"configs: {plan.out / 'configs'}")
    if done < len(plan.runs) and not outcome.failed:
        say_line("not finished: rerun the same command to continue")
    sys.stdout.flush()
    return outcome.exit_code
