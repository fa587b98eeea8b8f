"""Backend dispatch of ``miras_memory``: ``auto`` picks chunked on CPU, ``triton`` runs the
kernels (in the interpreter here) when they cover a call and otherwise falls back to the chunked
path with ONE warning naming why. Tolerances: kernels vs chunked in fp32, 1e-4 relative (TF32 is
not in play in the interpreter, nor on a GPU under MIRAS_EXACT_FP32=1; with TF32 dots 3e-2); the kernels'
own tests state finer per-output bounds). Inputs run on ``test_device()``."""

import sys
import warnings

import pytest
import torch

import miras_kernels.api as ops
from miras_pretrain.testing.devices import fp32_dots_exact, test_device as device_under_test
from miras_kernels import MirasSpec, miras_memory
from miras_kernels.pytorch.chunked import miras_memory_chunked


def _inputs(B=1, T=20, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H, generator=g)
    eta = 0.5 * torch.rand(B, T, H, generator=g)
    # drawn on the CPU, run on the test device (the GPU under MIRAS_TEST_DEVICE=cuda)
    return tuple(x.to(device_under_test()) for x in (q, k, v, alpha, eta))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_auto_on_cpu_is_the_chunked_path():
    assert ops.resolve_backend("auto", torch.device("cpu")) is miras_memory_chunked
    assert ops.resolve_backend("auto", torch.device("cuda")) is not miras_memory_chunked


@pytest.mark.triton
@pytest.mark.parametrize("retention", ["decay", "lq", "kl"])
def test_triton_backend_runs_kernels_and_matches_chunked(monkeypatch, retention):
    # lq / kl have no exact chunk form: mini-batch GD, as the Triton linear kernels compute it
    over = {} if retention == "decay" else dict(chunk_rule="minibatch", step_at="previous")
    spec = MirasSpec.preset("gated_delta", retention=retention, **over)
    q, k, v, alpha, eta = _inputs()
    ok, reason = __import__("miras_kernels").supports(spec, q, k, v, chunk_size=16)
    assert ok, reason
    called = {}
    import miras_kernels.miras_linear as kl

    real = kl.chunk_miras_linear

    def spy(*a, **kw):
        called["yes"] = True
        return real(*a, **kw)

    monkeypatch.setattr(kl, "chunk_miras_linear", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a covered call must not warn
        y, st = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, backend="triton",
                             output_final_state=True)
    y_ref, st_ref = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, backend="chunked",
                                 output_final_state=True)
    assert called.get("yes"), "backend='triton' did not reach the linear chunk kernel"
    tol = 1e-4 if fp32_dots_exact() else 3e-2   # TF32 dots: tests/test_kernels_mlp.py's TF32_TOL
    assert _rel(y, y_ref) < tol
    assert _rel(st["W"], st_ref["W"]) < tol


@pytest.mark.triton
def test_uncovered_spec_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned_fallbacks", set())
    spec = MirasSpec(memory="linear", bias="l2", retention="lq")
    q, k, v, alpha, eta = _inputs()
    with pytest.warns(RuntimeWarning, match="chunk_size=8") as record:
        y1, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=8, backend="triton")
        y2, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=8, backend="triton")
    assert len([w for w in record if "falling back" in str(w.message)]) == 1
    y_ref, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=8, backend="chunked")
    assert torch.equal(y1, y_ref) and torch.equal(y2, y_ref)


def test_missing_triton_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned_fallbacks", set())
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    spec = MirasSpec.preset("gated_delta")
    q, k, v, alpha, eta = _inputs()
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        y, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, backend="triton")
    y_ref, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, backend="chunked")
    assert torch.equal(y, y_ref)
