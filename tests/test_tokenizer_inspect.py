"""`miras-pretrain tokenizer inspect PATH`: vocabulary size, special tokens with ids, a sample
encode/decode; a directory holding tokenizer.model works; a bad path is one line."""

from __future__ import annotations

import json
import shutil

import pytest

from miras_pretrain.cli import main
from miras_pretrain.data.tokenizer import Tokenizer
from miras_pretrain.testing.tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_inspect_prints_vocab_specials_and_sample(tok_path, capsys):
    tok = Tokenizer(tok_path)
    assert main(["tokenizer", "inspect", str(tok_path), "--text", "def f(x):\\n    return 42"]) == 0
    out = capsys.readouterr().out
    assert f"vocab size:  {tok.vocab_size}" in out
    assert f"bos = {tok.bos_id}" in out and f"eos = {tok.eos_id}" in out
    assert f"</s> = {tok.eos_id}" in out  # the control pieces by name
    ids = tok.encode("def f(x):\n    return 42")
    assert f"{ids}" in out and "round-trips exactly" in out
    assert "'def f(x):\\n    return 42'" in out


def test_inspect_json_and_directory(tok_path, tmp_path, capsys):
    d = tmp_path / "export"
    d.mkdir()
    shutil.copy(tok_path, d / "tokenizer.model")
    assert main(["tokenizer", "inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tok = Tokenizer(tok_path)
    assert info["vocab_size"] == tok.vocab_size and info["sha256"] == tok.sha256
    assert info["special_ids"]["eos"] == tok.eos_id
    sample = info["sample"]
    assert sample["ids"] == tok.encode(sample["text"]) and sample["roundtrip"] is True
    assert len(sample["pieces"]) == len(sample["ids"]) > 0


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.model", "does not exist"),
    (lambda p: p, "directory without tokenizer.model"),
])
def test_inspect_bad_path_is_one_line(tmp_path, capsys, make, message):
    assert main(["tokenizer", "inspect", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("miras-pretrain tokenizer: error:")


def test_inspect_not_a_sentencepiece_model(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_text("nope")
    assert main(["tokenizer", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a sentencepiece model" in err[0]
