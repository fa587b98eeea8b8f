"""Bridge to lm-evaluation-harness: run its tasks on an exported model through lm_eval's python
API with its own ``hf`` model class (``trust_remote_code``), fully offline for local tasks
(``--include_path`` with ``dataset_path: json`` task YAMLs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_lm_eval(model_dir: str | Path, tasks: list[str], *, include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None, device: str = "cpu",
                dtype: str = "float32", batch_size: int = 1, log_samples: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the exported directory. Returns its result dict
    (``results`` per task; ``samples`` when ``log_samples``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("--tasks is empty: name at least one lm-eval task")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include_path {include_path} is not a directory of task YAMLs")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: check the name or pass --include_path "
                         "with the task YAMLs")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype},
        tasks=tasks, num_fewshot=num_fewshot, limit=limit, device=device, batch_size=batch_size,
        task_manager=manager, log_samples=log_samples,
    )
    if out is None:  # non-zero ranks of a distributed run
        return {}
    return out


def summarize(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with numeric metrics only (JSON- and table-friendly)."""
    res = {}
    for task, metrics in out.get("results", {}).items():
        res[task] = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return res
