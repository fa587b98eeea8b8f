"""Long-sequence stability: bf16 inputs with the fp32 state stay finite over T = 4096 with
realistic gates (alpha = sigmoid in (0.9, 1), eta ~ 0.1, l2-normalised q/k), forward and
backward, on the chunked path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miras_kernels import MirasSpec, miras_memory
from miras_pretrain.testing.devices import test_device as device_under_test


@pytest.mark.parametrize("name", ["gated_delta", "moneta"])
def test_bf16_long_sequence_stays_finite(name):
    spec = MirasSpec.preset(name)
    B, T, H, D = 1, 4096, 2, 16
    g = torch.Generator().manual_seed(41)
    dev = device_under_test()   # drawn on the CPU, run on the test device (the GPU under MIRAS_TEST_DEVICE=cuda)
    q = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1).bfloat16().to(dev).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1).bfloat16().to(dev).requires_grad_()
    v = torch.randn(B, T, H, D, generator=g).bfloat16().to(dev).requires_grad_()
    alpha = (0.9 + 0.1 * torch.sigmoid(torch.randn(B, T, H, generator=g))).bfloat16().to(dev).requires_grad_()
    eta = (0.1 * torch.sigmoid(torch.randn(B, T, H, generator=g)) * 2).bfloat16().to(dev).requires_grad_()
    state = {n: (torch.randn(H, r, c, generator=g) / c**0.5).to(dev).requires_grad_()
             for n, (r, c) in spec.weight_shapes(D, D).items()}
    y, final = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=64, initial_state=state,
                            output_final_state=True)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, H, D)
    assert torch.isfinite(y.float()).all()
    for key, t in final.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), key
        # retention keeps the memory bounded: no blow-up over 4096 steps
        assert t.abs().max() < 1e3, (key, float(t.abs().max()))
    (y.float() * torch.randn(y.shape, generator=g).to(dev)).sum().backward()
    for t in (q, k, v, alpha, eta, *state.values()):
        assert t.grad is not None and torch.isfinite(t.grad.float()).all()
