"""Context parallelism in the trainer: real ``train`` runs (gloo, CPU) vs one process.

The ranks of a CP group read the same micro-batches (the loader shards by the DP rank only)
and each runs its slice of the sequence; the losses (sum of the CP shares, mean over DP), the
validation loss and the consolidated final weights must equal the single-process run's.
Tolerance: rel 2e-4 on losses (as tests/test_train_distributed.py: fp32 reductions in another
order -- gradient all-reduce over DP x CP, the CP state fold, TP partial sums -- move the 4th-6th
digit after a few AdamW steps); 5e-4 absolute on the consolidated weights. Measured here:
differences of ~1e-7 relative on the losses, <= 1.2e-6 on the weights.

Cases: CP 2 with gated_delta (all-gather scheme) incl. cp/* metrics, checkpoint metadata and
exact resume; CP 2 with a Titans + sliding-window hybrid on packed documents crossing the CP
boundary (state passing); CP 2 with DeltaNet on packed documents (state passing); DP 2 x CP 2 with ZeRO-2, CP 2 x TP 2 and CP 2 x PP 2 (4 ranks, Titans,
dense rows); the configuration errors (one line naming the key).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from miras_pretrain.testing import tiny_training

pytestmark = pytest.mark.distributed

STEPS = 4
REL = 2e-4
SEQ = 32  # tiny corpus rows; chunk 8 -> 16 tokens (2 chunks) per CP rank
GATED_DELTA = dict(tiny_training.TINY_MODEL)
TITANS = dict(tiny_training.TINY_MODEL, miras={"preset": "titans"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"), seq_len=SEQ)


def _config(out, corpus, *, model, micro=2, ga=1, cp=1, scheme="auto", train=None, checkpoint=None,
            layout="packed", parallel=None):
    return tiny_training.tiny_run_config(
        out, corpus, steps=STEPS, micro_batch_size=micro, seq_len=SEQ, model=model, layout=layout,
        train={"grad_accum_steps": ga, **(train or {})},
        parallel={"context_parallel_size": cp, "context_parallel_scheme": scheme, **(parallel or {})},
        eval={"interval": 0, "batches": 2, "at_start": False},
        checkpoint={"interval": 0, "keep_last": 2, "save_at_end": True, **(checkpoint or {})},
    )


def _run(tmp, corpus, *, nproc, name="run", extra=None, **kw):
    out = tmp / name
    path = tiny_training.write_config(tmp / f"{name}.yaml", _config(out, corpus, **kw))
    proc = tiny_training.run_train(path, tmp, nproc=nproc, extra=extra, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


def _result(out):
    from miras_pretrain.train.consolidate import consolidate_checkpoint

    return tiny_training.step_losses(out), tiny_training.step_losses(out, "val/loss"), consolidate_checkpoint(out / "checkpoints")


def _check(out, reference):
    losses, val, sd = _result(out)
    ref_losses, ref_val, ref_sd = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in ref_losses:
        assert losses[s] == pytest.approx(ref_losses[s], rel=REL), (s, losses, ref_losses)
    assert val[STEPS] == pytest.approx(ref_val[STEPS], rel=REL)
    assert sorted(sd) == sorted(ref_sd)
    for k in ref_sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=5e-4, msg=k)


@pytest.fixture(scope="module")
def ref_gated_delta(tmp_path_factory, corpus):
    return _result(_run(tmp_path_factory.mktemp("ref_gd"), corpus, nproc=1, model=GATED_DELTA))


@pytest.fixture(scope="module")
def ref_titans(tmp_path_factory, corpus):
    return _result(_run(tmp_path_factory.mktemp("ref_titans"), corpus, nproc=1, model=TITANS))


def _metric_rows(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if "train/loss" in r]


def test_cp2_all_gather_matches_cp1_metrics_and_resume(tmp_path, corpus, ref_gated_delta):
    from miras_pretrain.train.checkpoint import check_resume_layout, read_meta

    out = _run(tmp_path, corpus, nproc=2, model=GATED_DELTA, cp=2, scheme="all_gather",
               checkpoint={"interval": 2})
    _check(out, ref_gated_delta)
    # metrics: every logged step has the cp/* keys with sane values
    rows = _metric_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["cp/tokens"] == r["cp/tokens_max"] == 2 * SEQ / 2  # micro 2 x 32 tokens / CP 2
        assert r["cp/layer_tokens"] == 2 * SEQ / 2 * GATED_DELTA["n_layers"]
        assert r["cp/wait_s"] == 0.0 and r["cp/wait_s_mean"] == 0.0  # the all-gather scheme never waits
        assert r["cp/comm_s"] > 0 and r["cp/bytes_sent"] > 0 and r["cp/messages"] > 0
        assert 0.0 <= r["cp/wait_frac"] <= 1.0
    # checkpoints record the CP layout; a different CP size is refused in one line
    meta = read_meta(out / "checkpoints" / "step_00000002")
    assert meta["cp"] == 2 and meta["cp_scheme"] == "all_gather" and meta["dp"] == 1
    mine = {k: meta[k] for k in ("world_size", "tp", "pp", "cp", "zero_stage")}
    check_resume_layout(meta, mine, "ckpt")
    with pytest.raises(ValueError, match=r"cp=2 but this run has cp=1 \(parallel.context_parallel_size\)") as err:
        check_resume_layout(meta, {**mine, "cp": 1}, "ckpt")
    assert "\n" not in str(err.value)
    # resume from step 2 (a new run directory): steps 3 and 4 repeat the uninterrupted run
    resumed = _run(tmp_path, corpus, nproc=2, name="resumed", model=GATED_DELTA, cp=2, scheme="all_gather",
                   extra=["--resume", str(out / "checkpoints" / "step_00000002")])
    got, want = tiny_training.step_losses(resumed), tiny_training.step_losses(out)
    assert sorted(got) == [3, 4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), (s, got, want)


def test_cp2_state_passing_packed_documents_matches_cp1(tmp_path, tmp_path_factory):
    """Titans + sliding-window attention on the loader's ``documents`` layout: the micro-batch is
    packed into one [1, B*T] row whose documents cross the CP boundary (state passing with the
    carried tail tokens, conv and attention halos masked at document starts)."""
    docs = tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("docs_corpus"), seq_len=SEQ, layout="documents")
    model = dict(TITANS, layer_pattern="MA", window=8)
    # micro-batch 1: the CP boundary (token 16) then falls inside a row; with 2 rows it would be
    # the second row's start, where the loader's documents layout always starts a document
    ref = _result(_run(tmp_path, docs, nproc=1, name="ref", model=model, micro=1, layout="documents"))
    out = _run(tmp_path, docs, nproc=2, model=model, micro=1, cp=2, layout="documents")  # auto -> state passing
    _check(out, ref)
    rows = _metric_rows(out)
    for r in rows:
        assert r["cp/wait_s"] >= r["cp/wait_s_mean"] >= 0.0 and 0.0 <= r["cp/wait_frac"] < 1.0
        assert r["cp/tokens"] == SEQ / 2 and r["cp/messages"] > 0
    # rank 1 blocks on rank 0's state (forward) and rank 0 on rank 1's state gradient (backward)
    # whenever a document crosses the boundary (the data are fixed: it does in these steps)
    assert sum(r["cp/wait_s"] for r in rows) > 0


@pytest.mark.slow
def test_cp2_deltanet_state_passing_packed_documents_matches_cp1(tmp_path, tmp_path_factory):
    """DeltaNet (the exact delta rule, ``chunk_rule="exact"``) on packed documents crossing the CP
    boundary off the chunk grid, state passing: the carried grid-point state plus tail tokens
    reproduce the exact per-token rule (gated_delta covers the all-gather scheme above)."""
    docs = tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("dn_corpus"), seq_len=SEQ, layout="documents")
    model = dict(tiny_training.TINY_MODEL, miras={"preset": "deltanet"})
    ref = _result(_run(tmp_path, docs, nproc=1, name="ref", model=model, micro=1, layout="documents"))
    _check(_run(tmp_path, docs, nproc=2, model=model, micro=1, cp=2, scheme="state_passing", layout="documents"), ref)


def test_dp2_x_cp2_zero2_matches_single_process(tmp_path, corpus, ref_titans):
    # 2 data-parallel replicas x micro 1 = the reference's micro-batch of 2
    _check(_run(tmp_path, corpus, nproc=4, model=TITANS, micro=1, cp=2, train={"zero_stage": 2}), ref_titans)


def test_cp2_x_tp2_matches_single_process(tmp_path, corpus, ref_titans):
    _check(_run(tmp_path, corpus, nproc=4, model=TITANS, cp=2, parallel={"tensor_parallel_size": 2}), ref_titans)


def test_cp2_x_pp2_matches_single_process(tmp_path, corpus, ref_titans):
    # one pipeline, two micro-batches of 1 per step = the reference's batch of 2
    _check(_run(tmp_path, corpus, nproc=4, model=TITANS, micro=1, ga=2, cp=2, parallel={"pipeline_parallel_size": 2}),
           ref_titans)


# ------------------------------------------------------------------------------ bad configs
def _check_cfg(tmp_path, corpus, world=2, model=None, **kw):
    from miras_pretrain.train.config import config_from_dict, resolve_model_config
    from miras_pretrain.train.cp import check_cp_config

    raw = _config(tmp_path / "bad", corpus, model=model or TITANS, **kw)
    cfg = config_from_dict(raw)
    layout = cfg.data.get("layout", "packed")
    check_cp_config(cfg, resolve_model_config(cfg), int(cfg.data["seq_len"]), world, data_layout=layout)


@pytest.mark.parametrize("world, kw, needle", [
    (3, dict(cp=2), "config key 'parallel.context_parallel_size' = 2: the world size 3 is not a multiple"),
    (8, dict(cp=2, parallel={"tensor_parallel_size": 2, "pipeline_parallel_size": 4}), "= 2 x 4 x 2 = 16"),
    (2, dict(cp=2, model=dict(TITANS, chunk_size=32)), "config key 'data.seq_len' = 32 is not a multiple of"),
    (4, dict(cp=4, model=dict(TITANS, chunk_size=16)), "use a multiple of 64"),
    (2, dict(cp=2, scheme="all_gather"), "config key 'parallel.context_parallel_scheme' = 'all_gather' needs an affine"),
    (1, dict(cp=1, scheme="all_gather"), "use 'auto' or 'state_passing'"),
    (2, dict(cp=2, model=dict(TITANS, activation_checkpointing=True)), "config key 'model.activation_checkpointing'"),
    (2, dict(cp=2, train={"zero_stage": 3}), "config key 'train.zero_stage' = 3 is not supported"),
    (2, dict(cp=2, model=dict(TITANS, layer_pattern="MA", window=20)), "config key 'model.window' = 20"),
])
def test_bad_cp_config_is_one_line(tmp_path, corpus, world, kw, needle):
    with pytest.raises(ValueError) as err:
        _check_cfg(tmp_path, corpus, world=world, **kw)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_good_cp_configs_pass(tmp_path, corpus):
    _check_cfg(tmp_path, corpus, world=4, cp=2, parallel={"tensor_parallel_size": 2})
    _check_cfg(tmp_path, corpus, world=2, cp=2, model=GATED_DELTA, scheme="all_gather")
    _check_cfg(tmp_path, corpus, world=2, cp=2, scheme="state_passing")


def test_shipped_cp_example_config_validates():
    from pathlib import Path

    from miras_pretrain.train.config import load_config, resolve_data_config, resolve_model_config
    from miras_pretrain.train.cp import check_cp_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "cp2_moneta_tiny.yaml")
    assert cfg.parallel.context_parallel_size == 2
    data = resolve_data_config(cfg)
    for world in (2, 4):
        check_cp_config(cfg, resolve_model_config(cfg), data.seq_len, world, data_layout=data.layout)


def test_documents_layout_with_pipeline_is_refused(tmp_path, corpus):
    from miras_pretrain.train.config import config_from_dict, resolve_model_config
    from miras_pretrain.train.cp import check_cp_config

    cfg = config_from_dict(_config(tmp_path / "bad", corpus, model=TITANS, cp=2, parallel={"pipeline_parallel_size": 2}))
    with pytest.raises(ValueError, match="config key 'data.layout' = 'documents'"):
        check_cp_config(cfg, resolve_model_config(cfg), SEQ, 4, data_layout="documents")


@pytest.mark.parametrize("raw, needle", [
    ({"parallel": {"context_parallel_size": 0}}, "'parallel.context_parallel_size'"),
    ({"parallel": {"context_parallel_scheme": "ring"}}, "'parallel.context_parallel_scheme'"),
    ({"parallel": {"cp": 2}}, "'parallel.cp'"),
])
def test_parallel_section_validation(raw, needle):
    from miras_pretrain.train.config import config_from_dict

    with pytest.raises(ValueError, match=needle):
        config_from_dict(raw)


def test_cli_reports_cp_error_in_one_line(tmp_path, corpus):
    """A lone process with context_parallel_size 2: the CLI exits 2 with one line, before any
    process group or model is built."""
    path = tiny_training.write_config(tmp_path / "c.yaml", _config(tmp_path / "run", corpus, model=TITANS, cp=2))
    proc = subprocess.run([sys.executable, "-m", "miras_pretrain.cli", "train", "--config", str(path)],
                          env=tiny_training.child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "parallel.context_parallel_size" in l]
    assert len(lines) == 1 and "world size 1 is not a multiple" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
