"""The benchmark script runs (tiny shapes) and writes the JSON the README/report relies on.
It is a smoke test of tools/bench_ops.py, not a timing assertion."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from miras_kernels import MirasSpec

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ops_quick_writes_expected_rows(tmp_path):
    out = tmp_path / "bench.json"
    presets = ["gla", "titans", "moneta"]  # one per read path (affine linear, affine MLP, lq); keeps it quick
    cmd = [sys.executable, str(ROOT / "tools" / "bench_ops.py"), "--quick", "--threads", "1",
           "--presets", ",".join(presets), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    lengths = data["config"]["lengths"]
    assert data["config"]["quick"] is True and len(lengths) == 2
    rows = {(r["preset"], r["T"], r["backend"]) for r in data["rows"]}
    expected = {(p, t, b) for p in presets for t in lengths for b in ("chunked", "recurrent")}
    assert rows == expected
    for r in data["rows"]:
        assert r["time_s"] > 0 and r["peak_mb"] >= 0  # NaN (failed memory probe) fails here
        # the recurrent form at the longest length is extrapolated unless --full-recurrent
        assert r["measured"] == (r["backend"] == "chunked" or r["T"] != lengths[-1])
    assert [s["preset"] for s in data["summary"]] == presets
    assert all(p in MirasSpec.PRESETS for p in presets)
    assert "speedup" in proc.stdout and str(out) in proc.stdout
