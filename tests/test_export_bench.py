"""tools/bench_generate.py --quick runs, prints its table and writes JSON; the Miras cache has the
same size at every prompt length while the Transformer++ KV cache grows (no timing asserted:
speed targets live in the benchmark, not in tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_generate_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "tools" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["model"], r["prompt"]): r for r in data["rows"]}
    assert set(rows) == {(m, n) for m in ("moneta_tiny", "transformer_tiny") for n in (64, 256)}
    assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert rows[("moneta_tiny", 64)]["cache_mib"] == rows[("moneta_tiny", 256)]["cache_mib"]
    assert rows[("transformer_tiny", 256)]["cache_mib"] > 3 * rows[("transformer_tiny", 64)]["cache_mib"]
    assert "tok/s" in capsys.readouterr().out
