"""Collect every finished run of a study into ``OUT/results.json`` and ``OUT/results.md``.

Per study run (model), over its seeds: parameters, training tokens, final validation loss and
perplexity as ``mean +/- spread`` (spread = sample standard deviation over seeds; one seed shows
the value alone), training tokens/s (mean of each seed's median), the state a model keeps per
sequence and layer (Miras memory: fixed bytes; attention: key/value cache bytes per token), and
every evaluation metric (MQAR accuracy per length x pairs and its mean, S-NIAH per task x length).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from miras_pretrain.study.evaluate import read_result
from miras_pretrain.study.plan import StudyPlan


def mean_spread(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of the finite values; spread None below two values."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _grid_mean(results: list[dict], key: str) -> dict[str, dict[str, tuple]]:
    """``{outer: {inner: (mean, spread)}}`` over seeds of a nested metric (recall, needle)."""
    out: dict[str, dict[str, tuple]] = {}
    grids = [r[key] for r in results if key in r]
    for outer in (grids[0] if grids else {}):
        for inner in grids[0][outer]:
            out.setdefault(outer, {})[inner] = mean_spread([g[outer][inner] for g in grids
                                                            if inner in g.get(outer, {})])
    return out


def summarize(plan: StudyPlan) -> tuple[list[dict], list[dict]]:
    """(per-run-name summaries in study order, every finished run's result)."""
    results = [res for r in plan.runs if (res := read_result(r)) is not None]
    rows = []
    for spec in plan.study.runs:
        mine = [r for r in results if r["run"] == spec.name]
        if not mine:
            continue
        loss_m, loss_s = mean_spread([r["val_loss"] for r in mine])
        ppl_m, ppl_s = mean_spread([r["val_ppl"] for r in mine])
        tps_m, _ = mean_spread([r["tokens_per_s"] for r in mine if r.get("tokens_per_s")])
        row: dict[str, Any] = {
            "run": spec.name, "seeds": [r["seed"] for r in mine], "parameters": mine[0]["parameters"],
            "tokens": mine[0]["tokens"], "val_loss": loss_m, "val_loss_spread": loss_s,
            "val_ppl": ppl_m, "val_ppl_spread": ppl_s, "tokens_per_s": tps_m, "state": mine[0]["state"],
        }
        if any("recall" in r for r in mine):
            grid = _grid_mean(mine, "recall")
            row["recall"] = {L: {k: v[0] for k, v in ps.items()} for L, ps in grid.items()}
            row["recall_mean"], row["recall_mean_spread"] = mean_spread(
                [statistics.fmean(a for ps in r["recall"].values() for a in ps.values()) for r in mine if "recall" in r])
        if any("needle" in r for r in mine):
            grid = _grid_mean(mine, "needle")
            row["needle"] = {t: {n: v[0] for n, v in ls.items()} for t, ls in grid.items()}
        rows.append(row)
    return rows, results


def fmt_ms(mean: Optional[float], spread: Optional[float], digits: int = 3) -> str:
    """``3.812 +/- 0.021``; ``-`` for no value."""
    if mean is None:
        return "-"
    if spread is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_state(state: dict) -> str:
    """``64.0 KiB`` (fixed), ``1.0 KiB/token`` (KV cache), or both for hybrids."""
    parts = []
    if state.get("bytes_fixed"):
        parts.append(fmt_bytes(state["bytes_fixed"]))
    if state.get("bytes_per_token"):
        parts.append(f"{fmt_bytes(state['bytes_per_token'])}/token")
    return " + ".join(parts) or "0 B"


def markdown(plan: StudyPlan, rows: list[dict], plots: dict[str, Path]) -> str:
    """The study's results as markdown: the main table, then one table per evaluation grid."""
    s = plan.study
    lines = [f"# Study `{s.name}`", ""]
    if s.description:
        lines += [s.description, ""]
    lines += [f"Task `{s.task}`, budget {s.budget.tokens:,} tokens per run, seeds {list(s.seeds)}; "
              f"study file `{s.path}`. Values are mean ± standard deviation over seeds; state = what one "
              "sequence keeps per layer (fp32): Miras memory weights (fixed) or the attention key/value cache "
              "(per token).", ""]
    head = ["run", "parameters", "tokens", "val loss", "val ppl", "tokens/s", "state / layer"]
    has_recall = any("recall" in r for r in rows)
    needle_cols = sorted({(t, n) for r in rows for t, ls in r.get("needle", {}).items() for n in ls},
                         key=lambda x: (x[0], int(x[1])))
    if has_recall:
        head.append("MQAR acc (mean)")
    head += [f"{t} @{n}" for t, n in needle_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['run']}`", f"{r['parameters']:,}", f"{r['tokens']:,}",
                 fmt_ms(r["val_loss"], r["val_loss_spread"]), fmt_ms(r["val_ppl"], r["val_ppl_spread"], 2),
                 f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-", fmt_state(r["state"])]
        if has_recall:
            cells.append(fmt_ms(r.get("recall_mean"), r.get("recall_mean_spread")))
        for t, n in needle_cols:
            v = r.get("needle", {}).get(t, {}).get(n)
            cells.append("-" if v is None else f"{v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if has_recall:
        rec = s.evaluation.recall
        lines += ["", f"MQAR accuracy (vocabulary {rec.vocab_size}, {rec.samples} sequences per point, mean over "
                      "seeds) by sequence length x key-value pairs:", ""]
        cols = [(str(L), str(k)) for L in rec.lengths for k in rec.pairs]
        lines += ["| run | " + " | ".join(f"L{L} / {k} pairs" for L, k in cols) + " |", "|" + "---|" * (len(cols) + 1)]
        for r in rows:
            g = r.get("recall", {})
            lines.append(f"| `{r['run']}` | " + " | ".join(
                "-" if g.get(L, {}).get(k) is None else f"{g[L][k]:.3f}" for L, k in cols) + " |")
    if plots:
        lines += [""] + [f"![{name}]({p.name})" for name, p in plots.items()]
    return "\n".join(lines) + "\n"


def write_results(plan: StudyPlan, plots: Optional[dict[str, Path]] = None) -> tuple[Path, Path, list[dict]]:
    """Write ``results.json`` and ``results.md`` under the study's output; returns their paths and rows."""
    rows, results = summarize(plan)
    plots = plots or {}
    s = plan.study
    doc = {"study": s.name, "description": s.description, "task": s.task, "study_file": s.path,
           "budget_tokens": s.budget.tokens, "seeds": list(s.seeds),
           "planned": [r.id for r in plan.runs], "finished": [r["id"] for r in results],
           "summary": rows, "runs": results, "plots": {k: str(v) for k, v in plots.items()}}
    plan.out.mkdir(parents=True, exist_ok=True)
    js, md = plan.out / "results.json", plan.out / "results.md"
    js.write_text(json.dumps(doc, indent=1))
    md.write_text(markdown(plan, rows, plots))
    return js, md, rows
