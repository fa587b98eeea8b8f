"""Fault injection on checkpoints: flipped bytes, truncated and missing files, a dangling
``latest``, checkpoints without checksums, a full disk during a save, and pruning during a
non-finite streak.

The fast tests build checkpoints through the real :class:`CheckpointManager` with a stub engine
(it writes what DeepSpeed would: a model file and an optimizer file). The tiny-run tests train
real Moneta-family models in child processes and compare losses with an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    complete_checkpoints,
    resolve_checkpoint,
    tag_for,
)
from miras_pretrain.train.checkpoint_manifest import HASH_NAME, CheckpointCorrupt, file_digest, verify_checkpoint

MODEL_FILE = "mp_rank_00_model_states.pt"


class StubEngine:
    """What CheckpointManager needs of a DeepSpeed engine: ``module`` and ``save_checkpoint``."""

    def __init__(self, fail_with: BaseException | None = None, payload_bytes: int = 4096) -> None:
        self.module = torch.nn.Linear(4, 4)
        self.fail_with = fail_with
        self.payload_bytes = payload_bytes

    def save_checkpoint(self, root: str, tag: str, save_latest: bool = False) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, d / MODEL_FILE)
        if self.fail_with is not None:  # a write that dies half-way: a partial file is left behind
            (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 100)
            raise self.fail_with
        torch.save({"opt": torch.zeros(self.payload_bytes // 4)}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def _save(root: Path, step: int, *, streak: int = 0, keep_last: int = 10, engine=None) -> Path:
    mgr = CheckpointManager(root, keep_last)
    return mgr.save(engine or StubEngine(), step, {"step": step}, {"nonfinite_streak": streak})


def _flip(path: Path, offset_frac: float = 0.5, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_frac)
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture()
def three(tmp_path) -> Path:
    """A checkpoints root with verified steps 1, 2, 3 and ``latest`` naming 3."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    assert (root / "latest").read_text() == tag_for(3)
    return root


# ------------------------------------------------------------------ manifest and verification
def test_manifest_covers_every_file_and_verifies(three):
    meta = json.loads((three / tag_for(3) / "meta.json").read_text())
    assert set(meta["files"]) == {MODEL_FILE, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state_rank0.pt"}
    assert meta["hash"] == HASH_NAME == "xxh3_128"
    assert all(len(rec["digest"]) == 32 and rec["size"] > 0 for rec in meta["files"].values())
    assert verify_checkpoint(three / tag_for(3)) is True


def test_a_sha256_manifest_verifies_too(three):
    """Saves without xxhash record SHA-256; verification follows the manifest's algorithm."""
    ckpt = three / tag_for(3)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["hash"] = "sha256"
    meta["files"] = {rel: {"size": rec["size"], "digest": file_digest(ckpt / rel, "sha256")}
                     for rel, rec in meta["files"].items()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ckpt) is True
    _flip(ckpt / MODEL_FILE)
    with pytest.raises(CheckpointCorrupt, match="does not match its sha256 digest"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("fault,reason", [(_flip, "does not match its xxh3_128 digest"), (_truncate, "(truncated?)"),
                                          (Path.unlink, "is missing")])
def test_explicit_damaged_checkpoint_is_a_one_line_error_naming_the_file(three, fault, reason):
    bad = three / tag_for(3) / MODEL_FILE
    fault(bad)
    for spec in (three / tag_for(3), three / "latest", three):  # explicit step, pointer, root
        with pytest.raises(CheckpointCorrupt) as err:
            resolve_checkpoint(spec, flag="--checkpoint", report=lambda line: None)
        msg = _one_line(err)
        assert str(bad) in msg and reason in msg and "older" in msg
        assert isinstance(err.value, ValueError)  # the CLI prints ValueErrors as one line


def test_walk_back_skips_damaged_checkpoints_and_says_why(three):
    _flip(three / tag_for(3) / MODEL_FILE)
    _truncate(three / tag_for(2) / "trainer_state_rank0.pt")
    lines: list[str] = []
    found = resolve_checkpoint("auto", root=three, flag="--resume", walk_back=True, report=lines.append)
    assert found == three / tag_for(1)
    assert len(lines) == 2, lines
    assert "skipping step_00000003" in lines[0] and MODEL_FILE in lines[0] and "does not match" in lines[0]
    assert "skipping step_00000002" in lines[1] and "trainer_state_rank0.pt" in lines[1] and "truncated" in lines[1]


def test_walk_back_never_takes_a_step_latest_does_not_name(three):
    # step 3 exists and verifies, but latest names 2 (e.g. 3 is another run's): 2 is taken
    (three / "latest").write_text(tag_for(2))
    assert resolve_checkpoint("auto", root=three, walk_back=True, report=lambda l: None) == three / tag_for(2)
    _flip(three / tag_for(2) / MODEL_FILE)  # and walking back goes down from 2, not up to 3
    assert resolve_checkpoint("auto", root=three, walk_back=True, report=lambda l: None) == three / tag_for(1)


@pytest.mark.parametrize("pointer", [None, "step_00000009", "garbage\n"])
def test_dangling_or_missing_latest_takes_the_newest_verifying_and_says_so(three, pointer):
    if pointer is None:
        (three / "latest").unlink()
    else:
        (three / "latest").write_text(pointer)
    _flip(three / tag_for(3) / MODEL_FILE)
    lines: list[str] = []
    assert resolve_checkpoint("auto", root=three, walk_back=True, report=lines.append) == three / tag_for(2)
    assert ("is missing" if pointer is None else "dangling") in lines[0]
    assert "skipping step_00000003" in lines[1]


def test_nothing_verifies_is_an_error_not_a_fresh_start(three):
    for step in (1, 2, 3):
        _flip(three / tag_for(step) / MODEL_FILE)
    with pytest.raises(CheckpointCorrupt) as err:
        resolve_checkpoint("auto", root=three, walk_back=True, report=lambda l: None)
    assert "holds no checkpoint that verifies" in _one_line(err)


def test_checkpoint_without_checksums_loads_unverified_with_one_line(tmp_path):
    old = tmp_path / tag_for(5)
    old.mkdir()
    (old / MODEL_FILE).write_bytes(b"x" * 10)
    (old / "meta.json").write_text(json.dumps({"step": 5}))  # written before manifests existed
    lines: list[str] = []
    assert resolve_checkpoint(old, report=lines.append) == old
    assert len(lines) == 1 and "no file checksums" in lines[0] and "unverified" in lines[0]


def test_unreadable_meta_is_a_one_line_error(three):
    (three / tag_for(3) / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointCorrupt) as err:
        resolve_checkpoint(three / tag_for(3), report=lambda l: None)
    assert "meta.json is unreadable" in _one_line(err)


# ------------------------------------------------------------------ full disk
def test_enospc_during_save_is_one_line_and_removes_the_partial_directory(three):
    engine = StubEngine(fail_with=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointWriteError) as err:
        _save(three, 4, engine=engine)
    msg = _one_line(err)
    assert "step 4 not saved" in msg and f"no space left on the device of {three}" in msg and "MiB free" in msg
    assert not list(three.glob(".tmp-*"))  # the partial save is gone
    assert (three / "latest").read_text() == tag_for(3)  # the previous checkpoint is still the one named
    assert verify_checkpoint(three / tag_for(3))


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    """The real thing where this process may mount a tmpfs (root); torch reports a full disk as
    a RuntimeError without an errno, so the free space decides."""
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the path")
    try:
        root = mnt / "checkpoints"
        _save(root, 1)
        with pytest.raises(CheckpointWriteError) as err:
            _save(root, 2, engine=StubEngine(payload_bytes=4 << 20))  # 4 MiB into a 2 MiB disk
        msg = _one_line(err)
        assert f"no space left on the device of {root}" in msg and "MiB free" in msg
        assert not list(root.glob(".tmp-*"))
        assert (root / "latest").read_text() == tag_for(1) and verify_checkpoint(root / tag_for(1))
        # the space is really back: no handle of the failed writer keeps the removed file allocated
        assert shutil.disk_usage(mnt).free > 1 << 20
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: a leaked handle must not keep it


def test_other_write_errors_are_one_line_too(three):
    with pytest.raises(CheckpointWriteError) as err:
        _save(three, 4, engine=StubEngine(fail_with=PermissionError(errno.EACCES, "Permission denied")))
    msg = _one_line(err)
    assert "writing into" in msg and "PermissionError" in msg and not list(three.glob(".tmp-*"))


# ------------------------------------------------------------------ pruning during a streak
def test_pruning_keeps_the_newest_checkpoint_from_before_a_streak(tmp_path):
    root = tmp_path / "checkpoints"
    for step, streak in [(1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 3)]:
        _save(root, step, streak=streak, keep_last=2)
    assert [s for s, _ in complete_checkpoints(root)] == [3, 5, 6]
    _save(root, 7, streak=0, keep_last=2)  # recovered: 7 is good, 3 no longer needed
    assert [s for s, _ in complete_checkpoints(root)] == [6, 7]


# ------------------------------------------------------------------ tiny real runs
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _run(tmp: Path, name: str, corpus, steps: int, extra: list[str] | None = None, **sections):
    out = tmp / name
    cfg = tiny_training.tiny_run_config(out, corpus, steps=steps, **sections)
    path = tiny_training.write_config(tmp / f"{name}-{steps}.yaml", cfg)
    return out, tiny_training.run_train(path, tmp, extra=extra)


def _cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=tiny_training.child_env(tmp), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_tiny_run_walks_back_past_flipped_bytes_to_the_reference_loss(tmp_path, corpus):
    ck = {"interval": 1, "keep_last": 3}
    ref, proc = _run(tmp_path, "ref", corpus, 6, checkpoint=ck)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out, proc = _run(tmp_path, "run", corpus, 4, checkpoint=ck)
    assert proc.returncode == 0, proc.stdout[-3000:]
    root = out / "checkpoints"
    bad = root / tag_for(4) / MODEL_FILE
    _flip(bad)  # 64 bytes inside the model tensors; the zip stays readable

    # explicit paths: one line naming the file, exit 2, no traceback
    truncated = root / tag_for(3) / "trainer_state_rank0.pt"
    saved = truncated.read_bytes()
    _truncate(truncated)
    cfg4 = tmp_path / "run-4.yaml"
    for argv in (["-m", "miras_pretrain.cli", "train", "--config", str(cfg4), "--resume", str(root / tag_for(4))],
                 ["-m", "miras_pretrain.cli", "export", "hf", "--checkpoint", str(root / tag_for(4)),
                  "--out", str(tmp_path / "hf")],
                 [str(Path(__file__).parents[1] / "tools" / "consolidate.py"), str(root / tag_for(4))]):
        p = _cli(argv, tmp_path)
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        assert str(bad) in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = _cli(["-m", "miras_pretrain.cli", "train", "--config", str(cfg4), "--resume", str(root / tag_for(3))],
             tmp_path)
    assert p.returncode == 2 and "(truncated?)" in p.stderr and "PytorchStreamReader" not in p.stderr, p.stderr
    truncated.write_bytes(saved)

    # --resume auto: skips step 4 in one line, resumes step 3 and ends on the reference loss
    out6, proc = _run(tmp_path, "run", corpus, 6, extra=["--resume", "auto"], checkpoint=ck)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"skipping step_00000004: {MODEL_FILE} does not match its xxh3_128 digest" in proc.stdout
    assert f"resumed from {root / tag_for(3)} at step 3" in proc.stdout
    losses, want = tiny_training.step_losses(out6), tiny_training.step_losses(ref)
    assert losses[6] == want[6] and losses[4] == want[4]


def test_tiny_run_full_disk_is_one_line_and_leaves_no_partial_save(tmp_path, corpus):
    """``train`` with checkpoint.dir on a 1 MiB tmpfs (root only; the injected-ENOSPC test
    above covers the same code everywhere): exit 2, one line naming the directory and free
    space, no ``.tmp-step_*`` left, ``latest`` naming a checkpoint that verifies."""
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        _, proc = _run(tmp_path, "full", corpus, 30, checkpoint={"interval": 1, "keep_last": 30, "dir": str(mnt)})
        assert proc.returncode == 2, proc.stdout[-3000:]
        errors = [l for l in proc.stdout.splitlines() if l.startswith("miras-pretrain train: error:")]
        assert len(errors) == 1 and f"no space left on the device of {mnt}" in errors[0], proc.stdout[-3000:]
        assert "MiB free" in errors[0] and "Traceback" not in proc.stdout
        assert not list(mnt.glob(".tmp-*"))
        latest = resolve_checkpoint(mnt / "latest", report=lambda l: None)
        assert latest.name == (mnt / "latest").read_text().strip()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: a leaked handle must not keep it


@pytest.mark.slow
def test_tiny_run_nan_streak_keeps_a_checkpoint_from_before_it(tmp_path, corpus):
    out, proc = _run(tmp_path, "nan", corpus, 12, checkpoint={"interval": 1, "keep_last": 2},
                     train={"max_consecutive_skips": 4}, debug={"nan_loss_steps": list(range(4, 13))})
    assert proc.returncode == 3, proc.stdout[-3000:]  # aborted after 4 skipped steps (4-7)
    root = out / "checkpoints"
    steps = [s for s, _ in complete_checkpoints(root)]
    assert 3 in steps, steps  # the last step applied before the streak
    meta = json.loads((root / tag_for(3) / "meta.json").read_text())
    assert meta["nonfinite_streak"] == 0
    assert all(json.loads((root / tag_for(s) / "meta.json").read_text())["nonfinite_streak"] > 0
               for s in steps if s > 3)
