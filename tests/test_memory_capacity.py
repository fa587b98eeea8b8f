"""Every MLP-memory preset starts with an inner learning rate at which its memory can store
key-value pairs (docs/training_health.md section 5). Moneta's lq memory failed this at the old
default cap eta_max = 1.0 (0.00 of 8 pairs recalled at eta 0.5), and so recalled nothing on MQAR
(0.18 mean accuracy, where Titans reached 0.95)."""

from __future__ import annotations

import pytest

from miras_kernels.spec import MirasSpec
from miras_pretrain.evaluation.memory_capacity import write_read_accuracy
from miras_pretrain.model.config import ModelConfig

MLP_PRESETS = ["moneta", "yaad", "memora", "titans", "ttt_mlp"]


@pytest.mark.parametrize("preset", MLP_PRESETS)
@pytest.mark.parametrize("head_dim", [32, 64])
def test_initial_eta_lies_in_the_memorys_window(preset, head_dim):
    cfg = ModelConfig.from_dict({"miras": {"preset": preset}, "d_model": 2 * head_dim, "n_heads": 2})
    eta0 = cfg.eta_max / 2  # the eta gate starts at sigmoid(0) * eta_max
    acc = write_read_accuracy(cfg.spec, eta0, head_dim=head_dim, pairs=8, chunk_size=16)
    assert acc >= 0.4, f"{preset}: {acc:.2f} of 8 pairs recalled at its initial eta {eta0} (chance 0.125)"


def test_probe_separates_a_memory_that_cannot_store():
    """The probe itself: Moneta written at the old initial eta loses every pair; a linear delta
    rule (no LayerNorm, exact per-token rule) keeps nearly all of them even at eta 1 (a full
    overwrite per key: only the crosstalk of 8 random keys in 32 dimensions is lost)."""
    assert write_read_accuracy(MirasSpec.preset("moneta"), 0.5) < 0.1
    assert write_read_accuracy(MirasSpec.preset("moneta"), 0.0015) > 0.9
    assert write_read_accuracy(MirasSpec.preset("deltanet"), 1.0, chunk_size=1) >= 0.99
