"""tools/bench_attention.py runs end to end at a tiny size and writes the JSON its table comes
from; its memory reading sees an allocation made (and freed) inside the measured call."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_reading_sees_a_temporary():
    bench = _tool()

    def work():
        a = torch.empty(4 << 20, dtype=torch.uint8).fill_(1)  # 4 MiB, freed before the end
        del a
        torch.empty(1 << 20, dtype=torch.uint8).fill_(1)

    peak = bench._peak_bytes(work)
    assert 4 << 20 <= peak < 5 << 20, peak


def test_bench_attention_tiny_writes_its_json(tmp_path):
    out = tmp_path / "attn.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_attention.py"), "--seq-lens", "64", "128",
                           "--window", "24", "--tile", "16", "--repeats", "1", "--heads", "2", "--dim", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["seq_len"], r["window"]) for r in rows] == [(64, None), (128, None), (64, 24), (128, 24)]
    for r in rows:
        assert r["dense_s"] > 0 and r["tiled_s"] > 0
        assert r["dense_peak_mib"] > 0 and r["tiled_peak_mib"] > 0
        assert r["max_abs_diff"] < 1e-5  # fp32, the two paths agree
    assert "T" in proc.stdout.splitlines()[0] and "wrote" in proc.stdout


def test_bench_attention_bad_argument_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_attention.py"), "--seq-lens", "100",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seq-lens must be multiples of 16" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
