"""flash-linear-attention's pure-PyTorch reference functions, loaded as external oracles.

``fla-core`` (pinned in constraints.txt, installed by tools/setup_env.sh with ``--no-deps``) ships
a ``naive.py`` per operator next to its Triton kernels. ``import fla.ops`` pulls in GPU-only code,
so the naive files are loaded here *by file path* under private module names
(``_miras_fla_naive.<op>``): they need only torch and einops, and nothing named ``fla`` is put
into ``sys.modules`` -- a real ``import fla.ops...`` later in the same process (the GPU benchmark)
still sees the real package.

    from miras_pretrain.testing.fla_reference import fla_naive, float64_reference
    rec = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule

The naive functions compute in float32 whatever their inputs (``x.to(torch.float32)``,
``.float()``, default-dtype ``torch.zeros``). :func:`float64_reference` runs them in float64
instead, so an oracle comparison can use float64 tolerances; the arithmetic is unchanged.

Argument mapping from ``miras_memory`` (linear memory, ``W [dv, dk]``, ``y_t = W_t q_t``) to fla
(state ``h [dk, dv] = Wᵀ``, ``o_t = scale · q_tᵀ h_t``, default ``scale = dk^-1/2``), as
:func:`gated_delta_fla_args` writes it for the delta rule:

* ``beta = eta`` (the delta rule's step size), ``g = log(alpha)`` (fla's gates are log-decays);
* fla scales q by ``dk^-1/2``; miras_memory does not -- feed it ``q · dk^-1/2`` for equal outputs;
* Gated DeltaNet steps at the retained state ``alpha_t S_{t-1}`` (``MirasSpec.step_at="retained"``);
* fla's naive functions do not normalise q/k (``use_qk_l2norm_in_kernel`` is a kernel option):
  callers pass the same (l2-normalised) q, k to both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["FLA_NAIVE_OPS", "fla_root", "fla_version", "fla_naive", "float64_reference",
           "gated_delta_fla_args", "compare_with_fla", "FlaMissingError", "FlaMismatchError"]

# The operators whose naive.py the oracles use, and the functions each must define.
FLA_NAIVE_OPS: dict[str, tuple[str, ...]] = {
    "gated_delta_rule": ("naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule"),
    "delta_rule": ("delta_rule_recurrence", "delta_rule_chunkwise"),
    "gla": ("naive_recurrent_gla",),
    "simple_gla": ("naive_recurrent_simple_gla", "naive_chunk_simple_gla"),
    "linear_attn": ("naive_recurrent_linear_attn", "naive_chunk_linear_attn"),
}

_INSTALL_HINT = "run tools/setup_env.sh (it installs the pinned fla-core and einops with --no-deps)"


class FlaMissingError(ImportError):
    """fla-core (or einops, which its naive files import) is not installed."""


def fla_root() -> Path:
    """The installed ``fla`` package directory (found without importing it: its ``__init__``
    imports GPU-only code)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise FlaMissingError("fla-core is not installed (the external oracles need fla's naive references): "
                              + _INSTALL_HINT)
    return Path(next(iter(spec.submodule_search_locations)))


def fla_version() -> str:
    """The installed fla-core version (``importlib.metadata``), for benchmark and test records."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fla-core")
    except PackageNotFoundError:
        fla_root()  # raises the install hint when fla itself is missing
        return "unknown"


@lru_cache(maxsize=None)
def fla_naive(op: str) -> ModuleType:
    """Load ``fla/ops/<op>/naive.py`` by file path as module ``_miras_fla_naive.<op>``.

    Args:
        op: one of :data:`FLA_NAIVE_OPS` (``gated_delta_rule``, ``delta_rule``, ``gla``,
            ``simple_gla``, ``linear_attn``).
    Raises:
        ValueError: unknown ``op``. FlaMissingError: fla-core or einops not installed, or the file
        does not define the functions this project uses (another fla-core version).
    """
    if op not in FLA_NAIVE_OPS:
        raise ValueError(f"op={op!r} is not a known fla naive reference: choose one of {', '.join(FLA_NAIVE_OPS)}")
    if importlib.util.find_spec("einops") is None:
        raise FlaMissingError(f"einops is not installed (fla's naive references import it): {_INSTALL_HINT}")
    path = fla_root() / "ops" / op / "naive.py"
    if not path.is_file():
        raise FlaMissingError(f"{path} is missing: fla-core {fla_version()} does not ship it; install the pinned "
                              f"version ({_INSTALL_HINT})")
    name = f"_miras_fla_naive.{op}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # a naive file that imports fla itself: not loadable without the GPU package
        raise FlaMissingError(f"{path} could not be loaded on its own ({exc}); this loader expects fla-core 0.6.0's "
                              "naive files, which need only torch and einops") from exc
    missing = [f for f in FLA_NAIVE_OPS[op] if not callable(getattr(module, f, None))]
    if missing:
        raise FlaMissingError(f"{path} lacks {', '.join(missing)} (fla-core {fla_version()}): install the pinned "
                              f"version ({_INSTALL_HINT})")
    sys.modules[name] = module
    return module


class _Float64Mode(TorchFunctionMode):
    """Rewrites every request for float32 into float64: ``Tensor.to(torch.float32)``,
    ``Tensor.float()`` and ``dtype=torch.float32`` keyword arguments (``torch.zeros``, ``eye``,
    ``new_zeros``, ...). Nothing else changes, so fla's naive arithmetic runs as written."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_reference() -> Iterator[None]:
    """Run fla's naive references in float64: inside, float32 casts become float64 casts and the
    default dtype is float64 (their ``torch.zeros(...)`` without a dtype). Give them float64
    inputs. Restores the default dtype on exit."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _Float64Mode():
            yield
    finally:
        torch.set_default_dtype(old)


def gated_delta_fla_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                         eta: torch.Tensor) -> dict[str, torch.Tensor]:
    """fla gated-delta-rule arguments (keywords ``q, k, v, g, beta``) for miras_memory's inputs.

    Args:
        q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``; alpha: ``[B, T, H]`` retention gate in
            (0, 1], or None (retention ``none``: alpha = 1, so ``g = 0``); eta: ``[B, T, H]``.
    Returns:
        ``dict(q, k, v, g=log(alpha), beta=eta)``, all ``[B, T, H(, d)]``; with fla's default
        ``scale = dk^-1/2`` its output equals ``miras_memory(q * dk**-0.5, k, v, alpha, eta,
        spec=MirasSpec.preset("gated_delta"))[0]`` (the Gated DeltaNet order, step at the
        retained state).
    """
    if alpha is not None and alpha.shape != eta.shape:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}: fla's gated delta rule takes per-head gates "
                         f"{tuple(eta.shape)} like eta; pass [B, T, H] alpha")
    g = torch.zeros_like(eta) if alpha is None else alpha.log()
    return dict(q=q, k=k, v=v, g=g, beta=eta)



class FlaMismatchError(ValueError):
    """miras_memory and an fla function given the mapped inputs do not compute the same thing."""


def compare_with_fla(fla_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None, eta: torch.Tensor, *, spec,
                     chunk_size: int, backend: str = "chunked", initial_state: torch.Tensor | None = None,
                     scale: float | None = None, tol: float = 1e-4) -> float:
    """Check that ``miras_memory`` and an fla gated-delta-rule function give the same output and
    final state on these inputs, under the mapping of :func:`gated_delta_fla_args`; a benchmark
    calls it before timing the two against each other (comparing equal functions only).

    Args:
        fla_fn: called as ``fla_fn(q=, k=, v=, g=, beta=, scale=, initial_state=,
            output_final_state=True)`` -> ``(o [B, T, H, dv], h [B, H, dk, dv])``: fla's
            ``chunk_gated_delta_rule`` (GPU) or its naive references.
        q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``; alpha: ``[B, T, H]`` or None; eta:
            ``[B, T, H]``; initial_state: miras ``W0 [B, H, dv, dk]`` or None (zeros).
        spec: the MirasSpec run by ``miras_memory`` (the gated-delta preset).
        chunk_size, backend: passed to ``miras_memory``.
        scale: fla's query scale (default ``dk^-1/2``); miras_memory gets ``q * scale``.
        tol: largest allowed ``max |miras - fla| / max |fla|`` of the output and of the final state.
    Returns:
        the larger of the two relative errors.
    Raises:
        FlaMismatchError (a ValueError) when it exceeds ``tol``.
    """
    from miras_kernels import miras_memory

    if scale is None:
        scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        init = None if initial_state is None else {"W": initial_state}
        y, state = miras_memory(q * scale, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, backend=backend,
                                initial_state=init, output_final_state=True)
        h0 = None if initial_state is None else initial_state.transpose(-1, -2)
        o, h = fla_fn(**gated_delta_fla_args(q, k, v, alpha, eta), scale=scale, initial_state=h0,
                      output_final_state=True)
        errs = {}
        for what, ours, theirs in (("output", y, o), ("final state", state["W"], h.transpose(-1, -2))):
            theirs = theirs.double()
            errs[what] = float((ours.double() - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    worst = max(errs.values())
    if not worst <= tol:
        detail = ", ".join(f"{w} {e:.2e}" for w, e in errs.items())
        fla_name = getattr(fla_fn, "__name__", None) or getattr(getattr(fla_fn, "func", None), "__name__", fla_fn)
        raise FlaMismatchError(f"miras_memory(spec={spec}, chunk_size={chunk_size}, backend={backend!r}) and "
                               f"{fla_name} differ (max relative error {detail} > tol {tol:g}): "
                               "not the same function, so they are not timed against each other")
    return worst
