"""tools/bench_checkpoint.py runs end to end on a tiny model and writes the JSON its table
comes from (the 170M numbers in docs/benchmarks.md are made with the same script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_checkpoint_tiny_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_checkpoint.py"), "--model", "moneta_tiny",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["model"] == "moneta_tiny" and len(result["rows"]) == 1
    row = result["rows"][0]
    assert row["bytes"] > 0 and row["files"] >= 3
    for key in ("save_s", "hash_s", "verify_s", "load_s", "sha256_s"):
        assert row[key] > 0, key
    assert 0 < row["hash_over_save"] < 1 and row["hash"] in ("xxh3_128", "sha256")


def test_bench_checkpoint_refuses_a_used_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_checkpoint.py"), "--dir", str(tmp_path),
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "already holds checkpoints/" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
