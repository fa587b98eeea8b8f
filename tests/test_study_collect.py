"""Collecting a study without training: per-run results (written here as the evaluation writes
them) -> results.json, the markdown table (mean +/- spread over seeds) and the PNG plots; and
the per-run measurements read from a trainer's metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest

from miras_pretrain.study.collect import fmt_ms, mean_spread, write_results
from miras_pretrain.study.config import load_study
from miras_pretrain.study.evaluate import read_rows, val_curve
from miras_pretrain.study.plan import plan_study
from miras_pretrain.study.plots import write_plots
from miras_pretrain.study.collect import summarize
from test_study_config import GOOD, write_study


def fake_result(run, loss: float, acc: float) -> dict:
    """A result file as evaluate_run writes it."""
    return {"id": run.id, "run": run.run, "seed": run.seed, "parameters": run.parameters,
            "tokens": run.max_steps * run.tokens_per_step, "steps": run.max_steps, "max_steps": run.max_steps,
            "seq_len": run.seq_len, "val_loss": loss, "val_ppl": math.exp(loss), "tokens_per_s": 1000.0 + run.seed,
            "state": run.state, "val_curve": [[8, 8 * run.tokens_per_step, loss + 0.5],
                                              [16, 16 * run.tokens_per_step, loss]],
            "recall": {"32": {"2": acc, "4": acc / 2}, "64": {"2": acc / 3, "4": acc / 4}}}


@pytest.fixture
def finished_plan(tmp_path):
    body = GOOD + "    evaluation: {recall: {vocab_size: 32, lengths: [32, 64], pairs: [2, 4], samples: 4}}\n"
    plan = plan_study(load_study(write_study(tmp_path, body)), tmp_path / "out")
    losses = {"gd-s0": 2.0, "gd-s1": 2.2, "tf-s0": 3.0}  # tf-s1 unfinished
    for r in plan.runs:
        if r.id in losses:
            r.out_dir.mkdir(parents=True)
            r.result_path.write_text(json.dumps(fake_result(r, losses[r.id], 0.9 if r.run == "gd" else 0.3)))
    return plan


def test_results_table_json_and_plots(finished_plan):
    plan = finished_plan
    rows, results = summarize(plan)
    plots = write_plots(plan, rows, results)
    js, md, rows = write_results(plan, plots)
    doc = json.loads(js.read_text())
    assert doc["finished"] == ["gd-s0", "gd-s1", "tf-s0"] and len(doc["planned"]) == 4
    gd = doc["summary"][0]
    assert gd["run"] == "gd" and gd["seeds"] == [0, 1]
    assert gd["val_loss"] == pytest.approx(2.1) and gd["val_loss_spread"] == pytest.approx(math.sqrt(0.02))
    assert gd["recall"]["32"]["2"] == pytest.approx(0.9)
    text = md.read_text()
    assert "| `gd` |" in text and "2.100 ± 0.141" in text, text
    assert "| `tf` |" in text and "| 3.000 |" in text, text  # one seed: the value alone
    assert "L32 / 2 pairs" in text and "0.900" in text
    assert "512 B/token" not in text and "256 B/token" in text  # attention K+V of d 32, fp32
    assert set(plots) == {"validation loss against tokens", "recall against pairs", "recall against length"}
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"]({path.name})" in text


def test_mean_spread_and_format():
    assert mean_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_spread([1.0]) == (1.0, None)
    assert mean_spread([float("nan")]) == (None, None)
    assert fmt_ms(2.0, None) == "2.000" and fmt_ms(None, None) == "-" and fmt_ms(2.0, 0.5, 2) == "2.00 ± 0.50"


def test_val_curve_last_row_of_a_step_wins_and_torn_line(tmp_path):
    """A resumed run re-logs the steps after its checkpoint; a killed one may leave half a line."""
    m = tmp_path / "metrics.jsonl"
    rows = [{"step": 4, "val/loss": 3.0}, {"step": 8, "val/loss": 2.5}, {"step": 6, "train/loss": 9.0},
            {"step": 8, "val/loss": 2.4}]
    m.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 12, "val/lo')
    assert val_curve(read_rows(m), 100) == [(4, 400, 3.0), (8, 800, 2.4)]
