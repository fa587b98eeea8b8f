"""Checkpoint directory logic: which checkpoint `--resume auto` picks, pruning, and the
resume layout check."""

from __future__ import annotations

import json

import pytest

from miras_pretrain.train.checkpoint import complete_checkpoints, find_latest, tag_for


def _fake(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def test_find_latest_ignores_partial_and_temp_dirs(tmp_path):
    assert find_latest(tmp_path / "missing") is None
    _fake(tmp_path, 100)
    _fake(tmp_path, 200)
    _fake(tmp_path, 300, complete=False)  # killed before meta.json
    (tmp_path / ".tmp-step_00000400").mkdir()  # killed mid-save
    (tmp_path / "latest").write_text("step_00000100")  # a pointer one save behind (kill before its update)
    assert find_latest(tmp_path).name == "step_00000100"  # followed: 200 could be another run's
    (tmp_path / "latest").write_text("step_00000300")  # dangling: names the partial directory
    assert find_latest(tmp_path).name == "step_00000200"
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [100, 200]


def test_resume_refuses_other_layout(tmp_path):
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.setup import ProcessLayout
    from miras_pretrain.train.trainer import Trainer

    ck = tmp_path / "run" / "checkpoints"
    d = _fake(ck, 10)
    (d / "meta.json").write_text(json.dumps({"step": 10, "world_size": 2, "tp": 1, "pp": 1, "dp": 2,
                                             "zero_stage": 1}))
    cfg = config_from_dict({"run": {"out_dir": str(tmp_path / "run")}})
    t = Trainer(cfg, resume="auto", quiet=True)
    t.layout = ProcessLayout(tp=1, pp=1, dp=1, dp_rank=0, world=1)
    t.is_main = True
    with pytest.raises(ValueError, match="world_size=2 but this run has world_size=1"):
        t._resume()


def test_resume_from_explicit_partial_dir_is_an_error(tmp_path):
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.setup import ProcessLayout
    from miras_pretrain.train.trainer import Trainer

    d = _fake(tmp_path / "ck", 5, complete=False)
    t = Trainer(config_from_dict({}), resume=str(d), quiet=True)
    t.layout = ProcessLayout(tp=1, pp=1, dp=1, dp_rank=0, world=1)
    t.is_main = True
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        t._resume()
