"""Context-parallel layout, slicing helper, validation and the one-rank path (no processes)."""

from __future__ import annotations

import pytest
import torch

from miras_pretrain.model import ModelConfig, build_model
from miras_pretrain.parallel.context_parallel import (
    ContextParallel, CPGroup, CPSlice, Segment, slice_batch_for_cp, validate_cp_model,
)
from miras_kernels import MirasSpec


def _packed(T=48, cu=(0, 13, 37, 38, 40, 48)):
    ids = torch.arange(T)[None] % 50
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "extra": 7}


def test_slice_packed_batch_crossing_boundaries():
    b = _packed()
    parts = [slice_batch_for_cp(b, r, 4, chunk_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), b["input_ids"])
    assert torch.equal(torch.cat([p["labels"] for p in parts], 1), b["labels"])
    # documents [0,13) [13,37) [37,38) [38,40) [40,48) cut at 12, 24, 36
    assert [p["cu_seqlens"].tolist() for p in parts] == [[0, 12], [0, 1, 12], [0, 12], [0, 1, 2, 4, 12]]
    assert parts[1]["cp_slice"].segments() == [Segment(0, 1, 0, True, False), Segment(1, 12, 13, False, True)]
    assert parts[2]["cp_slice"].segments() == [Segment(0, 12, 13, True, True)]
    assert parts[0]["extra"] == 7
    assert sum(p["cp_loss_scale"] for p in parts) == pytest.approx(1.0)
    assert parts[3]["cp_loss_scale"] == pytest.approx(11 / 47)  # 12 tokens, the last label ignored
    # document positions restart at document starts, also across ranks
    assert parts[2]["cp_slice"].positions().tolist() == list(range(11, 23))
    assert parts[3]["cp_slice"].positions().tolist() == [23, 0, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7]


def test_slice_dense_batch():
    ids = torch.arange(64).view(2, 32)
    out = slice_batch_for_cp({"input_ids": ids, "labels": ids}, 1, 2)
    assert torch.equal(out["input_ids"], ids[:, 16:]) and "cu_seqlens" not in out
    lay = out["cp_slice"]
    assert lay.segments() == [Segment(0, 16, 0, True, False)] and lay.positions().tolist() == list(range(16, 32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(cp_rank=0, cp_size=5), "not divisible by context_parallel_size=5"),
    (dict(cp_rank=0, cp_size=4, chunk_size=8), "not a multiple of the model's chunk_size=8"),
    (dict(cp_rank=4, cp_size=4), "need 0 <= cp_rank < cp_size"),
])
def test_slice_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slice_batch_for_cp(_packed(T=48), **kwargs)


def test_slice_rejects_bad_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        slice_batch_for_cp(_packed(cu=(0, 13, 47)), 0, 2)


def test_validate_cp_model():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, layer_pattern="MAT", window=16, chunk_size=4)
    validate_cp_model(cfg, 64, 4)
    with pytest.raises(ValueError, match="window - 1 <= 8"):
        validate_cp_model(cfg, 32, 4)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        validate_cp_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, activation_checkpointing=True), 256, 2)


def test_scheme_choice():
    cp = ContextParallel(CPGroup([0]))
    assert cp.scheme_for(MirasSpec.preset("gated_delta")) == "all_gather"
    assert cp.scheme_for(MirasSpec.preset("titans")) == "state_passing"
    with pytest.raises(ValueError, match="needs an affine memory"):
        ContextParallel(CPGroup([0]), "all_gather").scheme_for(MirasSpec.preset("moneta"))
    with pytest.raises(ValueError, match="scheme='ring' is not valid"):
        ContextParallel(CPGroup([0]), "ring")


@pytest.mark.parametrize("preset, scheme", [("titans", "auto"), ("gated_delta", "all_gather")])
def test_one_rank_group_equals_plain_model(preset, scheme):
    """A CP group of one runs the CP code path (fragments, tails, probe + fold) with no messages
    and must give exactly the plain model's loss and gradients (fp32, 1e-6)."""
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32, layer_pattern="MAT",
                      miras={"preset": preset}, chunk_size=4, gate_rank=4, window=5, eta_max=0.1, backend="chunked")
    torch.manual_seed(0)
    model = build_model(cfg)
    b = _packed(T=24, cu=(0, 5, 15, 24))
    ref = model(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cp = ContextParallel(CPGroup([0]), scheme)
    local = slice_batch_for_cp(b, 0, 1, chunk_size=4)
    with cp.batch(local["cp_slice"]) as ctx:
        assert cp.active is ctx is not None
        loss = model(local["input_ids"], labels=local["labels"], cu_seqlens=local["cu_seqlens"], cp=ctx) * local["cp_loss_scale"]
    assert cp.active is None
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-6, atol=1e-6, msg=n)
    assert cp.stats.messages == 0 and cp.stats.tokens == 24 * 1
    # a layout for another rank is refused
    with pytest.raises(ValueError, match="this process is rank 0 of a CP group of 1"):
        with cp.batch(CPSlice(1, 2, 24)):
            pass
