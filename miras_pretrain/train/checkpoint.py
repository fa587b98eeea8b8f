"""Atomic, pruned DeepSpeed checkpoints and ``--resume auto``.

Layout under the checkpoint root::

    latest                   text file with the newest complete tag (DeepSpeed's own format,
                             so ``engine.load_checkpoint(root)`` also understands it)
    step_00000100/           DeepSpeed's sharded files (model, ZeRO optimizer partitions,
                             lr scheduler) + trainer_state_rank<R>.pt per rank (step, RNG,
                             data-loader state, counters) + meta.json (written last)
    .tmp-step_00000200/      a save in progress (or a save killed mid-way: ignored, removed)

A save writes everything into ``.tmp-<tag>``, waits for all ranks, then rank 0 writes
``meta.json``, renames the directory to ``<tag>`` and only then replaces ``latest``. A process
killed at any point therefore leaves the previous checkpoint intact and ``latest`` naming a
complete directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from miras_pretrain.train import dist as mdist

TAG_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``[(step, dir)]`` of complete checkpoints (with meta.json), oldest first."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and d.is_dir() and (d / META).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def find_latest(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint directory (highest step with meta.json). ``latest`` is
    not trusted blindly: a kill between the rename and the pointer update leaves it one
    checkpoint behind, and a half-written directory is never named by it anyway."""
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def read_meta(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / META).read_text())


# layout keys a resume must match (a checkpoint without "cp" predates context parallelism: 1)
RESUME_KEYS = ("world_size", "tp", "pp", "cp", "zero_stage")
_KEY_NAMES = {"world_size": "the number of processes", "tp": "train.tensor_parallel",
              "pp": "train.pipeline_parallel", "cp": "parallel.context_parallel_size",
              "zero_stage": "train.zero_stage"}


def check_resume_layout(meta: dict[str, Any], mine: dict[str, Any], ckpt_dir: str | Path) -> None:
    """Refuse (one-line ValueError) to resume a checkpoint written with another parallel layout.

    The DeepSpeed shards are per (TP, PP, DP x CP) rank and the loader/RNG state per rank, so a
    different world size, TP, PP, CP size or ZeRO stage cannot load them. ``cp_scheme`` may
    differ (both schemes are exact and keep no state between steps)."""
    for key in RESUME_KEYS:
        have = meta.get(key, 1 if key == "cp" else None)
        if have != mine[key]:
            raise ValueError(
                f"checkpoint {ckpt_dir} was written with {key}={have} but this run has {key}={mine[key]} "
                f"({_KEY_NAMES[key]}): resume with the same layout, or consolidate the weights with "
                "tools/consolidate.py and start a new run from them"
            )


def params_finite(engine) -> bool:
    """True on every rank iff every rank's (local shard of the) weights is finite."""
    ok = True
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 keeps the local shard there
        if t is not None and t.numel() and not torch.isfinite(t.detach()).all():
            ok = False
            break
    return mdist.all_reduce_max(0.0 if ok else 1.0) == 0.0


class CheckpointManager:
    """Saves and restores training state through a DeepSpeed engine."""

    def __init__(self, root: str | Path, keep_last: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, trainer_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint directory."""
        if not params_finite(engine):
            raise RuntimeError(
                f"refusing to save a checkpoint at step {step}: the weights contain NaN/Inf "
                "(the previous complete checkpoint is kept)"
            )
        tag = tag_for(step)
        tmp_tag = f".tmp-{tag}"
        final = self.root / tag
        tmp = self.root / tmp_tag
        if mdist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        mdist.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        torch.save(trainer_state, tmp / f"trainer_state_rank{mdist.rank()}.pt")
        mdist.barrier()
        if mdist.rank() == 0:
            _fsync_write(tmp / META, json.dumps({**meta, "step": step, "tag": tag}, indent=1))
            if final.exists():  # re-saving a step (e.g. a signal right after resuming)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_write(self.root / LATEST, tag)
            self._prune()
        mdist.barrier()
        return final

    def _prune(self) -> None:
        ckpts = complete_checkpoints(self.root)
        for _, d in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".tmp-*"):  # debris of saves killed mid-way
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, engine, ckpt_dir: Path) -> dict[str, Any]:
        """Load engine state (model, optimizer, scheduler) and this rank's trainer state."""
        load_path, _ = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir} (files missing?)")
        state_file = ckpt_dir / f"trainer_state_rank{mdist.rank()}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file} is missing: resume with the same number of processes as the run that wrote it"
            )
        return torch.load(state_file, map_location="cpu", weights_only=False)
