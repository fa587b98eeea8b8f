"""Run megatron-core's CUDA-only spots on CPU (gloo), for tests and the CPU demo.

megatron-core hard-codes CUDA in a few places that the model touches indirectly: the RNG
tracker (``model_parallel_cuda_manual_seed`` / ``get_cuda_rng_tracker().fork()``), buffers made
with ``device=torch.cuda.current_device()`` or ``device="cuda"`` and ``torch.cuda.synchronize()``
(pipeline schedules, p2p). On a machine without CUDA this module

* maps ``device=cuda*`` / integer-device keyword arguments of torch functions to ``cpu`` while
  :func:`cuda_to_cpu` is active (a ``TorchFunctionMode``),
* stubs ``torch.cuda.current_device`` (0) and ``torch.cuda.synchronize`` (no-op),
* keeps the "CUDA" RNG state of megatron's tracker on the CPU generator.

Nothing happens on import. :func:`install_cpu_compat` applies the patches -- only when
``torch.cuda.is_available()`` is False; on a GPU it is a no-op -- and is called by the CPU branch
of ``initialize_parallel``; :func:`uninstall_cpu_compat` (from ``destroy_parallel``) puts the
originals back, so a process that leaves megatron behind has an untouched ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

# (owner, attribute name) -> the original, while the patches are installed
_ORIGINALS: dict[tuple[Any, str], Any] = {}
_CUDA_ATTRS = ("get_rng_state", "set_rng_state", "manual_seed", "current_device", "synchronize")


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True  # an integer device index means a CUDA device in torch
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda...`` (and integer devices) in torch calls to ``device="cpu"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:  # t.cuda() -> t (already on the CPU)
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def install_cpu_compat() -> bool:
    """Patch megatron-core / torch.cuda for a CUDA-less machine (idempotent).

    Returns True when the patches are (now) active, False on a machine with CUDA.
    """
    if torch.cuda.is_available():
        return False
    if _ORIGINALS:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    for owner, names in ((mrandom, ("_get_cuda_rng_state", "_set_cuda_rng_state")), (torch.cuda, _CUDA_ATTRS)):
        for name in names:
            _ORIGINALS[(owner, name)] = getattr(owner, name)

    def _get_state(device: Any = -1, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def _set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    # The tracker's get/set of the "cuda" generator go to the CPU generator: dropout under
    # tracker.fork() then draws from a per-TP-rank stream exactly as on GPU.
    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None
    return True


def uninstall_cpu_compat() -> None:
    """Undo :func:`install_cpu_compat` (a no-op when it is not installed)."""
    for (owner, name), original in _ORIGINALS.items():
        setattr(owner, name, original)
    _ORIGINALS.clear()


def cpu_compat_installed() -> bool:
    """Whether the patches are active now."""
    return bool(_ORIGINALS)


@contextlib.contextmanager
def cuda_to_cpu() -> Iterator[None]:
    """Context in which megatron code that allocates on ``cuda`` allocates on the CPU instead.

    A no-op when CUDA is available. Also installs the function patches.
    """
    if not install_cpu_compat():
        yield
        return
    with CudaToCpuMode():
        yield
