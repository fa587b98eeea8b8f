"""Multi-process training vs one process: ZeRO 1/2/3 on 2 ranks, TP 2 x DP 2, PP 2.

Every layout sees the same global batches (the loader hands data-parallel ranks disjoint
slices of one global order) and starts from the same weights, so the logged per-step losses
must match the single-process run. Tolerance: rel 2e-4 -- fp32 reductions run in a different
order (gradient all-reduce / reduce-scatter, TP partial sums), which moves the 4th-6th digit
after a few AdamW steps. The consolidated fp32 weights of each layout's final checkpoint must
match the single-process weights too (tools/consolidate.py path).
"""

from __future__ import annotations

import pytest
import torch

from miras_pretrain.testing import tiny_training

pytestmark = pytest.mark.distributed

STEPS = 4
REL = 2e-4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _run(tmp, corpus, *, nproc, micro, ga=1, parallel=None, **train):
    out = tmp / "run"
    cfg = tiny_training.tiny_run_config(
        out, corpus, steps=STEPS, micro_batch_size=micro,
        train={"grad_accum_steps": ga, **train}, parallel=parallel or {},
        eval={"interval": 0, "batches": 2, "at_start": False},
        checkpoint={"interval": 0, "keep_last": 1, "save_at_end": True},
    )
    path = tiny_training.write_config(tmp / "c.yaml", cfg)
    proc = tiny_training.run_train(path, tmp, nproc=nproc, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return tiny_training.step_losses(out), tiny_training.step_losses(out, "val/loss"), out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    from miras_pretrain.train.consolidate import consolidate_checkpoint

    losses, val, out = _run(tmp_path_factory.mktemp("ref"), corpus, nproc=1, micro=2)
    return losses, val, consolidate_checkpoint(out / "checkpoints")


def _check(result, reference, weights_atol=5e-4):
    from miras_pretrain.train.consolidate import consolidate_checkpoint

    losses, val, out = result
    ref_losses, ref_val, ref_sd = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in ref_losses:
        assert losses[s] == pytest.approx(ref_losses[s], rel=REL), (s, losses, ref_losses)
    assert val[STEPS] == pytest.approx(ref_val[STEPS], rel=REL)
    sd = consolidate_checkpoint(out / "checkpoints")
    assert sorted(sd) == sorted(ref_sd)
    for k in ref_sd:
        assert sd[k].dtype == torch.float32 and sd[k].shape == ref_sd[k].shape, k
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=weights_atol, msg=k)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_ranks_match_single_process(tmp_path, corpus, reference, stage):
    _check(_run(tmp_path, corpus, nproc=2, micro=1, zero_stage=stage), reference)


def test_tensor_parallel_2_x_data_parallel_2(tmp_path, corpus, reference):
    _check(_run(tmp_path, corpus, nproc=4, micro=1, parallel={"tensor_parallel_size": 2}, zero_stage=1), reference)


def test_pipeline_parallel_2(tmp_path, corpus, reference):
    # one pipeline, two micro-batches of 1 per step = the reference's batch of 2
    _check(_run(tmp_path, corpus, nproc=2, micro=1, ga=2, parallel={"pipeline_parallel_size": 2}, zero_stage=1), reference)
