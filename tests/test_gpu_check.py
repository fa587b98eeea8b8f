"""tools/gpu_check.sh and its helpers, on CPU: the dry run (plan + every file and tool it needs),
the summary it writes, the training-step script on a tiny model, and the NaN-filled fresh buffers
(kernels/common/fresh.py) the GPU test run switches on. The GPU run itself is docs/gpu_check.md's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check_env  # noqa: E402

STEPS = ("env", "install", "tests", "model_step", "bench_kernels", "bench_kernels_mlp", "train")


def _run_sh(script: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120, env=env, **kw)


def test_dry_run_prints_the_plan_and_finds_everything(tmp_path):
    proc = _run_sh(ROOT / "tools" / "gpu_check.sh", str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in STEPS:
        assert f"\n  {step} " in proc.stdout, step
    total = int(proc.stdout.split("total budget ")[1].split("s")[0])
    assert total <= 480, "the check must fit in 8 minutes"
    assert "every file and tool is present" in proc.stdout
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == {"dry_run": True, "missing": False}


def test_dry_run_reports_missing_files(tmp_path):
    """The script alone, outside a checkout: every file it needs is reported missing, exit 1."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "gpu_check.sh", tmp_path / "tools" / "gpu_check.sh")
    proc = _run_sh(tmp_path / "tools" / "gpu_check.sh", str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "missing file: tools/gpu_check_train.py" in proc.stdout
    assert "missing: no test files" in proc.stdout
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["missing"] is True


def test_bad_arguments_exit_2(tmp_path):
    assert _run_sh(ROOT / "tools" / "gpu_check.sh").returncode == 2
    assert _run_sh(ROOT / "tools" / "gpu_check.sh", str(tmp_path), "--fast").returncode == 2


def test_summary_marks_timeouts_and_failures(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "steps.tsv").write_text("env\t25\t1500\t0\ntests\t160\t160000\t124\ntrain\t70\t9000\t1\n")
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "sm_90",
                                               "torch": "2.11.0", "triton": "3.6.0", "packages": {"fla-core": None}}))
    (work / "train.json").write_text(json.dumps({"model": "moneta_340m", "seq_len": 4096, "batch": 2,
                                                 "engine": "plain torch", "tokens_per_s": 12345.0, "mfu": 0.21,
                                                 "step_s": 0.66, "mem/cuda_max_alloc_gib": 30.5}))
    res = gpu_check_env.summary(work, out)
    assert [s["status"] for s in res["steps"]] == ["ok", "TIMEOUT", "FAILED (exit 1)"]
    assert res["steps"][1]["seconds"] == 160.0 and res["total_s"] == 170.5
    md = (out / "summary.md").read_text()
    assert "| tests | 160 | 160 | TIMEOUT |" in md and "fla-core missing" in md
    assert "12345 tokens/s, MFU 21.0%" in md and "engine: plain torch" in md
    assert json.loads((out / "summary.json").read_text())["results"]["env"]["triton"] == "3.6.0"
    assert gpu_check_env.main(["summary", str(work), str(out)]) == 1   # a failed step fails the check


def test_site_links_the_checkout(tmp_path):
    gpu_check_env.make_site(tmp_path / "site")
    gpu_check_env.make_site(tmp_path / "site")   # idempotent
    assert (tmp_path / "site" / "miras_kernels").resolve() == (ROOT / "kernels").resolve()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "miras_kernels").mkdir()
    with pytest.raises(ValueError, match="GPU_CHECK_SITE"):
        gpu_check_env.make_site(tmp_path / "other")


def test_train_script_check_step_and_timing_on_cpu(tmp_path):
    """tools/gpu_check_train.py on a 1-layer tiny model (chunked backend on CPU): the checked step
    passes, and the timing row says which engine ran (plain torch asked for here)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, str(ROOT / "tools" / "gpu_check_train.py"), "--model", "moneta_tiny", "--layers", "1",
            "--seq-len", "16", "--batch", "1", "--device", "cpu"]
    step = subprocess.run(base + ["--check-step", "--out", str(tmp_path / "s.json")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert step.returncode == 0, step.stderr[-2000:]
    row = json.loads((tmp_path / "s.json").read_text())
    assert row["ok"] and row["nonfinite_grads"] == [] and row["loss_rel_diff"] <= row["loss_rtol"]
    timing = subprocess.run(base + ["--steps", "1", "--engine", "torch", "--out", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert timing.returncode == 0, timing.stderr[-2000:]
    row = json.loads((tmp_path / "t.json").read_text())
    assert row["engine"].startswith("plain torch (asked for)") and row["layers"] == 1
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["steps_timed"] == 1
    bad = subprocess.run(base + ["--steps", "0", "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_fresh_buffers_nan_filled_on_request(monkeypatch):
    from miras_kernels.common.fresh import fresh_empty, fresh_empty_like

    monkeypatch.setenv("MIRAS_NAN_EMPTY", "1")
    assert torch.isnan(fresh_empty(3, 4, dtype=torch.float32, device="cpu")).all()
    assert torch.isnan(fresh_empty_like(torch.zeros(2, dtype=torch.bfloat16))).all()
    assert (fresh_empty(5, dtype=torch.int32, device="cpu") == -1).all()
    monkeypatch.setenv("MIRAS_NAN_EMPTY", "0")
    assert fresh_empty(2, 2, dtype=torch.float32, device="cpu").shape == (2, 2)
    monkeypatch.setenv("MIRAS_NAN_EMPTY", "yes")
    with pytest.raises(ValueError, match="MIRAS_NAN_EMPTY"):
        fresh_empty(1, dtype=torch.float32, device="cpu")
