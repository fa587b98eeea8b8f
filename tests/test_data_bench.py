"""tools/bench_data.py --quick runs end to end and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_data_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "tools" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out), "--work-dir", str(tmp_path / "w")]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] and res["tokenize"][0]["tokens"] == res["corpus"]["train_tokens"]
    assert {r["layout"] for r in res["loader"]} == {"packed", "documents"}
    assert all(r["tokens_per_s"] > 0 for r in res["loader"] + res["tokenize"])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "target >=" in printed
    assert not list((tmp_path / "w" / "cache").glob("*/loader*"))
