"""``miras-pretrain eval``: perplexity, lm-eval tasks and synthetic long-context tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x.strip().lower().replace("k", "")) * (1024 if x.strip().lower().endswith("k") else 1)
                for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of lengths (e.g. 1K,2K,4096)") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be positive")
    return vals


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint or exported model (perplexity, lm-eval, S-NIAH/MQAR)",
    )
    p.add_argument("--model", required=True,
                   help="the model to evaluate: an exported directory (miras-pretrain export hf) or "
                        "<run>/checkpoints/<step|latest> (exported to a temporary directory first)")
    p.add_argument("--tokenizer",
                   help="sentencepiece .model for a checkpoint (default: the run's data.tokenizer)")
    p.add_argument("--perplexity", nargs="+", metavar="DATA_ROOT",
                   help="prepared dataset roots: report the perplexity of --split and how many tokens it scored "
                        "(default: no perplexity)")
    p.add_argument("--split", default="val", help="split scored by --perplexity")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="sequence length for --perplexity; use the training data.seq_len to compare with the "
                        "trainer's validation loss")
    p.add_argument("--max-batches", type=int, default=None,
                   help="score only the first N rows of the split with --perplexity (default: the whole split)")
    p.add_argument("--tasks", type=_str_list,
                   help="lm-eval task names, comma-separated (default: no lm-eval tasks)")
    p.add_argument("--include_path", "--include-path", dest="include_path",
                   help="directory of extra lm-eval task YAMLs; local JSONL tasks work offline, see "
                        "docs/evaluation.md (default: lm-eval's own tasks only)")
    p.add_argument("--num_fewshot", "--num-fewshot", dest="num_fewshot", type=int, default=None,
                   help="few-shot examples per lm-eval prompt (default: each task's own setting)")
    p.add_argument("--limit", type=float, default=None,
                   help="lm-eval: max examples per task, or a fraction < 1 of each task (default: all examples)")
    p.add_argument("--synthetic", type=_str_list,
                   help="built-in long-context tasks, comma-separated: mqar, niah_passkey, niah_number, niah_word "
                        "(default: none)")
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192],
                   help="prompt lengths in tokens for --synthetic (e.g. 1K,2K,4K,8K)")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length for --synthetic")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic prompts and of sampling")
    p.add_argument("--device", default="cpu", help="torch device the model runs on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations dtype of the evaluated model")
    p.add_argument("--out", help="write all results as JSON to this file (default: print only)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the CPUs / local processes, capped by OMP_NUM_THREADS "
                        "and SLURM_CPUS_PER_TASK, fewer on a busy machine)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    import torch

    from miras_pretrain.threads import apply_threads

    from .models import exported_model_dir, load_hf

    if not (args.perplexity or args.tasks or args.synthetic):
        raise ValueError("nothing to evaluate: pass --perplexity, --tasks and/or --synthetic")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} does not exist")
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1 (got {args.seq_len})")
    apply_threads(args.threads)  # after the argument checks; prints the choice once
    results: dict = {"model": str(args.model)}
    with exported_model_dir(args.model, args.tokenizer) as model_dir:
        model, tok = load_hf(model_dir, device=args.device, dtype=args.dtype)
        torch.manual_seed(args.seed)
        if args.perplexity:
            from .perplexity import eval_perplexity

            ppl = eval_perplexity(model, args.perplexity, seq_len=args.seq_len, split=args.split,
                                  max_batches=args.max_batches)
            results["perplexity"] = {"data": args.perplexity, "split": args.split, **ppl.to_dict()}
            scope = ("the whole split" if args.max_batches is None
                     else f"the first {args.max_batches} rows of the split")
            results["perplexity"]["scope"] = scope
            # the trainer's validation line scores eval.batches micro-batches: say how much is scored here
            print(f"perplexity ({args.split}, {ppl.tokens:,} tokens, {scope}, seq_len {args.seq_len}): "
                  f"{ppl.perplexity:.4f}  loss {ppl.loss:.4f}")
        if args.synthetic:
            from .synthetic import format_table, run_synthetic

            syn = run_synthetic(model, tok, args.synthetic, args.lengths, args.samples, args.seed)
            results["synthetic"] = syn
            print("synthetic long-context accuracy (%):")
            print(format_table(syn))
        if args.tasks:
            from .harness import run_lm_eval, summarize

            del model  # lm-eval loads its own copy of the model
            out = run_lm_eval(model_dir, args.tasks, include_path=args.include_path,
                              num_fewshot=args.num_fewshot, limit=args.limit, device=args.device,
                              dtype=args.dtype)
            results["lm_eval"] = summarize(out)
            for task, metrics in results["lm_eval"].items():
                print(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0
