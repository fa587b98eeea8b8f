"""The benchmark script runs (tiny shapes) and writes the JSON the README/report relies on.
It is a smoke test of tools/bench_ops.py, not a timing assertion; it also checks that the bench
compares equal functions (the fla row is refused when it does not compute the exact gated_delta)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from miras_kernels import MirasSpec

ROOT = Path(__file__).resolve().parents[1]


def _bench_ops():
    """tools/bench_ops.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_bench_ops_under_test", ROOT / "tools" / "bench_ops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_ops_quick_writes_expected_rows(tmp_path):
    out = tmp_path / "bench.json"
    # one per read path (affine linear, affine MLP, lq), the lq boundary chunking beside its
    # per-token default, and the exact gated delta rule beside fla's naive chunk reference
    presets = ["gla", "titans", "moneta", "moneta+retention_chunking=boundary", "gated_delta", "fla_gated_delta"]
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ops.py"), "--quick",
           "--presets", ",".join(presets), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    lengths = data["config"]["lengths"]
    assert data["config"]["quick"] is True and len(lengths) == 2
    assert data["config"]["threads"] == 1  # the bench's default: one torch thread
    assert data["config"]["fla_core"] == "0.6.0"
    assert data["refused"] == {}  # the fla row computes the same function, so it was timed
    rows = {(r["preset"], r["T"], r["backend"]) for r in data["rows"]}
    expected = {(p, t, b) for p in presets for t in lengths for b in ("chunked", "recurrent")}
    assert rows == expected
    for r in data["rows"]:
        assert r["time_s"] > 0 and r["peak_mb"] >= 0  # NaN (failed memory probe) fails here
        # the recurrent form at the longest length is extrapolated unless --full-recurrent
        assert r["measured"] == (r["backend"] == "chunked" or r["T"] != lengths[-1])
    assert [s["preset"] for s in data["summary"]] == presets
    pairs = {(c["row"], c["versus"], c["T"]) for c in data["comparisons"]}
    assert pairs == {p + (t,) for t in lengths for p in [("gated_delta", "fla_gated_delta"),
                                                          ("moneta+retention_chunking=boundary", "moneta")]}
    assert all(c["time_ratio"] > 0 and c["cpu_ratio"] > 0 for c in data["comparisons"])
    assert "speedup" in proc.stdout and str(out) in proc.stdout


def test_bench_ops_refuses_to_time_fla_against_a_different_function():
    """check_fla_equal: fla's Gated DeltaNet equals the exact preset, not the Miras-order
    (step at the previous state) or mini-batch variants; the reason names the mismatch."""
    bo = _bench_ops()
    exact = bo.parse_variant("fla_gated_delta")
    assert exact.fla and exact.spec == MirasSpec.preset("gated_delta", chunk_rule="exact", step_at="retained")
    assert bo.check_fla_equal(exact, 1, 2, 8, 16) is None
    for wrong in (dict(step_at="previous"), dict(chunk_rule="minibatch")):
        var = bo.Variant("fla_gated_delta", MirasSpec.preset("gated_delta", **wrong), fla=True)
        reason = bo.check_fla_equal(var, 1, 2, 8, 16)
        assert reason is not None and "not the same function" in reason


def test_bench_ops_variant_parsing():
    bo = _bench_ops()
    var = bo.parse_variant("moneta+retention_chunking=boundary+q=3")
    assert var.spec == MirasSpec.preset("moneta", retention_chunking="boundary", q=3.0) and not var.fla
    # a variant equal to an earlier row's spec is dropped (the exact override of an exact preset)
    labels = [v.label for v in bo.parse_variants(f"gated_delta,{bo.EXACT_GATED_DELTA},gla")]
    preset_is_exact = MirasSpec.preset("gated_delta") == bo.parse_variant(bo.EXACT_GATED_DELTA).spec
    expected = ["gated_delta", "gla"] if preset_is_exact else ["gated_delta", bo.EXACT_GATED_DELTA, "gla"]
    assert labels == expected
    with pytest.raises(ValueError, match=r"unknown preset 'nope' in 'nope\+q=3'"):
        bo.parse_variant("nope+q=3")
    with pytest.raises(ValueError, match=r"override 'speed=1' must be field=value with a MirasSpec field"):
        bo.parse_variant("gla+speed=1")
