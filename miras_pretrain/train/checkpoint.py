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
    """The ``meta.json`` of a complete checkpoint directory (layout, step, model and run config)."""
    return json.loads((Path(ckpt_dir) / META).read_text())


def resolve_checkpoint(spec: str | Path, *, root: str | Path | None = None,
                       flag: str = "checkpoint") -> Optional[Path]:
    """The complete checkpoint directory that ``spec`` names (the one place paths are resolved).

    ``spec`` is one of:

    * ``"auto"`` -- the newest complete checkpoint under ``root``, or ``None`` when there is
      none yet (a first start and a requeued job run the same command);
    * ``"latest"`` -- the newest complete checkpoint under ``root``; an error when there is none;
    * ``<root>/latest`` -- the same for the root it sits in (the pointer file is not trusted,
      see :func:`find_latest`);
    * a checkpoints root -- its newest complete checkpoint;
    * a ``step_*`` directory -- itself, if complete (has ``meta.json``).

    ``flag`` names the option the user gave it with (``--resume``, ``--checkpoint``), so the
    one-line ``FileNotFoundError`` / ``ValueError`` names both the option and the path.
    """
    if str(spec) in ("auto", "latest"):
        if root is None:
            raise ValueError(f"{flag} {spec} needs the run's checkpoints root: pass <run>/checkpoints/latest "
                             "or a step_* directory instead")
        root = Path(root)
        found = find_latest(root)
        if found is None and str(spec) == "latest":
            raise FileNotFoundError(f"{flag} latest: no complete checkpoint (with {META}) under {root}: "
                                    "train longer, or use --resume auto to start from step 0")
        return found
    p = Path(spec)
    if p.name == LATEST and not p.is_dir():  # the pointer file, or where it would be
        if not p.parent.is_dir():
            raise FileNotFoundError(f"{flag} {p}: checkpoint root {p.parent} does not exist: "
                                    "pass <run>/checkpoints/<step|latest>")
        found = find_latest(p.parent)
        if found is None:
            raise FileNotFoundError(f"{flag} {p}: no complete checkpoint (with {META}) under {p.parent}: "
                                    "train longer or pass an existing step directory")
        return found
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p} does not exist: pass <run>/checkpoints/<step|latest>")
    if p.is_dir() and (p / META).is_file():
        return p
    found = find_latest(p) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"{flag} {p} is partial or not a checkpoint directory (no {META}): a save was "
            "interrupted, or this is not a checkpoint; pass a complete step_* directory or "
            "<run>/checkpoints/latest"
        )
    return found  # a checkpoints root: its newest complete checkpoint


# layout keys a resume must match (a checkpoint without "cp" predates context parallelism: 1)
RESUME_KEYS = ("world_size", "tp", "pp", "cp", "zero_stage")
_KEY_NAMES = {"world_size": "the number of processes", "tp": "parallel.tensor_parallel_size",
              "pp": "parallel.pipeline_parallel_size", "cp": "parallel.context_parallel_size",
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
