"""Single-process training through the DeepSpeed engine: metrics, W&B offline read-back,
checkpoint layout and retention, and the non-finite path (skip, count, log, abort)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.config import config_from_dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _train(cfg_dict):
    from miras_pretrain.train.trainer import train

    return train(config_from_dict(cfg_dict), quiet=True)


def test_run_metrics_wandb_and_checkpoints(tmp_path, corpus):
    from miras_pretrain.train.checkpoint import complete_checkpoints, read_meta
    from miras_pretrain.train.wandb_reader import find_run_files, read_config, read_history

    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(
        out, corpus, steps=6,
        eval={"interval": 3, "batches": 2, "at_start": True},
        checkpoint={"interval": 2, "keep_last": 2},
        log={"interval": 1, "progress_bar": False, "wandb": True, "wandb_mode": "offline"},
    )
    res = _train(cfg)
    assert res.exit_code == 0 and res.reason == "done" and res.step == 6
    # validation at the start, every 3 steps and at the end; it must go down on this corpus
    assert [s for s, _ in res.val_history] == [0, 3, 6]
    assert res.val_history[-1][1] < res.val_history[0][1]

    # checkpoints: keep_last=2 of (2, 4, 6); `latest` names the newest; no temp debris
    ckpts = complete_checkpoints(out / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    meta = read_meta(ckpts[-1][1])
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["zero_stage"] == 1
    assert (ckpts[-1][1] / "trainer_state_rank0.pt").is_file()
    assert (out / "loss_curve.png").stat().st_size > 1000

    # metrics.jsonl: one train row per step with every documented metric
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train_rows) == [1, 2, 3, 4, 5, 6]
    for key in ("train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "train/skipped_steps", "mem/cpu_max_rss_gib"):
        assert all(key in r for r in train_rows.values()), key
    assert any(k.startswith("memory/layer0/") for k in train_rows[6]), sorted(train_rows[6])
    assert all(0 < r["train/mfu"] < 1 for r in train_rows.values())
    # warmup (2 steps) then cosine: the lr after step 1 is larger than after step 6
    assert train_rows[1]["train/lr"] > train_rows[6]["train/lr"] > 0

    # W&B offline run under <out_dir>/wandb: read the .wandb file back and compare series
    files = find_run_files(out)
    assert len(files) == 1, files
    history = read_history(files[0])
    wb_loss = {int(h["_step"]): h["train/loss"] for h in history if "train/loss" in h}
    assert wb_loss == pytest.approx({s: r["train/loss"] for s, r in train_rows.items()}, rel=1e-12)
    wb_val = {int(h["_step"]): h["val/loss"] for h in history if "val/loss" in h}
    assert wb_val == pytest.approx(dict(res.val_history), rel=1e-12)
    assert all("train/lr" in h for h in history if "train/loss" in h)
    config = read_config(files[0])
    assert config["train"]["lr"] == pytest.approx(3e-3)
    assert res.wandb_dir and Path(res.wandb_dir).is_dir()


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(out, corpus, steps=5, debug={"nan_loss_steps": [3]},
                                  checkpoint={"interval": 0, "keep_last": 1})
    res = _train(cfg)
    assert res.exit_code == 0 and res.skipped_steps == 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    flagged = [r["step"] for r in rows if r.get("train/nonfinite") == 1]
    assert flagged == [3]
    finals = {r["step"]: r for r in rows if "train/loss" in r}
    assert finals[5]["train/skipped_steps"] == 1
    assert all(math.isfinite(r["train/loss"]) for s, r in finals.items() if s != 3)
    # the final checkpoint holds finite weights
    sd = torch.load(res.checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.isfinite(t).all() for t in sd.values())


def test_consecutive_nonfinite_steps_abort(tmp_path, corpus):
    from miras_pretrain.train.signals import EXIT_NONFINITE

    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(out, corpus, steps=8, debug={"nan_loss_steps": [3, 4, 5, 6]},
                                  train={"max_consecutive_skips": 3},
                                  checkpoint={"interval": 1, "keep_last": 10})
    res = _train(cfg)
    assert res.exit_code == EXIT_NONFINITE and res.reason == "nonfinite"
    assert res.step == 5 and res.skipped_steps == 3
    assert "max_consecutive_skips=3" in res.message
    # the aborting step wrote no checkpoint
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert names[-1] == "step_00000004"


def test_refuses_to_checkpoint_nonfinite_weights(tmp_path):
    from miras_pretrain.train import dist as mdist
    from miras_pretrain.train.checkpoint import CheckpointManager, complete_checkpoints
    from miras_pretrain.train.engine import build_engine

    cfg = config_from_dict({"train": {"max_steps": 2, "warmup_steps": 0}})
    dev = torch.device("cpu")
    mdist.init_distributed(dev)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        engine, _ = build_engine(model, cfg, dev)
        mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
        mgr.save(engine, 1, {"step": 1}, {"world_size": 1})
        with torch.no_grad():
            engine.module[0].weight[0, 0] = float("nan")
        with pytest.raises(RuntimeError, match="NaN/Inf"):
            mgr.save(engine, 2, {"step": 2}, {"world_size": 1})
        assert [s for s, _ in complete_checkpoints(tmp_path / "ck")] == [1]
        assert (tmp_path / "ck" / "latest").read_text() == "step_00000001"
    finally:
        mdist.destroy()


def test_time_limit_evaluates_checkpoints_and_requests_requeue(tmp_path, corpus):
    from miras_pretrain.train.signals import EXIT_REQUEUE

    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(out, corpus, steps=50, train={"time_limit_minutes": 0.0001},
                                  eval={"interval": 0, "batches": 1, "at_start": False})
    res = _train(cfg)
    assert res.exit_code == EXIT_REQUEUE and res.reason == "time_limit"
    assert res.step == 1 and [s for s, _ in res.val_history] == [1]
    assert res.checkpoint is not None and (res.checkpoint / "meta.json").is_file()
