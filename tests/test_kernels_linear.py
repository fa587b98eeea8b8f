"""Triton linear-memory Miras kernels in the interpreter vs an independent token-loop reference.

By default everything runs on CPU (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); ``MIRAS_TEST_DEVICE=cuda`` runs the same tests compiled on a GPU
(``miras_pretrain.testing.devices``; fp32 dots exact there under MIRAS_EXACT_FP32=1, which conftest sets).
The reference below is a plain float64 token loop of the project's chunk semantics (gradient of
every token of a chunk at the chunk-start weights), written here independently of
miras_kernels; gradients come from autograd through it.

Tolerances (relative Frobenius error vs the float64 reference, all outputs and gradients):
* fp32 inputs: 1e-4 (dot/l2/lp; 2e-2 on a GPU with TF32 dots), 2e-3 for huber (its l1-branch derivative delta*eps*s^-1.5 is
  ill-conditioned near e = 0, so fp32 rounding is amplified);
* bf16 inputs: 3e-2 (the reference takes the same bf16-rounded inputs in float64; the error
  is y and the q/k/v gradients being rounded to bf16 plus fp32 accumulation).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

import miras_kernels
from miras_kernels import configs
from miras_kernels.miras_linear import chunk_miras_linear, fused_recurrent_miras_linear
from miras_kernels import MirasSpec, miras_memory
from miras_pretrain.testing import devices

pytestmark = pytest.mark.triton
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEV = devices.test_device()
# TF32 dots (10-bit mantissa) when a GPU run did not ask for exact fp32
TOL_FP32 = 1e-4 if devices.fp32_dots_exact() else 2e-2
TOL_HUBER_FP32 = 2e-3 if devices.fp32_dots_exact() else 2e-2
TOL_BF16 = 3e-2
NAMES = ("q", "k", "v", "alpha", "eta", "delta", "mu", "W0", "S0")


# ----------------------------------------------------------------------------- reference
def _materialize(spec: MirasSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.retention == "lq":
        norm = x.abs().pow(spec.q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / spec.q)
        return x / (norm + spec.lq_eps).pow(spec.q - 2.0)
    if spec.retention == "kl":
        return spec.c * torch.softmax(x, dim=-1)
    return x


def _bias_grad(spec: MirasSpec, e, v, delta):
    if spec.bias == "dot":
        return -v
    if spec.bias == "l2":
        return e
    if spec.bias == "lp":
        return spec.p * e * (e * e + 1e-6) ** ((spec.p - 2) / 2)
    n = e.norm(dim=-1, keepdim=True)
    return torch.where(n <= delta[..., None], e, delta[..., None] * e * (e * e + spec.huber_eps) ** -0.5)


def reference(spec, C, q, k, v, alpha, eta, delta=None, mu=None, W0=None, S0=None, cu_seqlens=None):
    """Token loop: per sequence (document), W frozen at each chunk start (``chunk_rule="exact"``:
    at every token; with ``step_at="retained"`` the residual is taken at ``alpha_t W``, Gated
    DeltaNet's order). Returns y [B,T,H,dv], final X and S [N,H,dv,dk]."""
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = [(0, int(cu_seqlens[i]), int(cu_seqlens[i + 1])) for i in range(len(cu_seqlens) - 1)]
    ys = {}
    Xs, Ss = [], []
    for n, (b, start, end) in enumerate(seqs):
        X = W0[n] if W0 is not None else q.new_zeros(H, dv, dk)
        S = S0[n] if S0 is not None else q.new_zeros(H, dv, dk)
        Wc = None
        for t in range(start, end):
            if spec.chunk_rule == "exact" or (t - start) % C == 0:
                Wc = _materialize(spec, X)
            a = alpha[b, t][:, None, None] if spec.retention != "none" else 1.0
            Wp = a * Wc if (spec.chunk_rule == "exact" and spec.step_at == "retained") else Wc
            e = torch.einsum("hvk,hk->hv", Wp, k[b, t]) - v[b, t]
            u = _bias_grad(spec, e, v[b, t], None if delta is None else delta[b, t])
            g = eta[b, t][:, None, None] * u[:, :, None] * k[b, t][:, None, :]
            if spec.learner == "momentum":
                S = mu[b, t][:, None, None] * S - g
                X = a * X + S
            else:
                X = a * X - g
            ys[(b, t)] = torch.einsum("hvk,hk->hv", _materialize(spec, X), q[b, t])
        Xs.append(X)
        Ss.append(S)
    y = torch.stack([torch.stack([ys[(b, t)] for t in range(T)]) for b in range(B)])
    return y, torch.stack(Xs), torch.stack(Ss)


# ----------------------------------------------------------------------------- helpers
def make_inputs(B, T, H, dk, dv, n_state=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_state = B if n_state is None else n_state
    x = dict(
        q=torch.randn(B, T, H, dk, generator=g),
        k=torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1),
        v=torch.randn(B, T, H, dv, generator=g),
        alpha=0.6 + 0.4 * torch.rand(B, T, H, generator=g),
        eta=0.5 * torch.rand(B, T, H, generator=g),
        delta=0.3 + 1.5 * torch.rand(B, T, H, generator=g),  # both huber branches are taken
        mu=0.9 * torch.rand(B, T, H, generator=g),
        W0=0.3 * torch.randn(n_state, H, dv, dk, generator=g),
        S0=0.3 * torch.randn(n_state, H, dv, dk, generator=g),
    )
    return {n: t.to(DEV) for n, t in x.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def used_names(spec: MirasSpec) -> list[str]:
    names = ["q", "k", "v", "eta", "W0"]
    if spec.retention != "none":
        names.append("alpha")
    if spec.bias == "huber":
        names.append("delta")
    if spec.learner == "momentum":
        names += ["mu", "S0"]
    return names


def run_kernel(fn, spec, C, x, dtype, cu_seqlens=None, grad=True):
    leaves = {n: x[n].to(dtype if n in ("q", "k", "v") else torch.float32).clone().requires_grad_(grad)
              for n in used_names(spec)}
    init = {"W": leaves["W0"]}
    if spec.learner == "momentum":
        init["S_W"] = leaves["S0"]
    y, state = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("alpha"), leaves["eta"], spec=spec,
                  chunk_size=C, delta=leaves.get("delta"), mu=leaves.get("mu"), initial_state=init,
                  output_final_state=True, cu_seqlens=cu_seqlens)
    return leaves, y, state


def run_reference(spec, C, x, dtype, cu_seqlens=None):
    leaves = {n: x[n].to(dtype if n in ("q", "k", "v") else torch.float32).double().clone().requires_grad_()
              for n in used_names(spec)}
    y, X, S = reference(spec, C, leaves["q"], leaves["k"], leaves["v"], leaves.get("alpha"), leaves["eta"],
                        leaves.get("delta"), leaves.get("mu"), leaves["W0"], leaves.get("S0"), cu_seqlens)
    return leaves, y, X, S


def check_against_reference(spec, C, x, dtype, tol, cu_seqlens=None):
    leaves, y, state = run_kernel(chunk_miras_linear, spec, C, x, dtype, cu_seqlens)
    rleaves, yr, Xr, Sr = run_reference(spec, C, x, dtype, cu_seqlens)
    assert y.dtype == dtype and y.shape == yr.shape
    errs = {"y": rel(y, yr), "W_T": rel(state["W"], Xr)}
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64).to(DEV)
    gw = torch.randn(Xr.shape, generator=g, dtype=torch.float64).to(DEV)
    gs = torch.randn(Xr.shape, generator=g, dtype=torch.float64).to(DEV)
    loss = (y.double() * gy).sum() + (state["W"].double() * gw).sum()
    rloss = (yr * gy).sum() + (Xr * gw).sum()
    if spec.learner == "momentum":
        errs["S_T"] = rel(state["S_W"], Sr)
        loss = loss + (state["S_W"].double() * gs).sum()
        rloss = rloss + (Sr * gs).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    rgrads = torch.autograd.grad(rloss, [rleaves[n] for n in names])
    for n, a, b in zip(names, grads, rgrads):
        assert a.dtype == leaves[n].dtype and a.shape == leaves[n].shape
        errs["d" + n] = rel(a, b)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{spec} C={C} {dtype}: relative errors over {tol}: {bad} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------- chunk kernel
# (bias, retention, learner, C, dk, dv, T, B, H): every bias x learner, both retentions, every chunk
# size, dk != dv, T not a multiple of C; B and H kept small (the interpreter's cost is per program
# and chunk) but > 1 in some cases for the batch/head offsets.
CASES = [
    ("dot", "none", "gd", 16, 16, 32, 37, 2, 1),
    ("dot", "decay", "gd", 32, 32, 16, 45, 1, 2),
    ("l2", "none", "gd", 16, 32, 32, 35, 1, 2),
    ("l2", "decay", "gd", 64, 16, 16, 75, 1, 1),
    ("lp", "decay", "gd", 16, 16, 32, 33, 1, 2),
    ("huber", "decay", "gd", 16, 32, 16, 37, 2, 1),
    ("dot", "decay", "momentum", 16, 16, 16, 39, 1, 2),
    ("l2", "none", "momentum", 32, 16, 32, 41, 1, 1),
    ("l2", "decay", "momentum", 16, 32, 16, 33, 2, 1),
    ("lp", "decay", "momentum", 64, 16, 16, 70, 1, 1),
    ("huber", "none", "momentum", 16, 16, 32, 34, 1, 2),
    ("l2", "decay", "gd", 16, 64, 48, 35, 1, 1),  # dk 64, dv 48: two value blocks (partial dq/dk/gate sums)
    # head dims up to 128: several key blocks (BK = 16/32) and value blocks, dv != dk, masked tails
    ("l2", "decay", "gd", 64, 128, 64, 67, 1, 1),
    ("huber", "decay", "gd", 32, 64, 128, 37, 1, 1),  # huber row norm reduced over four value blocks
    ("lp", "none", "momentum", 32, 128, 32, 35, 1, 1),
    ("huber", "decay", "momentum", 64, 72, 40, 67, 1, 1),  # partial key and value blocks
    ("dot", "decay", "momentum", 32, 32, 128, 35, 1, 1),
]


# lq (Moneta's normalisation) and kl (Memora's softmax) on chunk_mat.py: every bias x learner at
# least once, every chunk size, several value blocks (the lq norm and the per-token adjoints are
# reduced over value-block programs), partial key/value blocks, B and H > 1 for the offsets.
MAT_CASES = [
    ("l2", "lq", "gd", 16, 16, 16, 37, 2, 2),
    ("lp", "lq", "gd", 32, 32, 48, 45, 1, 1),
    ("huber", "lq", "gd", 16, 32, 48, 37, 1, 1),  # huber + lq: one state-pass program per head
    ("dot", "lq", "momentum", 16, 16, 32, 35, 1, 2),
    ("lp", "lq", "momentum", 64, 72, 40, 67, 1, 1),
    ("l2", "kl", "gd", 16, 16, 16, 37, 2, 2),
    ("lp", "kl", "gd", 64, 72, 40, 67, 1, 1),
    ("huber", "kl", "gd", 32, 16, 32, 40, 1, 2),
    ("dot", "kl", "momentum", 16, 16, 16, 33, 1, 1),
    ("l2", "kl", "momentum", 16, 32, 16, 35, 1, 1),
    ("l2", "kl", "gd", 16, 128, 32, 35, 1, 1),  # dk 128: the sweep's tile spans the whole key width
]


@pytest.mark.parametrize("bias,retention,learner,C,dk,dv,T,B,H", CASES + MAT_CASES)
def test_chunk_fp32_matches_token_loop(bias, retention, learner, C, dk, dv, T, B, H):
    spec = MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner)
    x = make_inputs(B, T, H, dk, dv)
    if retention in ("lq", "kl"):
        # d mu = d(log mu) / mu: at mu ~ 1e-4 the fp32 rounding of d(log mu) is amplified 1e4-fold
        # (measured 1e-4..4e-4 relative on d mu for these shapes, the decay kernels included)
        x["mu"] = x["mu"].clamp_min(0.05)
    check_against_reference(spec, C, x, torch.float32, TOL_HUBER_FP32 if bias == "huber" else TOL_FP32)


@pytest.mark.parametrize("huber_eps", [1e-6, 0.05])
def test_chunk_huber_eps_reaches_the_kernels(huber_eps):
    """MirasSpec.huber_eps (the Huber l1 branch's smooth sign) is the kernels' EPS: the chunk
    kernels match the token loop at a non-default value too."""
    spec = MirasSpec(memory="linear", bias="huber", retention="decay", huber_eps=huber_eps)
    check_against_reference(spec, 16, make_inputs(1, 37, 2, 16, 16), torch.float32, TOL_HUBER_FP32)


@pytest.mark.parametrize("bias,learner,C,dk,dv", [("l2", "gd", 16, 32, 16), ("lp", "momentum", 16, 32, 16),
                                                  ("huber", "gd", 16, 32, 16), ("huber", "momentum", 64, 128, 32)])
def test_chunk_bf16_matches_token_loop(bias, learner, C, dk, dv):
    spec = MirasSpec(memory="linear", bias=bias, retention="decay", learner=learner)
    T = 29 if C == 16 else 67
    check_against_reference(spec, C, make_inputs(2 if C == 16 else 1, T, 2 if C == 16 else 1, dk, dv),
                            torch.bfloat16, TOL_BF16)


@pytest.mark.parametrize("retention", ["decay", "lq", "kl"])
def test_chunk_fp16_forward(retention):
    # lq / kl have no exact chunk form: the preset's mini-batch variant
    over = {} if retention == "decay" else dict(chunk_rule="minibatch", step_at="previous")
    spec = MirasSpec.preset("gated_delta", retention=retention, **over)
    x = make_inputs(1, 21, 2, 16, 16)
    _, y, state = run_kernel(chunk_miras_linear, spec, 16, x, torch.float16, grad=False)
    _, yr, Xr, _ = run_reference(spec, 16, x, torch.float16)
    assert y.dtype == torch.float16 and rel(y, yr) < TOL_BF16 and rel(state["W"], Xr) < TOL_BF16


@pytest.mark.parametrize("retention,bias,learner", [("lq", "lp", "gd"), ("kl", "l2", "momentum")])
def test_chunk_mat_bf16_matches_token_loop(retention, bias, learner):
    spec = MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner)
    check_against_reference(spec, 16, make_inputs(2, 29, 2, 32, 16), torch.bfloat16, TOL_BF16)


@pytest.mark.parametrize("learner,bias,C,dk,dv,retention", [("gd", "l2", 16, 16, 16, "decay"),
                                                            ("momentum", "huber", 16, 16, 16, "decay"),
                                                            ("gd", "huber", 32, 64, 48, "decay"),
                                                            ("gd", "lp", 16, 16, 32, "lq"),
                                                            ("momentum", "l2", 16, 16, 16, "kl")])
def test_chunk_varlen_matches_token_loop(learner, bias, C, dk, dv, retention):
    """Packed documents (lengths 5, 23, 0, 1, 14: shorter than, not a multiple of the chunk, empty,
    one token) restart the chunking and the state at each start; per-document states in and out
    (an empty document's final state is its initial state)."""
    cu = torch.tensor([0, 5, 28, 28, 29, 43], dtype=torch.int32, device=DEV)
    spec = MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner)
    x = make_inputs(1, 43, 2, dk, dv, n_state=5)
    errs = check_against_reference(spec, C, x, torch.float32,
                                   TOL_HUBER_FP32 if bias == "huber" else TOL_FP32, cu_seqlens=cu)
    assert set(errs) >= {"y", "W_T", "dq", "dW0"}


def test_chunk_broadcast_initial_state_and_no_final_state():
    """An [H, dv, dk] initial state is shared by the batch (its gradient sums over it)."""
    spec = MirasSpec.preset("gla")
    x = make_inputs(2, 20, 2, 16, 16)
    W0 = x["W0"][0].clone().requires_grad_()
    q = x["q"].clone().requires_grad_()
    y, state = chunk_miras_linear(q, x["k"], x["v"], x["alpha"], x["eta"], spec=spec, chunk_size=16,
                                  initial_state={"W": W0})
    assert state is None
    (y * y).sum().backward()
    W0r = x["W0"][0].double().clone().requires_grad_()
    yr, _, _ = reference(spec, 16, x["q"].double(), x["k"].double(), x["v"].double(), x["alpha"].double(),
                         x["eta"].double(), W0=W0r.expand(2, -1, -1, -1))
    (yr * yr).sum().backward()
    assert rel(y, yr) < TOL_FP32 and rel(W0.grad, W0r.grad) < TOL_FP32


@pytest.mark.parametrize("preset,learner,varlen,retention", [("gated_delta", "gd", False, None),
                                                              ("gla", "momentum", True, None),
                                                              ("gated_delta", "gd", True, "lq"),
                                                              ("gated_delta", "gd", False, "kl")])
def test_chunk_matches_ops_chunked_backend(preset, learner, varlen, retention):
    """Same numbers as the PyTorch chunked backend of miras_memory (forward, state, gradients);
    lq/kl: the linear-memory Moneta/Memora rules (lp bias with the l_q / softmax retention)."""
    spec = MirasSpec.preset(preset, learner=learner, bias="lp", retention=retention or MirasSpec.preset(preset).retention,
                            chunk_rule="minibatch", step_at="previous")  # lp: no exact chunk form
    cu = torch.tensor([0, 7, 30, 40], dtype=torch.int32, device=DEV) if varlen else None
    x = make_inputs(1 if varlen else 2, 40, 2, 16, 16, n_state=3 if varlen else None)
    leaves, y, state = run_kernel(chunk_miras_linear, spec, 16, x, torch.float32, cu_seqlens=cu)
    rl = {n: t.detach().double().clone().requires_grad_() for n, t in leaves.items()}
    init = {"W": rl["W0"]}
    if learner == "momentum":
        init["S_W"] = rl["S0"]
    yr, sr = miras_memory(rl["q"], rl["k"], rl["v"], rl.get("alpha"), rl["eta"], spec=spec, chunk_size=16,
                          mu=rl.get("mu"), initial_state=init, output_final_state=True, cu_seqlens=cu,
                          backend="chunked")
    assert rel(y, yr) < TOL_FP32 and rel(state["W"], sr["W"]) < TOL_FP32
    gy = torch.randn(yr.shape, dtype=torch.float64, device=DEV)
    names = list(leaves)
    ga = torch.autograd.grad((y.double() * gy).sum() + state["W"].double().sum(), [leaves[n] for n in names])
    gb = torch.autograd.grad((yr * gy).sum() + sr["W"].sum(), [rl[n] for n in names])
    for n, a, b in zip(names, ga, gb):
        assert rel(a, b) < TOL_FP32, n


# ----------------------------------------------------------------------------- recurrent kernel
@pytest.mark.parametrize("retention", ["none", "decay", "lq", "kl"])
@pytest.mark.parametrize("learner", ["gd", "momentum"])
def test_recurrent_matches_token_loop(retention, learner):
    bias = {"none": "l2", "decay": "huber", "lq": "lp", "kl": "dot"}[retention]
    spec = MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner)
    x = make_inputs(2, 11, 2, 16, 32)
    if retention == "kl":
        x["v"] = x["v"].abs()
    for C in (1, 4):
        with torch.no_grad():
            _, y, state = run_kernel(fused_recurrent_miras_linear, spec, C, x, torch.float32, grad=False)
        _, yr, Xr, Sr = run_reference(spec, C, x, torch.float32)
        tol = TOL_HUBER_FP32 if bias == "huber" else TOL_FP32
        assert rel(y, yr) < tol and rel(state["W"], Xr) < tol, (C, rel(y, yr), rel(state["W"], Xr))
        if learner == "momentum":
            assert rel(state["S_W"], Sr) < tol


def test_recurrent_varlen_and_decode_steps_match_one_call():
    """Decoding one token per call with the carried state equals one call over the sequence."""
    spec = MirasSpec.preset("gated_delta")
    x = make_inputs(1, 9, 2, 32, 32, n_state=2)
    cu = torch.tensor([0, 4, 9], device=DEV)
    with torch.no_grad():
        _, y_all, st_all = run_kernel(fused_recurrent_miras_linear, spec, 1, x, torch.float32, cu_seqlens=cu, grad=False)
        _, yr, Xr, _ = run_reference(spec, 1, x, torch.float32, cu_seqlens=cu)
        assert rel(y_all, yr) < TOL_FP32 and rel(st_all["W"], Xr) < TOL_FP32
        state = {"W": x["W0"][:1]}
        ys = []
        for t in range(4):
            y, state = fused_recurrent_miras_linear(
                x["q"][:, t:t + 1], x["k"][:, t:t + 1], x["v"][:, t:t + 1], x["alpha"][:, t:t + 1],
                x["eta"][:, t:t + 1], spec=spec, initial_state=state, output_final_state=True)
            ys.append(y)
    assert rel(torch.cat(ys, 1), y_all[:, :4]) < TOL_FP32 and rel(state["W"], st_all["W"][:1]) < TOL_FP32


def test_recurrent_refuses_autograd():
    spec = MirasSpec.preset("deltanet")
    x = make_inputs(1, 3, 1, 16, 16)
    with pytest.raises(ValueError, match="forward-only"):
        fused_recurrent_miras_linear(x["q"].requires_grad_(), x["k"], x["v"], None, x["eta"], spec=spec)


# ----------------------------------------------------------------------------- dispatch & inputs
def test_supports_names_the_reason():
    q = torch.zeros(1, 4, 1, 32, device=DEV)
    assert miras_kernels.supports(MirasSpec.preset("gated_delta"), q, chunk_size=16) == (True, "")
    titans = MirasSpec.preset("titans")
    # memory='mlp' is decided by the same supports(), with the MLP family's rules and config table
    assert miras_kernels.supports(titans, q, chunk_size=16) == (
        False, "memory='mlp' needs initial_state (the model's learned initial weights)")
    assert miras_kernels.supports(titans, q, chunk_size=16, initial_state={}) == (True, "")
    for ret in ("lq", "kl"):
        assert miras_kernels.supports(MirasSpec(memory="linear", retention=ret), q, chunk_size=16) == (True, "")
    for spec, kw, word in [
        (MirasSpec.preset("deltanet"), dict(chunk_size=8), "chunk_size"),
        (MirasSpec(memory="linear", retention="kl"), dict(chunk_size=24), "chunk_size"),
    ]:
        ok, reason = miras_kernels.supports(spec, q, **{"chunk_size": 16, **kw})
        assert not ok and word in reason
    ok, reason = miras_kernels.supports(MirasSpec.preset("deltanet"), q.double(), chunk_size=16)
    assert not ok and "float64" in reason
    ok, reason = miras_kernels.supports(MirasSpec.preset("deltanet"), torch.zeros(1, 4, 1, 256, device=DEV), chunk_size=16)
    assert not ok and "128" in reason
    assert miras_kernels.supports(MirasSpec(memory="linear", retention="kl"), q, kernel="recurrent")[0]


def test_supports_covers_the_whole_grid():
    """Every chunk size 16/32/64 x head dims dk, dv in {32, 64, 128} (and odd dims below 128) x
    bias x retention x learner runs on the chunk kernels (no fallback)."""
    for bias in ("dot", "l2", "lp", "huber"):
        for retention in ("none", "decay", "lq", "kl"):
            for learner in ("gd", "momentum"):
                spec = MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner)
                for C in (16, 32, 64):
                    for dk in (32, 64, 128, 20, 96):
                        for dv in (32, 64, 128, 48):
                            ok, reason = miras_kernels.supports(spec, torch.zeros(1, 4, 1, dk, device=DEV), None, torch.zeros(1, 4, 1, dv, device=DEV),
                                                          chunk_size=C)
                            assert ok, (spec, C, dk, dv, reason)


@pytest.mark.parametrize("learner,C,d", [("gd", 64, 128), ("momentum", 32, 64)])
def test_supports_refuses_unshipped_configs(learner, C, d, monkeypatch):
    """A shape whose config is not in the shipped table falls back, naming the config table
    (here the table is emptied of that chunk size; the shipped table covers every chunk size)."""
    over = {} if learner == "gd" else dict(chunk_rule="minibatch", step_at="previous")  # momentum: mini-batch GD
    spec = MirasSpec.preset("gated_delta", learner=learner, **over)
    assert miras_kernels.supports(spec, torch.zeros(1, 4, 1, d, device=DEV), chunk_size=C) == (True, "")
    monkeypatch.setattr(configs, "LINEAR_SHIPPED", tuple(c for c in configs.LINEAR_SHIPPED if c.BT != C))
    ok, reason = miras_kernels.supports(spec, torch.zeros(1, 4, 1, d, device=DEV), chunk_size=C)
    assert not ok and "spill-free" in reason and "configs.py" in reason
    with pytest.raises(ValueError, match="spill-free"):
        x = make_inputs(1, 4, 1, d, d)
        chunk_miras_linear(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=spec,
                           chunk_size=C, mu=x["mu"])


def test_bad_inputs_raise_one_clear_error():
    spec = MirasSpec.preset("gated_delta")
    x = make_inputs(2, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="B == 1"):
        chunk_miras_linear(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=spec, chunk_size=16,
                           cu_seqlens=torch.tensor([0, 8], device=DEV))
    with pytest.raises(ValueError, match="alpha"):
        chunk_miras_linear(x["q"], x["k"], x["v"], None, x["eta"], spec=spec, chunk_size=16)
    with pytest.raises(ValueError, match="chunk_size=24"):
        chunk_miras_linear(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=MirasSpec(memory="linear", retention="kl"),
                           chunk_size=24)


@pytest.mark.parametrize("retention", ["decay", "kl"])
def test_omitted_momentum_state_starts_at_zero(retention):
    """Same input contract on every backend: an initial_state without its momentum key ``S_W``
    starts the momentum at zero on the kernels too (backend="auto" on CUDA behaves like on CPU):
    equal to the chunked path given the same dict, and to the kernels given explicit zeros."""
    spec = MirasSpec(memory="linear", bias="l2", retention=retention, learner="momentum")
    x = make_inputs(1, 20, 2, 32, 32)
    args = (x["q"], x["k"], x["v"], x["alpha"], x["eta"])
    kw = dict(spec=spec, chunk_size=16, mu=x["mu"], output_final_state=True)
    y, st = chunk_miras_linear(*args, initial_state={"W": x["W0"]}, **kw)
    y_ref, st_ref = miras_memory(*args, initial_state={"W": x["W0"]}, backend="chunked", **kw)
    y_zero, st_zero = chunk_miras_linear(*args, initial_state={"W": x["W0"], "S_W": torch.zeros_like(x["S0"])}, **kw)
    assert rel(y, y_ref) < TOL_FP32 and rel(st["W"], st_ref["W"]) < TOL_FP32 and rel(st["S_W"], st_ref["S_W"]) < TOL_FP32
    assert torch.equal(y, y_zero) and torch.equal(st["S_W"], st_zero["S_W"])
    with torch.no_grad():
        y_dec, _ = fused_recurrent_miras_linear(*args, spec=spec, chunk_size=16, mu=x["mu"], initial_state={"W": x["W0"]})
    assert rel(y_dec, y_ref) < TOL_FP32


# ----------------------------------------------------------------------------- structural checks
# this family's sources and the shared helpers (kernels/miras_mlp is another family with its own checks)
KERNEL_SOURCES = sorted([*(ROOT / "kernels" / "common").rglob("*.py"), *(ROOT / "kernels" / "miras_linear").rglob("*.py")])


def test_every_dot_goes_through_the_fp32_helper():
    """tl.dot appears only inside common/tiles.py:dot32, dot32 upcasts both operands and passes
    its DOT_PRECISION on, and every dot32 call of this family passes the kernel's DOT_PRECISION
    constexpr (filled by the host from miras_kernels.common.precision)."""
    calls = []
    for path in KERNEL_SOURCES:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr == "dot" and getattr(node.func.value, "id", "") == "tl"):
                        calls.append((path.name, fn.name, node))
    assert [(p, f) for p, f, _ in calls] == [("tiles.py", "dot32")]
    for arg in calls[0][2].args:
        assert isinstance(arg, ast.Call) and arg.func.attr == "to" and ast.unparse(arg.args[0]) == "tl.float32"
    assert [ast.unparse(kw) for kw in calls[0][2].keywords] == ["input_precision=DOT_PRECISION"]
    uses = []
    for path in KERNEL_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dot32":
                uses.append((path.name, node.lineno, [ast.unparse(a) for a in node.args[2:]]))
    assert len(uses) > 40
    assert [u for u in uses if u[2] != ["DOT_PRECISION"]] == []


def test_compiled_ttir_dots_are_fp32_and_at_least_16():
    """Compile the smallest chunk backward (bf16 inputs) for sm_90 and inspect every tt.dot."""
    code = (
        "import sys; sys.path.insert(0, 'tools'); import kernel_report as kr\n"
        "from miras_kernels.configs import KernelConfig\n"
        "r = kr.compile_one((KernelConfig('chunk_bwd_dqg', 16, 32, 32, 2, 1, 'momentum'), 'mom-huber', 90))\n"
        "print(r['dots'], repr(r['error']))\n"
        "assert kr.check_ttir_dots('%d = tt.dot %a, %b, %c : tensor<16x8xbf16> * tensor<8x16xbf16> -> tensor<16x16xf32>')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    dots, error = out.stdout.split(maxsplit=1)
    assert int(dots) >= 6 and "tt.dot" not in error


# ----------------------------------------------------------------------------- tools
@pytest.mark.slow
def test_kernel_report_compiles_every_shipped_config(tmp_path):
    """tools/kernel_report.py compiles every shipped config for sm_80 and sm_90 with no compile
    error, no spill, shared memory under the limit and fp32 dots >= 16 (exit 0)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import kernel_report

    from miras_kernels.configs import LINEAR_SHIPPED as SHIPPED

    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tools/kernel_report.py", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == sum(2 * len(kernel_report.variants_of(c)) for c in SHIPPED)
    assert {(r["kernel"], r["config"]) for r in rows} == {(c.kernel, c.label()) for c in SHIPPED}
    for r in rows:
        assert r["error"] == "" and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert r["arch"] in ("sm_80", "sm_90") and r["config"] in proc.stdout
        assert r["shared_bytes"] <= kernel_report.SHARED_LIMIT[int(r["arch"][3:])]
    print(f"kernel_report: {len(rows)} compiles in {time.time() - t0:.0f} s")


def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--quick", "--out", str(out)], cwd=ROOT,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["rows"]
    for r in data["rows"]:
        assert r["triton_ms"] > 0 and r["chunked_ms"] > 0 and r["max_rel_err"] < 1e-3
    assert "timed only where its output and final state equal miras_memory's" in proc.stdout  # bench_kernels.FLA_NOTE
