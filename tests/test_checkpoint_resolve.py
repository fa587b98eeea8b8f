"""``resolve_checkpoint``: every form a checkpoint can be named by (``auto``, ``latest``, a
``<root>/latest`` pointer, a checkpoints root, a step directory) and every one-line error, as
``--resume``, ``export hf --checkpoint`` and ``tools/consolidate.py`` all see them."""

from __future__ import annotations

import json

import pytest

from miras_pretrain.train.checkpoint import resolve_checkpoint, tag_for


def _fake(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


@pytest.fixture()
def root(tmp_path):
    """A checkpoints root with complete steps 10 and 20, a partial 30 and ``latest`` naming 10
    (20 may be another run's: a higher step that ``latest`` does not name is never taken)."""
    ck = tmp_path / "run" / "checkpoints"
    _fake(ck, 10)
    _fake(ck, 20)
    _fake(ck, 30, complete=False)
    (ck / "latest").write_text(tag_for(10))
    return ck


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_auto_and_latest_follow_the_pointer(root):
    assert resolve_checkpoint("auto", root=root) == root / tag_for(10)
    assert resolve_checkpoint("latest", root=root) == root / tag_for(10)
    (root / "latest").unlink()  # without a pointer: the newest complete one
    assert resolve_checkpoint("auto", root=root) == root / tag_for(20)


def test_auto_without_checkpoint_is_none(tmp_path):
    assert resolve_checkpoint("auto", root=tmp_path / "never-written") is None
    (tmp_path / "empty").mkdir()
    assert resolve_checkpoint("auto", root=tmp_path / "empty") is None


def test_latest_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint("latest", root=tmp_path, flag="--resume")
    msg = _one_line(err)
    assert msg.startswith("--resume latest:") and "no complete checkpoint" in msg and str(tmp_path) in msg
    assert "--resume auto" in msg  # the fix


@pytest.mark.parametrize("spec", ["auto", "latest"])
def test_keyword_without_root_is_an_error(spec):
    with pytest.raises(ValueError) as err:
        resolve_checkpoint(spec, flag="--checkpoint")
    msg = _one_line(err)
    assert msg.startswith(f"--checkpoint {spec} needs the run's checkpoints root")
    assert "<run>/checkpoints/latest" in msg


def test_pointer_path_is_followed(root):
    # <root>/latest names step 10; step 20 is complete and newer but not named by it
    assert resolve_checkpoint(root / "latest") == root / tag_for(10)
    assert resolve_checkpoint(str(root / "latest")) == root / tag_for(10)


def test_pointer_path_without_pointer_file(tmp_path):
    ck = tmp_path / "checkpoints"
    _fake(ck, 5)
    assert resolve_checkpoint(ck / "latest") == ck / tag_for(5)


def test_root_and_step_directory(root):
    assert resolve_checkpoint(root) == root / tag_for(10)
    assert resolve_checkpoint(root / tag_for(10)) == root / tag_for(10)
    assert resolve_checkpoint(str(root / tag_for(10))) == root / tag_for(10)


def test_missing_path(tmp_path):
    missing = tmp_path / "run" / "checkpoints" / tag_for(7)
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(missing, flag="--checkpoint")
    msg = _one_line(err)
    assert msg.startswith(f"--checkpoint {missing} does not exist") and "<run>/checkpoints/<step|latest>" in msg


def test_pointer_in_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(tmp_path / "nowhere" / "latest")
    msg = _one_line(err)
    assert f"checkpoint root {tmp_path / 'nowhere'} does not exist" in msg
    assert "<run>/checkpoints/<step|latest>" in msg


def test_pointer_in_root_without_complete_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    _fake(ck, 3, complete=False)
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(ck / "latest")
    msg = _one_line(err)
    assert f"no complete checkpoint (with meta.json) under {ck}" in msg and "train longer" in msg


def test_partial_step_directory(root):
    partial = root / tag_for(30)
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(partial, flag="--resume")
    msg = _one_line(err)
    assert msg.startswith(f"--resume {partial} is partial") and "no meta.json" in msg
    assert "pass a complete step_* directory" in msg


def test_file_or_empty_directory_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for p in (f, empty):
        with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
            resolve_checkpoint(p)


def test_trainer_resume_uses_it(tmp_path):
    """``--resume latest`` in the trainer: an error naming the flag when nothing was saved."""
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.trainer import Trainer

    t = Trainer(config_from_dict({"run": {"out_dir": str(tmp_path / "run")}}), resume="latest", quiet=True)
    t.is_main = True
    with pytest.raises(FileNotFoundError, match="^--resume latest: no complete checkpoint"):
        t._resume()
