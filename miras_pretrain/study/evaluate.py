"""Evaluate one trained run of a study and write its result file (the run's "finished" marker).

Measured from the run directory alone, so a run trained anywhere (locally, a SLURM array task)
is evaluated the same way:

* the validation curve and the final validation loss from ``metrics.jsonl`` (the trainer's own
  evaluation on the held-out split; a resumed run re-logs steps after its checkpoint, the last
  row of a step wins), and the training throughput (median of the logged tokens/s);
* recall: MQAR accuracy of the trained native model on the study's grid of lengths x pairs
  (:func:`miras_pretrain.evaluation.recall.recall_accuracy`);
* needle: S-NIAH accuracy of the exported model (the `eval --synthetic` tasks).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from miras_pretrain.study.config import StudyConfig
from miras_pretrain.study.plan import PlannedRun


def read_rows(metrics: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; a torn last line (the run was killed mid-write) is skipped."""
    rows = []
    if not metrics.is_file():
        return rows
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def val_curve(rows: list[dict], tokens_per_step: int) -> list[tuple[int, int, float]]:
    """``[(step, tokens, val loss)]``, one per evaluated step (the last row of a step wins)."""
    by_step = {r["step"]: r["val/loss"] for r in rows if isinstance(r.get("val/loss"), (int, float))}
    return [(s, s * tokens_per_step, float(v)) for s, v in sorted(by_step.items())]


def trained_step(run: PlannedRun) -> int:
    """The step of the run's newest complete checkpoint (0 when there is none)."""
    from miras_pretrain.train.checkpoint import complete_checkpoints

    ckpts = complete_checkpoints(run.out_dir / "checkpoints") if (run.out_dir / "checkpoints").is_dir() else []
    return max((s for s, _ in ckpts), default=0)


@contextlib.contextmanager
def quiet_fds():
    """Send file descriptors 1 and 2 to /dev/null for the block (child processes included)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)


def load_native_model(run: PlannedRun):
    """The trained model (MirasLM, eval mode, CPU) from the run's newest checkpoint."""
    from miras_pretrain.export.checkpoint import checkpoint_model_config, consolidated_state_dict
    from miras_pretrain.model import build_model
    from miras_pretrain.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint("latest", root=run.out_dir / "checkpoints", flag="study")
    model = build_model(checkpoint_model_config(ckpt))
    # DeepSpeed's consolidation prints several lines per checkpoint (also from a child process):
    # keep the study's output to its progress lines
    with quiet_fds():
        state = consolidated_state_dict(ckpt)
    model.load_state_dict(state)
    return model.eval(), ckpt


def recall_grid(model, rec) -> dict[str, dict[str, float]]:
    """``{"L<length>": {"<pairs>": accuracy}}`` on the study's grid (accuracy in [0, 1])."""
    from miras_pretrain.evaluation.recall import recall_accuracy

    out: dict[str, dict[str, float]] = {}
    for length in rec.lengths:
        row = out.setdefault(str(length), {})
        for pairs in rec.pairs:
            row[str(pairs)] = float(recall_accuracy(model, vocab_size=rec.vocab_size, seq_len=length,
                                                    num_pairs=pairs, n_samples=rec.samples, seed=rec.seed))
    return out


def needle_scores(ckpt: Path, needle) -> dict[str, dict[str, float]]:
    """``{task: {length: accuracy in [0, 1]}}`` of the exported model."""
    from miras_pretrain.evaluation.models import exported_model_dir, load_hf
    from miras_pretrain.evaluation.synthetic import run_needle

    out: dict[str, dict[str, float]] = {}
    with exported_model_dir(ckpt) as path:
        model, tok = load_hf(path)
        for task in needle.tasks:
            out[task] = {str(n): float(run_needle(model, tok, task, n, needle.samples)) for n in needle.lengths}
    return out


def evaluate_run(study: StudyConfig, run: PlannedRun, *, train_seconds: Optional[float] = None,
                 threads: Optional[int] = None) -> dict:
    """Measure a trained run and write ``run.result_path``; returns the result. ``threads``:
    torch threads for the model evaluations (None: leave torch's setting)."""
    import torch

    rows = read_rows(run.out_dir / "metrics.jsonl")
    curve = val_curve(rows, run.tokens_per_step)
    if not curve:
        raise ValueError(f"{run.id}: no validation loss in {run.out_dir / 'metrics.jsonl'}; the run did not "
                         "evaluate (set eval.interval, or check its log)")
    final_step, _, final_loss = curve[-1]
    tps = [r["train/tokens_per_s"] for r in rows
           if isinstance(r.get("train/tokens_per_s"), (int, float)) and r["train/tokens_per_s"] > 0]
    result: dict[str, Any] = {
        "id": run.id, "run": run.run, "seed": run.seed, "parameters": run.parameters,
        "tokens": final_step * run.tokens_per_step, "steps": final_step, "max_steps": run.max_steps,
        "seq_len": run.seq_len, "val_loss": final_loss,
        "val_ppl": math.exp(final_loss) if final_loss < 700 else float("inf"),
        "tokens_per_s": statistics.median(tps) if tps else None,
        "state": run.state, "val_curve": curve, "train_seconds": train_seconds,
        "config": str(run.config_path), "out_dir": str(run.out_dir), "log": str(run.log_path),
    }
    ev = study.evaluation
    if ev.recall is not None or ev.needle is not None:
        if threads:
            torch.set_num_threads(threads)
        model, ckpt = load_native_model(run)
        with torch.no_grad():
            if ev.recall is not None:
                result["recall"] = recall_grid(model, ev.recall)
        del model
        if ev.needle is not None:
            result["needle"] = needle_scores(ckpt, ev.needle)
    tmp = run.result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run.result_path)  # atomic: a half-written marker never counts as finished
    return result


def read_result(run: PlannedRun) -> Optional[dict]:
    """The run's result file, or None when the run is not finished."""
    try:
        return json.loads(run.result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
