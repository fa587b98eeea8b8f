"""Metrics sinks on rank 0: ``metrics.jsonl`` in the run directory and a W&B run.

W&B is offline by default: the run is written under ``<out_dir>/wandb/`` and never touches
the network (``wandb sync <dir>`` uploads it later). With ``log.wandb_project`` set and
``WANDB_API_KEY`` in the environment (``log.wandb_mode: auto``, the default) or with
``log.wandb_mode: online`` it streams live. The run id is kept in
``<out_dir>/wandb_run_id`` so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Optional

from miras_pretrain.train.config import RunConfig


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)  # JSON has no NaN/Inf; keep the information as text
        out[k] = v
    return out


class MetricsLogger:
    """Writes metric dicts keyed by optimizer step. A no-op on ranks other than 0."""

    def __init__(self, cfg: RunConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.run = None
        self.path: Optional[Path] = None
        self._file = None
        if not enabled:
            return
        out = cfg.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._file = open(self.path, "a")
        if cfg.log.wandb and cfg.log.wandb_mode != "disabled":
            self.run = self._init_wandb(cfg)

    @staticmethod
    def _init_wandb(cfg: RunConfig):
        import wandb

        out = cfg.out_dir
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = cfg.log.wandb_mode
        if mode == "auto":
            mode = "online" if cfg.log.wandb_project and os.environ.get("WANDB_API_KEY") else "offline"
        return wandb.init(
            project=cfg.log.wandb_project or "miras-pretrain",
            entity=cfg.log.wandb_entity,
            name=cfg.run.name,
            id=run_id,
            resume="allow",
            dir=str(out),
            mode=mode,
            config=cfg.to_dict(),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def wandb_dir(self) -> Optional[str]:
        return getattr(self.run, "dir", None) and str(Path(self.run.dir).parent) if self.run else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = _clean(metrics)
        self._file.write(json.dumps({"step": step, **row}) + "\n")
        self._file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self._file:
            self._file.close()
            self._file = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
