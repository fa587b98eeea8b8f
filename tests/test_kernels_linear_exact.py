"""The exact delta rule on the Triton linear kernels (``chunk_rule="exact"``: DeltaNet, Gated
DeltaNet; ``kernels/miras_linear/chunk_exact*.py``) against the plain token loop
``miras_kernels.pytorch.recurrent.miras_memory_recurrent`` in float64 (which, for the exact rule,
is the per-token rule at any chunk size), forward, final state and every gradient (q, k, v,
alpha, eta, initial state).

Runs in the Triton interpreter on CPU by default; ``MIRAS_TEST_DEVICE=cuda`` runs it compiled on
a GPU (``miras_pretrain.testing.devices``).

Tolerances (relative Frobenius error vs the float64 token loop, every output and gradient):
* fp32 inputs: 1e-4 with exact fp32 dots (measured 1e-7..1e-6 at these shapes: the triangular
  solve of a chunk is well conditioned for unit-norm keys and eta in (0, 1)), 2e-2 with TF32 dots;
* bf16 / fp16 inputs: 3e-2 (the oracle takes the same rounded inputs in float64; the error is y
  and the q/k/v gradients rounded to 16 bits plus fp32 accumulation).
"""

from __future__ import annotations

import pytest
import torch

import miras_kernels
from miras_kernels import MirasSpec
from miras_kernels.common.precision import EXACT_FP32_ENV
from miras_kernels.miras_linear import chunk_miras_linear, fused_recurrent_miras_linear
from miras_kernels.miras_linear.chunk_launch import launch_args
from miras_kernels.pytorch.recurrent import miras_memory_recurrent
from miras_pretrain.testing import devices

pytestmark = pytest.mark.triton
DEV = devices.test_device()
TOL_FP32 = 1e-4 if devices.fp32_dots_exact() else 2e-2
TOL_16 = 3e-2


def delta_spec(retention: str, step_at: str) -> MirasSpec:
    return MirasSpec(memory="linear", bias="l2", retention=retention, learner="gd", chunk_rule="exact",
                     step_at=step_at)


def make_inputs(B, T, H, dk, dv, n_state=None, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_state = B if n_state is None else n_state
    x = dict(
        q=torch.randn(B, T, H, dk, generator=g),
        k=torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1),
        v=torch.randn(B, T, H, dv, generator=g),
        alpha=0.6 + 0.4 * torch.rand(B, T, H, generator=g),
        eta=torch.rand(B, T, H, generator=g),
        W0=0.3 * torch.randn(n_state, H, dv, dk, generator=g),
    )
    return {n: t.to(DEV) for n, t in x.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(spec, C, x, dtype, tol, cu_seqlens=None, with_state=True):
    """Kernel (inputs q/k/v in ``dtype``) vs the float64 token loop on the same rounded inputs:
    y, final state and the gradient of every leaf. Returns the errors."""
    names = ["q", "k", "v", "eta"] + (["alpha"] if spec.retention != "none" else []) + (["W0"] if with_state else [])
    leaves = {n: x[n].to(dtype if n in ("q", "k", "v") else torch.float32).clone().requires_grad_() for n in names}
    ref = {n: t.detach().double().clone().requires_grad_() for n, t in leaves.items()}
    outs = []
    for fn, t in ((chunk_miras_linear, leaves), (miras_memory_recurrent, ref)):
        outs.append(fn(t["q"], t["k"], t["v"], t.get("alpha"), t["eta"], spec=spec, chunk_size=C,
                       initial_state={"W": t["W0"]} if with_state else None, output_final_state=True,
                       cu_seqlens=cu_seqlens))
    (y, st), (yr, sr) = outs
    assert y.dtype == dtype and y.shape == yr.shape and st["W"].shape == sr["W"].shape
    errs = {"y": rel(y, yr), "W_T": rel(st["W"], sr["W"])}
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64).to(DEV)
    gw = torch.randn(sr["W"].shape, generator=g, dtype=torch.float64).to(DEV)
    grads = torch.autograd.grad((y.double() * gy).sum() + (st["W"].double() * gw).sum(), list(leaves.values()))
    rgrads = torch.autograd.grad((yr * gy).sum() + (sr["W"] * gw).sum(), list(ref.values()))
    for n, a, b in zip(names, grads, rgrads):
        assert a.dtype == leaves[n].dtype and a.shape == leaves[n].shape
        errs["d" + n] = rel(a, b)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{spec.step_at} {spec.retention} C={C} {dtype}: errors over {tol}: {bad} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------- the oracle itself
def test_token_loop_is_the_two_delta_formulas():
    """The oracle is the per-token rule of the brief: previous S_t = S_{t-1}(a I - b k kᵀ) + b v kᵀ,
    retained S_t = a S_{t-1}(I - b k kᵀ) + b v kᵀ (Gated DeltaNet), at any chunk size."""
    x = {n: t.double() for n, t in make_inputs(1, 9, 2, 8, 6).items()}
    eye = torch.eye(8, dtype=torch.float64, device=DEV)
    for step_at in ("previous", "retained"):
        S = x["W0"][0]
        ys = []
        for t in range(9):
            a, b = x["alpha"][0, t][:, None, None], x["eta"][0, t][:, None, None]
            kt, vt = x["k"][0, t], x["v"][0, t]
            kk = kt[:, :, None] * kt[:, None, :]
            bvk = b * vt[:, :, None] * kt[:, None, :]
            S = S @ (a * eye - b * kk) + bvk if step_at == "previous" else a * S @ (eye - b * kk) + bvk
            ys.append(torch.einsum("hvk,hk->hv", S, x["q"][0, t]))
        y, st = miras_memory_recurrent(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=delta_spec("decay", step_at),
                                       chunk_size=4, initial_state={"W": x["W0"]}, output_final_state=True)
        assert rel(y[0], torch.stack(ys)) < 1e-12 and rel(st["W"][0], S) < 1e-12


# ----------------------------------------------------------------------------- fp32, every gradient
# (step_at, retention, C, dk, dv, T, B, H): both orders, DeltaNet (none) and Gated DeltaNet (decay),
# every chunk size, T not a multiple of C, dk != dv, several key/value blocks (dims up to 128,
# partial blocks), B and H > 1 for the offsets.
CASES = [
    ("retained", "decay", 16, 32, 32, 37, 2, 1),
    ("previous", "decay", 16, 16, 32, 35, 1, 2),
    ("previous", "none", 32, 32, 16, 40, 1, 2),
    ("retained", "decay", 64, 64, 48, 75, 1, 1),
    ("previous", "decay", 64, 32, 32, 70, 1, 1),
    ("retained", "decay", 32, 128, 72, 37, 1, 1),
]


@pytest.mark.parametrize("step_at,retention,C,dk,dv,T,B,H", CASES)
def test_exact_fp32_matches_token_loop(step_at, retention, C, dk, dv, T, B, H):
    compare(delta_spec(retention, step_at), C, make_inputs(B, T, H, dk, dv), torch.float32, TOL_FP32)


@pytest.mark.parametrize("step_at", ["previous", "retained"])
def test_exact_varlen_matches_token_loop(step_at):
    """Packed documents (lengths 5, 23, 0, 1, 14) restart the state and the chunk grid; an empty
    document's final state is its initial state."""
    cu = torch.tensor([0, 5, 28, 28, 29, 43], dtype=torch.int32, device=DEV)
    compare(delta_spec("decay", step_at), 16, make_inputs(1, 43, 2, 32, 16, n_state=5), torch.float32, TOL_FP32,
            cu_seqlens=cu)


def test_exact_without_initial_state():
    """No initial state (zeros, no gradient) on the DeltaNet preset; the final state still flows."""
    compare(MirasSpec.preset("deltanet"), 16, make_inputs(1, 21, 2, 16, 16), torch.float32, TOL_FP32, with_state=False)


def test_exact_without_final_state_gradient():
    """Only y gets a gradient (the adjoint pass starts from zeros), chunk 16 vs the token loop."""
    spec = MirasSpec.preset("gated_delta")
    x = make_inputs(1, 20, 1, 16, 16)
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "alpha", "eta", "W0")}
    y, st = chunk_miras_linear(leaves["q"], leaves["k"], leaves["v"], leaves["alpha"], leaves["eta"], spec=spec,
                               chunk_size=16, initial_state={"W": leaves["W0"]})
    assert st is None
    ref = {n: t.detach().double().clone().requires_grad_() for n, t in leaves.items()}
    yr, _ = miras_memory_recurrent(ref["q"], ref["k"], ref["v"], ref["alpha"], ref["eta"], spec=spec, chunk_size=16,
                                   initial_state={"W": ref["W0"]})
    (y * y).sum().backward()
    (yr * yr).sum().backward()
    assert rel(y, yr) < TOL_FP32
    for n in leaves:
        assert rel(leaves[n].grad, ref[n].grad) < TOL_FP32, n


# ----------------------------------------------------------------------------- 16-bit inputs
@pytest.mark.parametrize("dtype,step_at", [(torch.bfloat16, "retained"), (torch.float16, "previous")])
def test_exact_16bit_matches_token_loop(dtype, step_at):
    compare(delta_spec("decay", step_at), 16, make_inputs(1, 29, 2, 32, 16), dtype, TOL_16)


# ----------------------------------------------------------------------------- decoding, dispatch, precision
@pytest.mark.parametrize("step_at", ["previous", "retained"])
def test_recurrent_decoding_is_the_exact_rule(step_at):
    """The decoding kernel computes the per-token rule in the spec's order whatever chunk_size says."""
    spec = delta_spec("decay", step_at)
    x = make_inputs(1, 11, 2, 16, 32)
    with torch.no_grad():
        y, st = fused_recurrent_miras_linear(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=spec, chunk_size=4,
                                             initial_state={"W": x["W0"]}, output_final_state=True)
    d = {n: t.double() for n, t in x.items()}
    yr, sr = miras_memory_recurrent(d["q"], d["k"], d["v"], d["alpha"], d["eta"], spec=spec, chunk_size=4,
                                    initial_state={"W": d["W0"]}, output_final_state=True)
    assert rel(y, yr) < TOL_FP32 and rel(st["W"], sr["W"]) < TOL_FP32


def test_supports_exact_and_names_what_falls_back():
    q = torch.zeros(1, 4, 1, 64, device=DEV)
    for name in ("deltanet", "gated_delta"):
        for C in (16, 32, 64):
            assert miras_kernels.supports(MirasSpec.preset(name), q, chunk_size=C) == (True, "")
    # mini-batch GD in the retained order runs on the minibatch kernels (tests/test_kernels_linear_retained.py)
    assert miras_kernels.supports(MirasSpec(memory="linear", bias="l2", retention="decay", step_at="retained"),
                                  q, chunk_size=16) == (True, "")
    # retention none: alpha = 1, both orders are the same rule, the mini-batch kernels run it
    assert miras_kernels.supports(MirasSpec(memory="linear", retention="none", step_at="retained"), q, chunk_size=16)[0]
    ok, reason = miras_kernels.supports(MirasSpec.preset("gated_delta"), torch.zeros(1, 4, 1, 256, device=DEV),
                                        chunk_size=16)
    assert not ok and "128" in reason


def test_dot_precision_comes_from_the_environment(monkeypatch):
    """The host fills every linear kernel's DOT_PRECISION from miras_kernels.common.precision."""
    spec = MirasSpec.preset("gated_delta")
    x = make_inputs(1, 4, 1, 16, 16)
    monkeypatch.delenv(EXACT_FP32_ENV, raising=False)
    a = launch_args(spec, x["q"], x["v"], x["alpha"].log(), None, x["eta"], None, None, 16)
    assert a.common["DOT_PRECISION"] == "tf32"
    monkeypatch.setenv(EXACT_FP32_ENV, "1")
    a = launch_args(spec, x["q"], x["v"], x["alpha"].log(), None, x["eta"], None, None, 16)
    assert a.common["DOT_PRECISION"] == "ieee"
