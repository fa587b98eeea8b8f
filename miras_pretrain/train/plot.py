"""Loss-curve PNG from ``metrics.jsonl`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from miras_pretrain.train.tracking import read_metrics


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Optional[Path]:
    """Train loss (every logged step) and validation loss (every eval) against the step; the
    PNG's path, or None (nothing written) when the metrics hold no finite loss yet, e.g. a run
    stopped before its first step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    # a resumed run re-logs the steps after its checkpoint: the last row of a step wins
    tr_d = {r["step"]: r["train/loss"] for r in rows if isinstance(r.get("train/loss"), float)}
    va_d = {r["step"]: r["val/loss"] for r in rows if isinstance(r.get("val/loss"), float)}
    tr, va = sorted(tr_d.items()), sorted(va_d.items())
    if not tr and not va:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1.2)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
