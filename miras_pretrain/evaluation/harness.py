"""Bridge to lm-evaluation-harness: run its tasks on an exported model through lm_eval's python
API with its own ``hf`` model class (``trust_remote_code``), fully offline for local tasks
(``--include_path`` with ``dataset_path: json`` task YAMLs)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any, Iterator


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
    try:
        with _quiet_git_hash():
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype},
                tasks=tasks, num_fewshot=num_fewshot, limit=limit, device=device, batch_size=batch_size,
                task_manager=manager, log_samples=log_samples,
            )
    except Exception as err:
        if not _is_hub_unreachable(err):
            raise
        detail = " ".join(str(err).split())[:200]
        raise ValueError(
            f"lm-eval task(s) {', '.join(tasks)} need a dataset from the Hugging Face Hub, which cannot be "
            f"reached ({detail}): run once with network access to cache it (HF_HOME), or use a local task "
            f"(--include_path with dataset_path: json; docs/evaluation.md)") from None
    if out is None:  # non-zero ranks of a distributed run
        return {}
    return out


def _is_hub_unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) means the Hub could not be reached: offline mode,
    no network, a dataset missing from the local cache. datasets raises the builtin
    ConnectionError; huggingface_hub and requests raise their own OSError subclasses."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout",
             "ReadTimeout", "MaxRetryError", "NameResolutionError"}
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, ConnectionError) or type(err).__name__ in names:
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


@contextlib.contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe`` of the working directory with the child's stderr on
    the terminal: outside a checkout that prints ``fatal: not a git repository``. Swap in the
    same lookup with stderr captured for the duration of one evaluation."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash

    def quiet() -> str | None:
        try:
            proc = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def summarize(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} with numeric metrics only (JSON- and table-friendly)."""
    res = {}
    for task, metrics in out.get("results", {}).items():
        res[task] = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return res
