"""``miras-pretrain train`` and ``miras-pretrain demo`` subcommands."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from miras_pretrain.train.config import load_config

    from miras_pretrain.threads import check_threads

    check_threads(args.threads)
    # --threads is train.threads (the flag wins over the config and its --set)
    overrides = list(args.set) + ([f"train.threads={args.threads}"] if args.threads is not None else [])
    cfg = load_config(args.config, overrides)  # validate before importing torch/deepspeed
    from miras_pretrain.train.trainer import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite, allow_model_change=args.allow_model_change)
    return result.exit_code


def _demo(args: argparse.Namespace) -> int:
    from miras_pretrain.train.demo import run_demo

    return run_demo(out=args.out, minutes=args.minutes, steps=args.steps, corpus_mb=args.corpus_mb,
                    overrides=args.set, threads=args.threads)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="pretrain a model from a training YAML (DeepSpeed ZeRO, TP/PP, checkpoints, W&B)",
        description=(
            "Train with DeepSpeed. Launch with torchrun / the deepspeed launcher / srun for several "
            "processes, or plainly for one. Exit codes: 0 done, 2 bad config/flag, 3 aborted after "
            "too many non-finite steps, 75 checkpoint written after SIGTERM/SIGUSR1 (requeue and "
            "rerun with --resume auto)."
        ),
    )
    p.add_argument("--config", required=True, help="training YAML, e.g. configs/demo_moneta_tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=1e-3")
    p.add_argument("--resume", default=None, metavar="auto|latest|DIR",
                   help="'auto': continue from the newest complete checkpoint (start fresh if none); "
                        "'latest': the same, but an error if there is none; or a checkpoint directory "
                        "(…/checkpoints/step_00000100) (default: start a new run)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in a run.out_dir that holds an earlier run, deleting that run's "
                        "checkpoints, metrics.jsonl, loss curve and W&B run (without it: an error)")
    p.add_argument("--allow-model-change", action="store_true", dest="allow_model_change",
                   help="with --resume: accept model.* fields that differ from the checkpoint's (the weights "
                        "must still fit; a tensor of another shape is an error)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per process (sets train.threads; default: the CPUs this process may "
                        "use / local processes, capped by OMP_NUM_THREADS and SLURM_CPUS_PER_TASK, fewer on "
                        "a busy machine; the choice is printed at start)")
    p.set_defaults(func=_train)

    d = subparsers.add_parser(
        "demo",
        help="end-to-end demo on CPU: corpus -> tokenizer -> tiny Moneta -> val perplexity -> plot",
        description=(
            "Prepare the embedded corpus, train a tokenizer, train a tiny Moneta on CPU for a few "
            "minutes, evaluate validation loss/perplexity and write a checkpoint, an offline W&B "
            "run and a loss-curve PNG under --out."
        ),
    )
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    d.add_argument("--minutes", type=float, default=6.0,
                   help="training time budget in minutes (sets the step count from a timed warm-up)")
    d.add_argument("--steps", type=int, default=None, help="exact number of training steps, overriding --minutes (default: from --minutes)")
    d.add_argument("--corpus-mb", type=float, default=None, dest="corpus_mb",
                   help="cap on the embedded corpus size in MB (default: the demo's choice)")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: as for train: the CPUs / local processes, capped by "
                        "OMP_NUM_THREADS and SLURM_CPUS_PER_TASK, fewer on a busy machine)")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of configs/demo_moneta_tiny.yaml (repeatable)")
    d.set_defaults(func=_demo)
