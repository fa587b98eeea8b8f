#!/usr/bin/env python
"""Helpers of tools/gpu_check.sh (kept in Python so the shell script stays a list of steps).

    python tools/gpu_check_env.py env OUT.json            # environment report (also printed)
    python tools/gpu_check_env.py site SITE_DIR           # miras_kernels importable from the checkout
    python tools/gpu_check_env.py summary WORK OUTDIR     # summary.json + summary.md from the steps

``site``: the operator package lives in ``kernels/`` but is imported as ``miras_kernels``
(pyproject's package-dir mapping); a borrowed GPU machine gets no editable install, so this links
``SITE_DIR/miras_kernels`` to the checkout's ``kernels/`` (the working tree as it is, no copy).
``miras_pretrain`` is imported from the checkout itself (the repo root is on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# packages the report looks for: the training stack's optional pieces and the test oracles
OPTIONAL = {"deepspeed": "deepspeed", "megatron-core": "megatron.core", "fla-core": "fla",
            "mosaicml-streaming": "streaming", "einops": "einops", "pytest": "pytest", "pytest-xdist": "xdist"}


def _version(module: str) -> str | None:
    """The installed version of ``module``'s distribution, None when it is not importable. Only
    looks the module up (no import: importing deepspeed or fla pulls in CUDA code)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    from importlib import metadata

    for dist in (module.split(".")[0], module.replace(".", "-"), {"fla": "fla-core", "streaming": "mosaicml-streaming",
                                                                  "megatron.core": "megatron-core",
                                                                  "xdist": "pytest-xdist"}.get(module, module)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "importable (version unknown)"


def env_report() -> dict:
    """Python, torch/CUDA, Triton, the GPU (nvidia-smi) and which optional packages import."""
    rep: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    try:
        import torch

        rep.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            rep.update(gpu=p.name, gpu_capability=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                       gpu_sms=p.multi_processor_count)
    except Exception as err:  # the report must come back even when torch is broken
        rep["torch_error"] = f"{type(err).__name__}: {err}"
    rep["triton"] = _version("triton")
    rep["packages"] = {name: _version(mod) for name, mod in OPTIONAL.items()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        rep["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        rep["nvidia_smi"] = f"unavailable: {err}"
    rep["env"] = {k: os.environ.get(k) for k in ("MIRAS_TEST_DEVICE", "MIRAS_EXACT_FP32", "MIRAS_NAN_EMPTY",
                                                 "TRITON_CACHE_DIR", "PYTHONPATH")}
    return rep


def make_site(site: Path) -> None:
    """Link ``site/miras_kernels`` to the checkout's ``kernels/`` (see module docstring)."""
    site.mkdir(parents=True, exist_ok=True)
    link = site / "miras_kernels"
    if link.is_symlink() or link.exists():
        if link.resolve() == (REPO / "kernels").resolve():
            return
        raise ValueError(f"{link} exists and is not a link to {REPO / 'kernels'}: remove it or pick another GPU_CHECK_SITE")
    link.symlink_to(REPO / "kernels", target_is_directory=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(work: Path, outdir: Path) -> dict:
    """Collect ``work/steps.tsv`` (name, budget, seconds, exit code) and each step's JSON into
    ``outdir/summary.json`` and a markdown table ``outdir/summary.md`` (steps.tsv: one line per
step, tab-separated name, budget in seconds, milliseconds taken, exit code)."""
    steps = []
    tsv = work / "steps.tsv"
    for line in (tsv.read_text().splitlines() if tsv.is_file() else []):
        name, budget, millis, rc = line.split("\t")
        rc, secs = int(rc), int(millis) / 1000
        status = "ok" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else f"FAILED (exit {rc})")
        steps.append({"step": name, "budget_s": int(budget), "seconds": round(secs, 1), "exit": rc, "status": status})
    results = {p.stem: _read_json(p) for p in sorted(work.glob("*.json"))}
    out = {"steps": steps, "results": results, "total_s": round(sum(s["seconds"] for s in steps), 1)}
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "summary.json").write_text(json.dumps(out, indent=1, default=str))
    env = results.get("env") or {}
    lines = ["# GPU check", "",
             f"GPU: {env.get('gpu', '?')} ({env.get('gpu_capability', '?')}), torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda', '?')}), triton {env.get('triton', '?')}, python {env.get('python', '?')}", "",
             "Packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in (env.get("packages") or {}).items()), "",
             "| step | budget s | took s | status |", "|---|---:|---:|---|"]
    lines += [f"| {s['step']} | {s['budget_s']} | {s['seconds']:.0f} | {s['status']} |" for s in steps]
    lines += ["", f"Total {out['total_s']:.0f} s."]
    train = results.get("train")
    if isinstance(train, dict) and "tokens_per_s" in train:
        lines += ["", "## Training steps", "",
                  f"{train['model']} T={train['seq_len']} batch {train['batch']}, engine: {train['engine']}: "
                  f"{train['tokens_per_s']:.0f} tokens/s, MFU {100 * train['mfu']:.1f}%, step {train['step_s']:.3f} s, "
                  f"peak memory {train.get('mem/cuda_max_alloc_gib', float('nan')):.1f} GiB"]
    mlp = results.get("bench_kernels_mlp")
    if isinstance(mlp, dict) and mlp.get("rows"):
        lines += ["", "## MLP kernels (fwd + bwd)", "", "| preset | T | triton ms | chunked ms | tokens/s | status |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in mlp["rows"]:
            f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
            lines.append(f"| {r['preset']} | {r['T']} | {f(r['triton_ms'])} | {f(r['chunked_ms'])} | "
                         f"{f(r['tokens_per_s_triton'], 0)} | {r['triton_status']} |")
    (outdir / "summary.md").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("env", "site", "summary") or (argv[0] == "summary" and len(argv) != 3):
        print("usage: gpu_check_env.py env OUT.json | site SITE_DIR | summary WORK OUTDIR", file=sys.stderr)
        return 2
    if argv[0] == "env":
        rep = env_report()
        Path(argv[1]).write_text(json.dumps(rep, indent=1))
        print(json.dumps(rep, indent=1))
    elif argv[0] == "site":
        make_site(Path(argv[1]))
        print(f"{argv[1]}/miras_kernels -> {REPO / 'kernels'}")
    else:
        out = summary(Path(argv[1]), Path(argv[2]))
        print((Path(argv[2]) / "summary.md").read_text())
        return 0 if all(s["exit"] == 0 for s in out["steps"]) else 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
