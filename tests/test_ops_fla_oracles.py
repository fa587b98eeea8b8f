"""External oracles: the linear presets equal flash-linear-attention's pure-PyTorch references.

fla-core 0.6.0's ``naive.py`` files (loaded by file path, miras_pretrain/testing/fla_reference.py)
are an implementation of the published models written by someone else. Each preset is compared,
output, final state and the gradients of q, k, v, the gates and the initial state, with:

| preset | fla reference | gates |
|---|---|---|
| ``deltanet`` | ``delta_rule_recurrence`` (``[B, H, T, D]``) | ``beta = eta`` |
| ``gated_delta`` | ``naive_recurrent_gated_delta_rule`` | ``beta = eta``, ``g = log alpha``, step at the retained state ``alpha S`` |
| ``gla`` | ``naive_recurrent_gla`` | per-channel ``gk = log alpha`` (a per-head alpha is broadcast over dk); fla has no step size: ``k_fla = eta k`` |
| ``linear_attn`` | ``naive_recurrent_linear_attn`` (``normalize=False``) | ``k_fla = eta k`` |

Common mapping: fla's state is ``h [dk, dv] = Wᵀ`` (``initial_state = W0ᵀ``); fla reads
``o = dk^-1/2 · qᵀ h``, miras_memory ``y = W q``, so miras_memory gets ``q · dk^-1/2``; neither
normalises q or k (fla's ``use_qk_l2norm_in_kernel`` is a kernel flag, not in the naive files),
both get the same l2-normalised q, k.

Tolerances (relative: max |diff| / max |reference| per tensor):
* float64, ``recurrent`` and ``chunked`` backends, fla run in float64 (float64_reference): 1e-9
  (observed <= 2e-15 on 2026-12-07: rounding only; the exact delta-rule chunk form solves a
  unit-triangular system per chunk, well conditioned for ``eta |k|^2 <= 1``).
* float32, ``triton`` backend (interpreter on CPU; exact fp32 on a GPU with MIRAS_EXACT_FP32=1)
  vs the float64 oracle: 1e-5 (observed <= 6.1e-7, fp32 rounding); 3e-3 with TF32 dots.

deltanet / gated_delta at chunk > 1 need ``chunk_rule="exact"`` (and gated_delta
``step_at="retained"``) in their presets, computed by both PyTorch backends and the Triton kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from miras_kernels import MirasSpec, miras_memory, supports
from miras_pretrain.testing import fla_reference
from miras_pretrain.testing.devices import fp32_dots_exact
from miras_pretrain.testing.devices import test_device as device_under_test  # not collected as a test
from miras_pretrain.testing.fla_reference import FlaMissingError, fla_naive, float64_reference, gated_delta_fla_args

TOL_FP64 = 1e-9
TOL_TRITON_FP32 = 1e-5 if fp32_dots_exact() else 3e-3  # TF32 dots: ~1e-3 per product
B, H = 1, 2
LEAVES = ("q", "k", "v", "alpha", "eta", "W0")


def make_leaves(T: int, D: int, channel: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 leaves: q, k ``[B, T, H, D]`` l2-normalised, v ``[B, T, H, D]``, alpha ``[B, T, H]``
    in (0.8, 1) (``[B, T, H, D]`` if channel), eta ``[B, T, H]`` in (0.2, 0.9), W0 ``[B, H, D, D]``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = dict(
        q=F.normalize(r(B, T, H, D), dim=-1),
        k=F.normalize(r(B, T, H, D), dim=-1),
        v=r(B, T, H, D),
        alpha=0.8 + 0.2 * torch.sigmoid(r(B, T, H, D) if channel else r(B, T, H)),
        eta=0.2 + 0.7 * torch.rand(B, T, H, generator=g, dtype=torch.float64),
        W0=r(B, H, D, D) / D**0.5,
    )
    return {n: t.to(device_under_test()).requires_grad_() for n, t in leaves.items()}


def used(name: str) -> tuple[str, ...]:
    """The leaves a preset reads (linear_attn and deltanet have no retention gate)."""
    return tuple(n for n in LEAVES if not (n == "alpha" and name in ("deltanet", "linear_attn")))


def fla_side(name: str, lv: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's naive recurrence under the mapping of the module docstring, in float64.
    Returns y ``[B, T, H, D]`` and the final W ``[B, H, dv, dk]``."""
    h0 = lv["W0"].transpose(-1, -2)
    with float64_reference():
        if name == "deltanet":
            # [B, H, T, D] layout, no scale argument (dk^-1/2 built in)
            hm = lambda x: x.transpose(1, 2)  # noqa: E731
            o, h = fla_naive("delta_rule").delta_rule_recurrence(
                hm(lv["q"]), hm(lv["k"]), hm(lv["v"]), hm(lv["eta"]), initial_state=h0, output_final_state=True)
            o = o.transpose(1, 2)
        elif name == "gated_delta":
            o, h = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule(
                **gated_delta_fla_args(lv["q"], lv["k"], lv["v"], lv["alpha"], lv["eta"]),
                initial_state=h0, output_final_state=True)
        elif name == "gla":
            alpha = lv["alpha"] if lv["alpha"].dim() == 4 else lv["alpha"][..., None].expand_as(lv["k"])
            o, h = fla_naive("gla").naive_recurrent_gla(
                lv["q"], lv["eta"][..., None] * lv["k"], lv["v"], alpha.log(), initial_state=h0,
                output_final_state=True)
        elif name == "linear_attn":
            o, h = fla_naive("linear_attn").naive_recurrent_linear_attn(
                lv["q"], lv["eta"][..., None] * lv["k"], lv["v"], initial_state=h0, output_final_state=True)
        else:
            raise ValueError(f"no fla oracle for preset {name!r}")
    return o, h.transpose(-1, -2)


def miras_side(name: str, lv: dict, backend: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = MirasSpec.preset(name)
    D = lv["q"].shape[-1]
    alpha = lv["alpha"] if spec.needs_alpha else None
    y, state = miras_memory(lv["q"] * D**-0.5, lv["k"], lv["v"], alpha, lv["eta"], spec=spec, chunk_size=chunk,
                            initial_state={"W": lv["W0"]}, output_final_state=True, backend=backend)
    return y, state["W"]


def outputs_and_grads(name: str, lv: dict, fn) -> dict[str, torch.Tensor]:
    """y, the final W and the gradients of a fixed random projection of both w.r.t. every used leaf."""
    y, W = fn(lv)
    g = torch.Generator().manual_seed(7)
    cy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    cw = torch.randn(W.shape, generator=g, dtype=torch.float64).to(W)
    names = used(name)
    grads = torch.autograd.grad((y * cy).sum() + (W * cw).sum(), [lv[n] for n in names])
    return {"y": y.detach(), "W_final": W.detach(), **{"d" + n: gr for n, gr in zip(names, grads)}}


def rel_errs(got: dict, ref: dict) -> dict[str, float]:
    """max |got - ref| / max |ref| per tensor."""
    return {n: float((got[n].double() - ref[n].double()).abs().max() / ref[n].double().abs().max()) for n in ref}


def check(name: str, got: dict, ref: dict, tol: float, what: str) -> None:
    assert set(got) == set(ref)
    errs = rel_errs(got, ref)
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e <= tol}
    assert not bad, f"{name} {what} vs fla: relative errors above {tol:g}: {bad}"


# chunk 1 = the token loop; 16 and 64 with T not a multiple of the chunk (a partial last chunk)
FP64_CASES = [(name, backend, chunk) for name in ("deltanet", "gated_delta", "gla", "linear_attn")
              for backend in ("recurrent", "chunked") for chunk in (1, 16, 64)]


@pytest.mark.parametrize("name,backend,chunk", FP64_CASES, ids=[f"{n}-{b}-C{c}" for n, b, c in FP64_CASES])
def test_preset_equals_fla_naive_float64(name, backend, chunk):
    lv = make_leaves(T=100, D=8, seed=1)
    ref = outputs_and_grads(name, lv, lambda x: fla_side(name, x))
    got = outputs_and_grads(name, lv, lambda x: miras_side(name, x, backend, chunk))
    check(name, got, ref, TOL_FP64, f"{backend} C={chunk} float64")


@pytest.mark.parametrize("backend,chunk", [("recurrent", 1), ("chunked", 16)])
def test_gla_per_channel_alpha_equals_fla_naive(backend, chunk):
    """GLA's per-key-channel decay ``alpha [B, T, H, dk]`` is fla's ``gk`` directly."""
    lv = make_leaves(T=50, D=8, channel=True, seed=2)
    ref = outputs_and_grads("gla", lv, lambda x: fla_side("gla", x))
    got = outputs_and_grads("gla", lv, lambda x: miras_side("gla", x, backend, chunk))
    check("gla per-channel", got, ref, TOL_FP64, f"{backend} C={chunk} float64")


TRITON_CASES = [(name, chunk) for name in ("deltanet", "gated_delta", "gla", "linear_attn") for chunk in (16, 64)]


@pytest.mark.triton
@pytest.mark.parametrize("name,chunk", TRITON_CASES, ids=[f"{n}-C{c}" for n, c in TRITON_CASES])
def test_preset_triton_equals_fla_naive(name, chunk):
    """The Triton kernels (float32; dims 16 so every tl.dot dim is >= 16) vs the float64 oracle."""
    lv = make_leaves(T=50, D=16, seed=3)
    ref = outputs_and_grads(name, lv, lambda x: fla_side(name, x))
    lv32 = {n: t.detach().float().requires_grad_() for n, t in lv.items()}
    spec = MirasSpec.preset(name)
    ok, reason = supports(spec, lv32["q"], lv32["k"], lv32["v"], chunk_size=chunk, alpha=lv32["alpha"])
    # a refused call would silently run the chunked PyTorch path: this test is about the kernels
    assert ok, f"{name} C={chunk}: the Triton kernels refuse this call ({reason})"
    got = outputs_and_grads(name, lv32, lambda x: miras_side(name, x, "triton", chunk))
    check(name, got, ref, TOL_TRITON_FP32, f"triton C={chunk} float32")


# ------------------------------------------------------------------ the oracle itself is trusted
@pytest.mark.parametrize("chunk", [16, 64])
def test_fla_chunk_gated_delta_equals_its_recurrence(chunk):
    """fla's two naive gated delta rules (WY chunk form with padding, token loop) agree in float64,
    outputs, final state and all gradients, at T = 50 (a partial chunk): the oracle is consistent."""
    lv = make_leaves(T=50, D=8, seed=4)
    mod = fla_naive("gated_delta_rule")

    def run(fn, **kw):
        def f(x):
            with float64_reference():
                o, h = fn(**gated_delta_fla_args(x["q"], x["k"], x["v"], x["alpha"], x["eta"]),
                          initial_state=x["W0"].transpose(-1, -2), output_final_state=True, **kw)
            return o, h.transpose(-1, -2)
        return f

    ref = outputs_and_grads("gated_delta", lv, run(mod.naive_recurrent_gated_delta_rule))
    got = outputs_and_grads("gated_delta", lv, run(mod.naive_chunk_gated_delta_rule, chunk_size=chunk))
    assert ref["y"].dtype == torch.float64
    check("fla naive_chunk_gated_delta_rule", got, ref, TOL_FP64, f"chunk {chunk}")


def test_float64_reference_changes_precision_not_arithmetic():
    """fla's naive functions cast to float32; under float64_reference they return float64 and agree
    with their own float32 run to float32 rounding, and the restore leaves the default dtype alone."""
    lv = {n: t.detach() for n, t in make_leaves(T=20, D=8, seed=5).items()}
    args = gated_delta_fla_args(lv["q"], lv["k"], lv["v"], lv["alpha"], lv["eta"])
    rec = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule
    o32, _ = rec(**args)
    with float64_reference():
        o64, _ = rec(**args)
    assert o32.dtype == torch.float32 and o64.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32
    err = float((o32.double() - o64).abs().max() / o64.abs().max())
    assert 0 < err < 1e-5  # nonzero: the float64 run really is a different precision


def test_fla_naive_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"op='nope' is not a known fla naive reference: choose one of"):
        fla_naive("nope")
    with pytest.raises(ValueError, match=r"alpha has shape .*per-head gates"):
        gated_delta_fla_args(*(torch.zeros(1, 2, 1, 4),) * 3, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fla" else real(n, *a))
    fla_naive.cache_clear()
    try:
        with pytest.raises(FlaMissingError, match=r"^fla-core is not installed .*run tools/setup_env.sh"):
            fla_naive("gla")
    finally:
        fla_naive.cache_clear()


def test_loader_does_not_shadow_the_real_fla_package():
    """The naive files load under private names: ``import fla...`` later still finds the installed
    package (the GPU benchmark imports fla's kernels in the same process)."""
    import sys

    fla_naive("delta_rule")
    assert "fla" not in sys.modules or getattr(sys.modules["fla"], "__file__", None) is not None
    assert sys.modules["_miras_fla_naive.delta_rule"].__file__.startswith(str(fla_reference.fla_root()))


# ------------------------------------------------------------------ benchmarks compare equal functions
def _bench_kernels():
    """tools/bench_kernels.py as a module (tools/ is not a package)."""
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"
    spec = iu.spec_from_file_location("_bench_kernels_under_test", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_with_fla_accepts_the_preset_and_refuses_other_semantics():
    """compare_with_fla (the check the benchmarks run before timing) in float64 against fla's naive
    token loop: the gated_delta preset passes at 1e-9; the same rule stepping at the previous state
    (Miras order) or a per-token GLA is refused with a one-line reason."""
    from miras_pretrain.testing.fla_reference import FlaMismatchError, compare_with_fla

    lv = {n: t.detach() for n, t in make_leaves(T=40, D=8, seed=6).items()}
    rec = fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule

    def rec64(**kw):  # only fla's side runs under the float64 mode
        with float64_reference():
            return rec(**kw)

    args = (lv["q"], lv["k"], lv["v"], lv["alpha"], lv["eta"])
    err = compare_with_fla(rec64, *args, spec=MirasSpec.preset("gated_delta"), chunk_size=16,
                           initial_state=lv["W0"], tol=TOL_FP64)
    assert err < TOL_FP64
    for other in (MirasSpec.preset("gated_delta", step_at="previous"), MirasSpec.preset("gla")):
        with pytest.raises(FlaMismatchError, match=r"differ \(max relative error output .* > tol .*not timed"):
            compare_with_fla(rec64, *args, spec=other, chunk_size=16, initial_state=lv["W0"], tol=1e-4)


def test_bench_kernels_times_fla_only_when_equal():
    """bench_kernels.fla_timing with fla's naive chunk form standing in for its GPU kernel (same
    keywords): the gated_delta preset is timed with its check error recorded; a spec computing a
    different function is refused and not timed."""
    from functools import partial

    bk = _bench_kernels()
    fla_chunk = partial(fla_naive("gated_delta_rule").naive_chunk_gated_delta_rule, chunk_size=16)
    x = bk._inputs(1, 40, 2, 16, 16, torch.float32, "cpu")
    row = bk.fla_timing(fla_chunk, x, MirasSpec.preset("gated_delta"), 16, "cpu", reps=1)
    assert set(row) == {"fla_ms", "fla_peak_mib", "fla_check_rel_err"}
    assert row["fla_ms"] > 0 and row["fla_check_rel_err"] < bk.FLA_TOL_CPU
    refused = bk.fla_timing(fla_chunk, x, MirasSpec.preset("gated_delta", chunk_rule="minibatch"), 16, "cpu", reps=1)
    assert set(refused) == {"fla_refused"} and "not timed" in refused["fla_refused"]
