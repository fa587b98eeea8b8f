"""Throughput, MFU and memory figures for the training logs."""

from __future__ import annotations

import os
import resource
from typing import Optional

import torch

# Dense bf16 peak FLOP/s per device (no sparsity), by substring of the CUDA device name.
_CUDA_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}
# CPU fallback: fp32 FLOP/s per core for an AVX2/AVX-512 core with 2 FMA units at ~2.5 GHz
# (32 flop/cycle). Only an order of magnitude: set log.peak_flops for real MFU on CPU.
_CPU_FLOPS_PER_CORE = 80e9


def device_peak_flops(device: torch.device, override: Optional[float] = None) -> float:
    """Peak FLOP/s of one device (``log.peak_flops`` wins when set)."""
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in _CUDA_PEAK.items():
            if key in name:
                return val
        return 100e12
    threads = torch.get_num_threads()
    return _CPU_FLOPS_PER_CORE * max(1, threads)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    return flops_per_token * tokens_per_s / peak_flops_total if peak_flops_total > 0 else 0.0


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return {
            "mem/cuda_max_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/cuda_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
        }
    # ru_maxrss is KiB on Linux
    return {"mem/cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
