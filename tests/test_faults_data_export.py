"""Faults in data preparation, export's tokenizer, the model vocabulary and config YAML
(issue 21): each is refused with one line naming the file and the fix, and nothing is replaced,
mixed or exported silently.

Data preparation and YAML run in-process; the trainer checks run `miras-pretrain train` as a
child process (they fail before any process-group work); the tokenizer-hash test trains a
2-step tiny run for a real checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from miras_pretrain.cli import main
from miras_pretrain.data.embedded import stdlib_files
from miras_pretrain.data.manifest import read_manifest
from miras_pretrain.testing import tiny_training
from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def other_tok_path(tmp_path_factory) -> Path:
    """Same vocabulary size, other training text: a different file (hash)."""
    from miras_pretrain.data.tokenizer import train_tokenizer

    files = stdlib_files(max_files=20)[12:]
    return train_tokenizer((f.path.read_text(encoding="utf-8") for f in files),
                           tmp_path_factory.mktemp("tok2") / "tok", vocab_size=400).path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f.path.read_text(encoding="utf-8")}) + "\n"
                            for f in stdlib_files(max_files=8)))
    return path


def _prepare(out: Path, corpus: Path, tok: Path, *extra: str) -> int:
    return main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok),
                 "--out", str(out), "--workers", "1", "--no-progress", *extra])


# ------------------------------------------------------------------ data prepare


def test_prepare_into_prepared_dir_is_refused_and_leaves_it_intact(tmp_path, corpus, tok_path,
                                                                   capsys):
    out = tmp_path / "ds"
    assert _prepare(out, corpus, tok_path, "--val-fraction", "0.3") == 0
    before = _tree_digest(out)
    err = _one_line_error(capsys, ["data", "prepare", "--input", str(corpus), "--tokenizer",
                                   str(tok_path), "--out", str(out), "--layout", "packed",
                                   "--seq-len", "16", "--workers", "1", "--no-progress"])
    assert str(out) in err and "not empty" in err and "--overwrite" in err
    assert _tree_digest(out) == before


def test_overwrite_removes_the_stale_val_split(tmp_path, corpus, tok_path, capsys):
    out = tmp_path / "ds"
    assert _prepare(out, corpus, tok_path, "--val-fraction", "0.5") == 0
    assert (out / "val" / "index.json").is_file()
    assert _prepare(out, corpus, tok_path, "--val-fraction", "0", "--overwrite") == 0
    assert set(read_manifest(str(out)).splits) == {"train"}
    assert not (out / "val").exists()  # no stale split a loader could still read
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train"]


def test_overwrite_never_removes_what_it_did_not_write(tmp_path, corpus, tok_path, capsys):
    out = tmp_path / "ds"
    assert _prepare(out, corpus, tok_path) == 0
    (out / "notes.txt").write_text("mine")
    before = _tree_digest(out)
    err = _one_line_error(capsys, ["data", "prepare", "--input", str(corpus), "--tokenizer",
                                   str(tok_path), "--out", str(out), "--overwrite",
                                   "--workers", "1", "--no-progress"])
    assert "notes.txt" in err and "choose a new directory" in err
    assert _tree_digest(out) == before
    # nor an input of the preparation that lies inside the output directory
    inner_tok = tmp_path / "ds2" / "tokenizer.model"
    inner_tok.parent.mkdir()
    inner_tok.write_bytes(Path(tok_path).read_bytes())
    err = _one_line_error(capsys, ["data", "prepare", "--input", str(corpus), "--tokenizer",
                                   str(inner_tok), "--out", str(inner_tok.parent), "--overwrite",
                                   "--workers", "1", "--no-progress"])
    assert str(inner_tok) in err and "move it out" in err
    assert inner_tok.is_file()


def test_builtin_sets_honour_val_fraction_zero(tmp_path, capsys):
    out = tmp_path / "stdlib"
    assert main(["data", "prepare", "--builtin", "stdlib", "--out", str(out), "--vocab-size",
                 "400", "--max-files", "6", "--val-fraction", "0", "--workers", "1",
                 "--no-progress"]) == 0
    assert set(read_manifest(str(out / "data")).splits) == {"train"}
    assert not (out / "data" / "val").exists()
    ar = tmp_path / "ar"
    assert main(["data", "prepare", "--builtin", "assoc-recall", "--out", str(ar),
                 "--vocab-size", "64", "--seq-len", "63", "--num-pairs", "4",
                 "--num-samples", "32", "--val-fraction", "0"]) == 0
    assert set(read_manifest(str(ar)).splits) == {"train"}
    # a different built-in preparation into the same directory is refused, not mixed in
    err = _one_line_error(capsys, ["data", "prepare", "--builtin", "assoc-recall", "--out",
                                   str(ar), "--vocab-size", "64", "--seq-len", "31",
                                   "--num-pairs", "4", "--num-samples", "32"])
    assert str(ar) in err and "--overwrite" in err


# ------------------------------------------------------------------ trainer checks


def _train_error(tmp_path: Path, prepared, **model_fields) -> str:
    """Run a tiny training job that must fail at start; its one error line."""
    model = dict(tiny_training.TINY_MODEL, **model_fields)
    cfg = tiny_training.tiny_run_config(tmp_path / "run", prepared, steps=2, model=model)
    path = tiny_training.write_config(tmp_path / "c.yaml", cfg)
    proc = tiny_training.run_train(path, tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    lines = [ln for ln in proc.stdout.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def prepared_no_val(tmp_path_factory):
    from miras_pretrain.data import prepare_embedded_corpus

    return prepare_embedded_corpus(str(tmp_path_factory.mktemp("noval")), vocab_size=400,
                                   seq_len=32, layout="packed", max_bytes=150_000,
                                   val_fraction=0.0)


def test_training_on_data_without_val_split_is_one_line(tmp_path, prepared_no_val):
    assert prepared_no_val.val_split is None
    err = _train_error(tmp_path, prepared_no_val)
    assert "no split 'val'" in err and "--val-fraction" in err and "data.eval_split" in err


def test_model_vocab_smaller_than_tokenizer_is_one_line_at_train_start(tmp_path):
    prepared = tiny_training.prepare_tiny_corpus(tmp_path / "corpus", vocab_size=400,
                                                 max_bytes=150_000)
    err = _train_error(tmp_path, prepared, vocab_size=300)
    assert "model.vocab_size 300" in err and "400 pieces" in err
    assert str(prepared.tokenizer_path) in err


# ------------------------------------------------------------------ export


def test_export_vocab_smaller_than_tokenizer_is_one_line(tmp_path, tok_path):
    from miras_pretrain.export import export_hf
    from miras_pretrain.model import build_model

    cfg = tiny_config("moneta", vocab_size=300)
    with pytest.raises(ValueError) as info:
        export_hf(cfg, build_model(cfg).state_dict(), tok_path, tmp_path / "hf_small_vocab")
    msg = str(info.value)
    assert "\n" not in msg and "400 pieces" in msg and "vocab_size is 300" in msg
    assert not (tmp_path / "hf_small_vocab").exists()


def test_export_has_ordinary_permissions(tmp_path, tok_path):
    from miras_pretrain.export import export_hf
    from miras_pretrain.model import build_model

    cfg = tiny_config("moneta")
    old = os.umask(0o022)
    try:
        out = export_hf(cfg, build_model(cfg).state_dict(), tok_path, tmp_path / "hf_modes")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.name: 0o644 for p in files}


@pytest.mark.slow
def test_export_refuses_a_tokenizer_the_model_was_not_trained_with(tmp_path, other_tok_path,
                                                                   capsys):
    prepared = tiny_training.prepare_tiny_corpus(tmp_path / "corpus", vocab_size=400,
                                                 max_bytes=150_000)
    run = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(run, prepared, steps=2,
                                        checkpoint={"interval": 0, "keep_last": 1})
    proc = tiny_training.run_train(tiny_training.write_config(tmp_path / "c.yaml", cfg), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    latest = run / "checkpoints" / "latest"
    argv = ["export", "hf", "--checkpoint", str(latest)]
    err = _one_line_error(capsys, argv + ["--tokenizer", str(other_tok_path),
                                          "--out", str(tmp_path / "hf_wrong")])
    assert str(other_tok_path) in err and "meta.json" in err and str(prepared.tokenizer_path) in err
    assert "--accept-other-tokenizer" in err and not (tmp_path / "hf_wrong").exists()
    # the run's own tokenizer (data.tokenizer) exports; another one only when asked for
    assert main(argv + ["--out", str(tmp_path / "hf_right")]) == 0
    assert main(argv + ["--tokenizer", str(other_tok_path), "--accept-other-tokenizer",
                        "--out", str(tmp_path / "hf_accepted")]) == 0


def test_trained_tokenizer_falls_back_to_the_run_manifests(tmp_path, tok_path, other_tok_path):
    """A checkpoint from before meta.json recorded the hash: the run's data manifest says it."""
    from miras_pretrain.data.manifest import Manifest, SplitInfo, write_manifest
    from miras_pretrain.data.tokenizer import file_sha256
    from miras_pretrain.export.tokenizer_check import check_export_tokenizer, trained_tokenizer

    data = tmp_path / "data"
    write_manifest(str(data), Manifest(
        tokenizer_sha256=file_sha256(tok_path), tokenizer_path=str(tok_path), vocab_size=400,
        eos_id=2, bos_id=1, pad_id=None, layout="packed", seq_len=8, dtype="uint16",
        splits={"train": SplitInfo(1, 8, 1, 9)}))
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps(
        {"config": {"data": {"streams": [{"path": str(data), "weight": 1.0}],
                             "tokenizer": str(tok_path)}}}))
    trained = trained_tokenizer(ckpt)
    assert trained is not None and trained.recorded_in == str(data / "manifest.json")
    check_export_tokenizer(tok_path, trained)
    with pytest.raises(ValueError, match="manifest.json records"):
        check_export_tokenizer(other_tok_path, trained)


# ------------------------------------------------------------------ config YAML


@pytest.mark.parametrize("text, where", [
    ("model: tiny\ntrain:\n  lr: 3e-3\n   max_steps: 5\n", "line 4, column 13"),
    ("model: [tiny\ntrain: {lr: 1}\n", "line 2, column 6"),
    ('run: {name: "unterminated}\n', "line 2, column 1"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    err = _one_line_error(capsys, ["train", "--config", str(path)])
    assert str(path) in err and where in err and "not valid YAML" in err
