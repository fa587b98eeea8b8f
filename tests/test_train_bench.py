"""tools/bench_train.py --quick: runs the real engine on tiny presets and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from miras_pretrain.testing import tiny_training

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_train.py"), "--quick", "--presets", "moneta,transformer",
         "--out", str(out)],
        cwd=REPO, env=tiny_training.child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads(out.read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"moneta_tiny", "transformer_tiny"}
    for r in rows.values():
        assert r["seq_len"] == 64 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["flops_per_token"] > 0 and r["params"] > 0
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
