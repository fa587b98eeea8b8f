#!/usr/bin/env python3
"""Say which torch build the venv has and whether it can use a GPU here; the last step of
tools/setup_env.sh, and the check to run on a compute node (docs/install_gpu.md):

    .venv/bin/python tools/check_torch_build.py [--mode cpu|gpu]

One line, exit 0 when the install is fine for its mode:
  * "CPU build"                                        (CPU mode: this machine, CI)
  * "CUDA build, N GPU(s) visible"                     (GPU mode on a GPU node)
  * "CUDA build, no GPU visible here (login node): fine"  (GPU mode on a node without GPUs)
and exit 1 with the cause and the fix when it is not (a CPU build after --gpu, or a GPU that
nvidia-smi lists but torch cannot use: a driver too old for the wheel's CUDA).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass

# Oldest Linux driver per CUDA major version (NVIDIA's CUDA release notes: 13.x needs R580, 12.x
# runs on >= 525.60 through minor-version compatibility). Only used to word the hint.
MIN_DRIVER = {13: 580, 12: 525}
OLDER_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    line: str


def driver_major(text: str | None) -> int | None:
    """``"570.86.15"`` -> 570; None for a missing or unreadable version."""
    try:
        return int(str(text).strip().split(".")[0])
    except (ValueError, AttributeError):
        return None


def verdict(*, mode: str, torch_version: str, cuda_version: str | None, cuda_available: bool,
            gpu_names: list[str], nvidia_smi_gpus: int, driver: str | None) -> Verdict:
    """Judge an install from plain facts (so every branch is testable without a GPU).

    ``cuda_version`` is ``torch.version.cuda`` (None for a CPU build); ``nvidia_smi_gpus`` the
    GPUs ``nvidia-smi -L`` lists (0 when it is missing or fails); ``driver`` its driver version.
    """
    if mode not in ("cpu", "gpu"):
        raise ValueError(f"--mode {mode!r} must be cpu or gpu")
    if cuda_version is None:
        if mode == "gpu":
            return Verdict(False, f"torch {torch_version} is a CPU build although GPU mode was asked: remove .venv "
                                  f"and rerun `bash tools/setup_env.sh --gpu` (the pins in constraints-gpu.txt "
                                  f"refuse +cpu; a CPU-only platform, e.g. macOS, has no CUDA build)")
        return Verdict(True, f"torch {torch_version}: CPU build (CPU mode; `tools/setup_env.sh --gpu` installs "
                             f"the CUDA build)")
    if cuda_available and gpu_names:
        return Verdict(True, f"torch {torch_version}: CUDA build (CUDA {cuda_version}), {len(gpu_names)} GPU(s) "
                             f"visible: {', '.join(sorted(set(gpu_names)))}")
    if nvidia_smi_gpus > 0:
        need = MIN_DRIVER.get(driver_major(cuda_version) or 0)
        have = driver_major(driver)
        if need is not None and have is not None and have < need:
            cause = f"driver {driver} is older than CUDA {cuda_version} needs (>= {need})"
        else:
            cause = f"torch.cuda.is_available() is False (driver {driver or 'unknown'}; CUDA_VISIBLE_DEVICES?)"
        return Verdict(False, f"torch {torch_version} (CUDA {cuda_version}) cannot use the {nvidia_smi_gpus} GPU(s) "
                              f"nvidia-smi lists: {cause}; fix: update the driver, or install a build for an older "
                              f"CUDA: bash tools/setup_env.sh --gpu --cuda-index {OLDER_CUDA_INDEX}")
    return Verdict(True, f"torch {torch_version}: CUDA build (CUDA {cuda_version}), no GPU visible here (login "
                         f"node): fine; check a GPU node with `srun --gpus=1 .venv/bin/python "
                         f"tools/check_torch_build.py --mode gpu`")


def nvidia_smi() -> tuple[int, str | None]:
    """(GPUs listed, driver version) from nvidia-smi; (0, None) without it or on error."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0, None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0, None
    rows = [r.strip() for r in out.stdout.splitlines() if r.strip()] if out.returncode == 0 else []
    return len(rows), (rows[0] if rows else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Which torch build this venv has, and whether it sees a GPU.")
    p.add_argument("--mode", choices=["cpu", "gpu"], default=None,
                   help="what the install was for (default: gpu for a CUDA build, cpu otherwise)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.version.cuda
    available = cuda is not None and torch.cuda.is_available()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    gpus, driver = nvidia_smi()
    v = verdict(mode=args.mode or ("gpu" if cuda else "cpu"), torch_version=torch.__version__, cuda_version=cuda,
                cuda_available=available, gpu_names=names, nvidia_smi_gpus=gpus, driver=driver)
    print(v.line, file=sys.stdout if v.ok else sys.stderr)
    return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
