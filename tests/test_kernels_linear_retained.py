"""Triton linear chunk kernels with ``step_at="retained"`` and ``chunk_rule="minibatch"`` (issue #17)
vs the project's float64 token loop (``kernels/pytorch/recurrent.py``, the definition).

Semantics (docs/semantics.md §6, "Where the step is taken"): token i of a chunk takes its inner
gradient at ``materialize(gamma_i X_{t0})``, gamma_i the in-chunk product of alpha; for decay and
lq that is a per-token multiple ``rho_i X_{t0}`` of the chunk-start state, which the kernels'
``RETAINED`` variant applies (``chunk_kernels.retained_scale``). kl (per-token softmax blocks) has
no kernel and falls back with its own reason.

Tolerances: those of ``tests/test_kernels_linear.py`` (relative Frobenius error vs float64, every
output and gradient): fp32 1e-4 (2e-2 on a GPU with TF32 dots), huber 2e-3. Measured in the
interpreter: <= 2e-6 for dot/l2/lp, <= 5e-6 for huber. Time: about 1-20 s per case on one CPU
core (interpreter), ~150 s for the file on an idle 2-core machine (two cases marked slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import miras_kernels
import miras_kernels.api as miras_api
from miras_kernels import MirasSpec, miras_memory
from miras_kernels.miras_linear import chunk_miras_linear
from miras_kernels.pytorch.recurrent import miras_memory_recurrent
from test_kernels_linear import DEV, TOL_FP32, TOL_HUBER_FP32, make_inputs, rel, used_names

pytestmark = pytest.mark.triton


def _spec(bias: str, retention: str, learner: str, step_at: str = "retained") -> MirasSpec:
    return MirasSpec(memory="linear", bias=bias, retention=retention, learner=learner, step_at=step_at)


def _outputs_and_grads(fn, spec, C, x, dtype, cu_seqlens=None) -> dict[str, torch.Tensor]:
    """y, final X (and S), and the gradient of every used leaf of a fixed random loss."""
    names = used_names(spec)
    leaves = {n: x[n].to(dtype).clone().requires_grad_() for n in names}
    init = {"W": leaves["W0"]}
    if spec.learner == "momentum":
        init["S_W"] = leaves["S0"]
    y, st = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("alpha"), leaves["eta"], spec=spec,
               chunk_size=C, delta=leaves.get("delta"), mu=leaves.get("mu"), initial_state=init,
               output_final_state=True, cu_seqlens=cu_seqlens)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEV)
    gw = torch.randn(st["W"].shape, generator=g, dtype=torch.float64).to(DEV)
    gs = torch.randn(st["W"].shape, generator=g, dtype=torch.float64).to(DEV)
    out = {"y": y, "W_T": st["W"]}
    loss = (y.double() * gy).sum() + (st["W"].double() * gw).sum()
    if spec.learner == "momentum":
        out["S_T"] = st["S_W"]
        loss = loss + (st["S_W"].double() * gs).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    out.update({"d" + n: t for n, t in zip(names, grads)})
    return out


def check_retained(spec, C, x, tol, cu_seqlens=None) -> dict[str, float]:
    """Triton (fp32) vs the float64 token loop: every output and gradient within ``tol``."""
    assert miras_kernels.supports(spec, x["q"], x["k"], x["v"], chunk_size=C) == (True, "")
    got = _outputs_and_grads(chunk_miras_linear, spec, C, x, torch.float32, cu_seqlens)
    ref = _outputs_and_grads(miras_memory_recurrent, spec, C, x, torch.float64, cu_seqlens)
    assert set(got) == set(ref)
    errs = {n: rel(got[n], ref[n]) for n in ref}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{spec} C={C}: relative errors over {tol}: {bad} (all: {errs})"
    return errs


def _lq_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """alpha in [0.6, 1] -> [0.9, 1] for lq. The retained lq weights ``g s(g X0)`` have the norm
    ``g n0 / (g n0 + eps)^(q-2)``, which peaks at ~``1 / (4 eps)`` (q = 4) where ``g n0 ~ eps``: with
    alpha down to 0.6 a 64-token chunk gets there (g ~ 1e-6) and the float64 token loop itself
    blows up (final state ~2e9 for lp), which fp32 cannot follow. That is the rule, not the kernel."""
    return 0.9 + 0.25 * (alpha - 0.6)


# (bias, retention, learner, C, dk, dv, T, B, H): decay and lq x every bias x both learners, chunk
# 16 and 64, T never a multiple of C; a few with several value blocks (dv 48: the lq norm and the
# per-value-block partial gradients), B or H > 1 for the offsets.
CASES = [
    ("dot", "decay", "gd", 16, 16, 16, 37, 1, 2),
    ("l2", "decay", "gd", 16, 16, 16, 37, 2, 1),
    ("lp", "decay", "gd", 64, 16, 16, 70, 1, 1),
    ("huber", "decay", "gd", 16, 32, 48, 37, 1, 1),
    ("dot", "decay", "momentum", 64, 16, 16, 67, 1, 1),
    ("l2", "decay", "momentum", 64, 32, 16, 70, 1, 1),
    ("lp", "decay", "momentum", 16, 16, 48, 35, 1, 1),
    ("huber", "decay", "momentum", 16, 16, 16, 37, 1, 2),
    ("dot", "lq", "gd", 16, 16, 16, 21, 1, 1),
    ("l2", "lq", "gd", 16, 16, 48, 23, 1, 1),
    ("lp", "lq", "gd", 64, 16, 16, 67, 1, 1),
    ("huber", "lq", "gd", 16, 16, 16, 21, 2, 1),
    ("dot", "lq", "momentum", 64, 16, 16, 67, 1, 1),
    ("l2", "lq", "momentum", 16, 16, 16, 23, 1, 2),
    ("lp", "lq", "momentum", 16, 32, 16, 21, 1, 1),
    # the largest case (lq's per-token sweeps over 64-token chunks): ~20 s on a loaded CPU core
    pytest.param("huber", "lq", "momentum", 64, 16, 16, 67, 1, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("bias,retention,learner,C,dk,dv,T,B,H", CASES)
def test_retained_minibatch_matches_token_loop(bias, retention, learner, C, dk, dv, T, B, H):
    x = make_inputs(B, T, H, dk, dv)
    # d mu = d(log mu) / mu: keep mu away from 0 (see test_kernels_linear.test_chunk_fp32_matches_token_loop)
    x["mu"] = x["mu"].clamp_min(0.05)
    if retention == "lq":
        x["alpha"] = _lq_alpha(x["alpha"])
    check_retained(_spec(bias, retention, learner), C, x, TOL_HUBER_FP32 if bias == "huber" else TOL_FP32)


@pytest.mark.slow  # ~20 s on a loaded CPU core (five documents, lq's per-token sweeps)
def test_retained_minibatch_varlen_matches_token_loop():
    """Packed documents (lengths 5, 23, 0, 1, 14) restart the chunks, gamma and the state (lq: the
    chunk-start q-norms are read per state slot, so the slot indexing of varlen is exercised)."""
    cu = torch.tensor([0, 5, 28, 28, 29, 43], dtype=torch.int32, device=DEV)
    x = make_inputs(1, 43, 1, 16, 16, n_state=5)
    x["alpha"] = _lq_alpha(x["alpha"])
    errs = check_retained(_spec("lp", "lq", "gd"), 16, x, TOL_FP32, cu_seqlens=cu)
    assert set(errs) >= {"y", "W_T", "dq", "dalpha", "dW0"}


@pytest.mark.parametrize("retention", ["decay", "lq"])
def test_retained_differs_from_previous(retention):
    """The check above can fail: on these inputs the two step orders differ by far more than the
    tolerance, and the kernel follows the retained one."""
    x = make_inputs(1, 37, 1, 16, 16)
    spec_r, spec_p = _spec("l2", retention, "gd"), _spec("l2", retention, "gd", step_at="previous")
    d = {n: t.double() for n, t in x.items()}
    with torch.no_grad():
        y_r, _ = chunk_miras_linear(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=spec_r, chunk_size=16,
                                    initial_state={"W": x["W0"]})
        ref = {s.step_at: miras_memory_recurrent(d["q"], d["k"], d["v"], d["alpha"], d["eta"], spec=s, chunk_size=16,
                                                 initial_state={"W": d["W0"]})[0] for s in (spec_r, spec_p)}
    assert rel(ref["previous"], ref["retained"]) > 100 * TOL_FP32
    assert rel(y_r, ref["retained"]) < TOL_FP32


def test_supports_retained_minibatch(monkeypatch):
    """decay and lq run on Triton in either step order; kl + retained (a state-dependent bias)
    falls back with its own reason, and miras_memory(backend="triton") then warns and computes it
    on the chunked path; with the dot bias the step order makes no difference, so kl runs."""
    q = torch.zeros(1, 4, 1, 32, device=DEV)
    for ret in ("decay", "lq"):
        for learner in ("gd", "momentum"):
            for C in (16, 32, 64):
                assert miras_kernels.supports(_spec("huber", ret, learner), q, chunk_size=C) == (True, "")
    ok, reason = miras_kernels.supports(_spec("l2", "kl", "gd"), q, chunk_size=16)
    assert not ok and "retention='kl' with step_at='retained'" in reason
    assert miras_kernels.supports(_spec("dot", "kl", "gd"), q, chunk_size=16) == (True, "")
    spec = _spec("l2", "kl", "gd")
    x = make_inputs(1, 5, 1, 16, 16)
    monkeypatch.setattr(miras_api, "_warned_fallbacks", set())  # the warning is once per reason and process
    with pytest.warns(RuntimeWarning, match="retention='kl' with step_at='retained'"):
        y, _ = miras_memory(x["q"], x["k"], x["v"], x["alpha"], x["eta"], spec=spec, chunk_size=16,
                            initial_state={"W": x["W0"]}, backend="triton")
    d = {n: t.double() for n, t in x.items()}
    yr, _ = miras_memory_recurrent(d["q"], d["k"], d["v"], d["alpha"], d["eta"], spec=spec, chunk_size=16,
                                   initial_state={"W": d["W0"]})
    assert rel(y, yr) < TOL_FP32


def test_unshipped_retained_configs_fall_back_on_gpu_and_leave_the_aot_report():
    """(learner, chunk) pairs in LINEAR_RETAINED_UNSHIPPED have no spill-free GPU config for the
    retained variants: they are not in the AOT report (so it can be 0 spills) and dispatch names the
    reason for CUDA tensors; every other pair keeps its retained variants in the report."""
    import sys

    from miras_kernels.configs import LINEAR_RETAINED_UNSHIPPED, LINEAR_SHIPPED, linear_retained_shipped

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import kernel_report

    assert ("momentum", 64) in LINEAR_RETAINED_UNSHIPPED and not linear_retained_shipped("momentum", 64)
    assert linear_retained_shipped("gd", 64) and linear_retained_shipped("momentum", 32)
    for cfg in LINEAR_SHIPPED:
        if cfg.kernel not in ("chunk_state", "chunk_bwd_dstate", "chunk_bwd_dkv", "chunk_bwd_dstate_mat"):
            continue
        has_ret = any(name.endswith("-ret") for name in kernel_report.variants_of(cfg))
        assert has_ret == linear_retained_shipped(cfg.learner, cfg.BT), (cfg.kernel, cfg.learner, cfg.BT)
