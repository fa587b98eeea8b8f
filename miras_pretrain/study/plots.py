"""PNG plots of a study (matplotlib, Agg backend: no display needed).

* ``val_loss.png``: validation loss against training tokens, every run and seed (one colour per
  run, one line per seed);
* ``recall_vs_pairs.png`` / ``recall_vs_length.png`` (when the recall evaluation is on): MQAR
  accuracy, mean over seeds, against the number of key-value pairs (one panel per length) and
  against the sequence length (one panel per number of pairs).
"""

from __future__ import annotations

from pathlib import Path

from miras_pretrain.study.plan import StudyPlan


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_loss(results: list[dict], runs: list[str], path: Path, title: str) -> Path | None:
    """Validation loss against tokens for every finished run; None when no run has a curve."""
    curves = [r for r in results if r.get("val_curve")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for r in curves:
        idx = runs.index(r["run"]) if r["run"] in runs else 0
        _, tokens, loss = zip(*r["val_curve"])
        label = r["run"] if r["run"] not in labelled else None
        labelled.add(r["run"])
        # more runs than colours: the second round of colours is dashed
        ax.plot(tokens, loss, marker="o", ms=3, lw=1.2, color=colors[idx % len(colors)],
                ls="-" if idx < len(colors) else "--", label=label, alpha=0.85)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_recall(rows: list[dict], path: Path, *, against: str, title: str) -> Path | None:
    """MQAR accuracy (mean over seeds) against ``"pairs"`` (a panel per length) or ``"length"``
    (a panel per number of pairs); None when no row has recall results."""
    rows = [r for r in rows if r.get("recall")]
    if not rows:
        return None
    plt = _pyplot()
    lengths = sorted({int(L) for r in rows for L in r["recall"]})
    pairs = sorted({int(k) for r in rows for g in r["recall"].values() for k in g})
    panels, xs = (lengths, pairs) if against == "pairs" else (pairs, lengths)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, p in zip(axes[0], panels):
        for idx, r in enumerate(rows):
            ys = []
            for x in xs:
                L, k = (p, x) if against == "pairs" else (x, p)
                ys.append(r["recall"].get(str(L), {}).get(str(k)))
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                # past the colour cycle the line style changes, so no two runs look alike
                ax.plot(*zip(*pts), marker="o", ms=4, color=colors[idx % len(colors)],
                        ls="-" if idx < len(colors) else "--", label=r["run"])
        ax.set_title(f"length {p}" if against == "pairs" else f"{p} pairs", fontsize=10)
        ax.set_xlabel("key-value pairs" if against == "pairs" else "sequence length")
        ax.set_xticks(xs)  # the grid's own values, not fractional ticks
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(plan: StudyPlan, rows: list[dict], results: list[dict]) -> dict[str, Path]:
    """Every plot that has data, as ``{name: path}`` under the study's output directory."""
    names = plan.study.run_names()
    out: dict[str, Path] = {}
    p = plot_val_loss(results, names, plan.out / "val_loss.png", f"{plan.study.name}: validation loss")
    if p:
        out["validation loss against tokens"] = p
    for against in ("pairs", "length"):
        p = plot_recall(rows, plan.out / f"recall_vs_{against}.png", against=against,
                        title=f"{plan.study.name}: MQAR accuracy against {'key-value pairs' if against == 'pairs' else 'sequence length'}")
        if p:
            out[f"recall against {against}"] = p
    return out
