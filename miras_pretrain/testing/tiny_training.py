"""Tiny training runs for tests and benchmarks: a small prepared corpus, a training YAML around
it, and ``miras-pretrain train`` in a child process (one or several ranks) with its metrics read back.

Everything here uses the real pieces (the data package's embedded corpus and loaders, the
model, DeepSpeed); it only picks sizes small enough for a 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

# a tiny model that trains fast on CPU: linear memory (gated delta rule) keeps the op cheap
TINY_MODEL: dict[str, Any] = {
    "vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
    "layer_pattern": "M", "miras": {"preset": "gated_delta"}, "chunk_size": 8, "gate_rank": 8,
    "window": 16,
}


def prepare_tiny_corpus(out_dir: str | Path, *, seq_len: int = 32, vocab_size: int = 512,
                        max_bytes: int = 300_000, layout: str = "packed"):
    """The stdlib corpus cut to ``max_bytes``, a ``vocab_size`` tokenizer, shards of ``seq_len``."""
    from miras_pretrain.data import prepare_embedded_corpus

    return prepare_embedded_corpus(str(out_dir), vocab_size=vocab_size, seq_len=seq_len,
                                   layout=layout, max_bytes=max_bytes, val_fraction=0.1)


def tiny_run_config(out_dir: str | Path, prepared, *, steps: int = 6, micro_batch_size: int = 2,
                    seq_len: int = 32, layout: str = "packed", model: Optional[dict] = None,
                    **sections: dict) -> dict:
    """A training config mapping for a few-step run; ``sections`` update per-section keys
    (e.g. ``train={"zero_stage": 3}``)."""
    cfg: dict[str, Any] = {
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 1234},
        "model": dict(model or TINY_MODEL),
        "data": {"streams": [prepared.root], "tokenizer": prepared.tokenizer_path, "layout": layout,
                 "seq_len": seq_len, "num_workers": 0, "shuffle": True,
                 "cache_dir": str(Path(out_dir) / "data_cache")},
        "train": {"max_steps": steps, "micro_batch_size": micro_batch_size, "lr": 3e-3,
                  "warmup_steps": 2, "zero_stage": 1, "zero3_persistence_threshold": 0},
        "eval": {"interval": 0, "batches": 2, "at_start": False},
        "checkpoint": {"interval": 0, "keep_last": 2},
        "log": {"interval": 1, "progress_bar": False, "wandb": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: str | Path, cfg: dict) -> Path:
    """Write a config mapping (e.g. :func:`tiny_run_config`'s) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def child_env(tmp: str | Path) -> dict[str, str]:
    """Environment for a child training process: one thread, its own TMPDIR (streaming's
    shared-memory and lock files), offline W&B."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp), "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def train_command(config: str | Path, *, nproc: int = 1, extra: Optional[list[str]] = None) -> list[str]:
    """``miras-pretrain train`` as argv: plain for one process, under torchrun for several."""
    base = ["-m", "miras_pretrain.cli", "train", "--config", str(config), *(extra or [])]
    if nproc == 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--no-python", sys.executable, *base]


def run_train(config: str | Path, tmp: str | Path, *, nproc: int = 1, extra: Optional[list[str]] = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a training job to completion in a child process group (killed on timeout)."""
    proc = subprocess.Popen(train_command(config, nproc=nproc, extra=extra), env=child_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"training timed out after {timeout}s:\n{out[-4000:]}")
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (torchrun workers included) if still alive."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def step_losses(out_dir: str | Path, key: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` from metrics.jsonl (the last row wins: a resumed run re-logs steps)."""
    rows = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. torchrun's workers), read from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids
