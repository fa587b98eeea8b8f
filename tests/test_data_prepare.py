"""Tokenizer, shard preparation, embedded corpora, DataConfig, CLI and bad-input handling.
Runs in-process; the only child processes are the tokenizer pool workers."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from miras_pretrain.data import DataConfig
from miras_pretrain.data.embedded import (generate_assoc_recall, prepare_assoc_recall,
                                          prepare_embedded_corpus, split_files, stdlib_files)
from miras_pretrain.data.manifest import read_manifest
from miras_pretrain.data.prepare import prepare_files, write_dataset
from miras_pretrain.data.tokenizer import Tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = [f.path.read_text(encoding="utf-8") for f in stdlib_files(max_files=12)]
    return train_tokenizer(iter(texts), tmp_path_factory.mktemp("tok") / "sp", vocab_size=600)


def read_split(root: Path, split: str) -> list[np.ndarray]:
    """Samples of a local MDS split, in order, through streaming's own reader (shards are zstd:
    decompress a copy first, as streaming does in its cache)."""
    import shutil
    import tempfile

    from miras_pretrain.data._streaming import import_streaming

    streaming = import_streaming()
    from streaming.base.compression import decompress

    tmp = Path(tempfile.mkdtemp(dir=root))
    shutil.copy(root / split / "index.json", tmp / "index.json")
    for shard in json.loads((root / split / "index.json").read_text())["shards"]:
        z = shard["zip_data"]
        raw = decompress(shard["compression"], (root / split / z["basename"]).read_bytes())
        (tmp / shard["raw_data"]["basename"]).write_bytes(raw)
    ds = streaming.LocalDataset(local=str(tmp))
    out = [ds[i]["tokens"] for i in range(len(ds))]
    shutil.rmtree(tmp)
    return out


def test_tokenizer_llama_settings_and_special_ids(tok, tmp_path):
    # identity normalization + no whitespace collapsing: exact round trip of odd spacing/tabs
    text = "def  f(x):\n\treturn x  +  12345   # \u00e9t\u00e9 \u2603\n\n"
    assert tok.decode(tok.encode(text)) == text
    # digits split: every digit is its own piece
    digit_pieces = [tok.id_to_piece(i).replace("\u2581", "") for i in tok.encode("9081726354")]
    assert all(len(p) == 1 for p in digit_pieces if p), digit_pieces
    # byte fallback: an unseen character becomes byte pieces, never UNK
    ids = tok.encode("\U0001f600")
    assert tok.unk_id not in ids and any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    # ids read from the model (Llama layout: unk 0, bos 1, eos 2, no pad)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    # loading an existing .model is the same path and gives the same ids
    again = Tokenizer(tok.path)
    assert again.sha256 == tok.sha256 and again.encode(text) == tok.encode(text)
    padded = train_tokenizer(iter(["a b c d e f g " * 50]), tmp_path / "p", vocab_size=300,
                             pad=True)
    assert padded.pad_id == 3 and padded.token_dtype == np.uint16
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_prepare_text_jsonl_parquet_round_trip(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "json doc one"}) + "\n" + "{not json\n"
        + json.dumps({"other": 1}) + "\n" + json.dumps({"body": "json doc two"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet row", None, "parquet row 3"]}),
                   tmp_path / "c.parquet")
    out = tmp_path / "out"
    m = prepare_files([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")], str(out),
                      str(tok.path), layout="documents", seq_len=None, text_field="body",
                      num_workers=2, progress=False)
    expected = ["first document\nwith two lines\n", "json doc one", "json doc two",
                "parquet row", "parquet row 3"]
    got = read_split(out, "train")
    assert len(got) == len(expected)
    for arr, text in zip(got, expected):
        assert arr.dtype == np.uint16
        assert arr.tolist() == tok.encode(text) + [tok.eos_id]
    # bad JSONL lines and the null Parquet row are skipped and counted, not fatal
    assert m.skipped == {"invalid JSON": 1, "no field 'body'": 1, "null/empty 'body'": 1}
    assert read_manifest(str(out)).tokenizer_sha256 == tok.sha256
    assert m.splits["train"].num_tokens == sum(len(a) for a in got)


def test_prepare_packed_layout_stride_and_val_split(tok, tmp_path):
    docs = [f.path for f in stdlib_files(max_files=6)]
    out = tmp_path / "packed"
    T = 64
    m = prepare_files([str(p) for p in docs], str(out), str(tok.path), layout="packed", seq_len=T,
                      val_fraction=0.4, num_workers=1, progress=False)
    assert set(m.splits) == {"train", "val"} and m.seq_len == T
    for split in ("train", "val"):
        samples = read_split(out, split)
        assert all(len(s) == T + 1 for s in samples)
        # consecutive samples overlap by exactly one token (every token is a label once)
        assert all(a[-1] == b[0] for a, b in zip(samples, samples[1:]))
    total_docs = m.splits["train"].num_documents + m.splits["val"].num_documents
    assert total_docs == len(docs)


@pytest.mark.parametrize("case", ["empty", "undecodable", "jsonl_undecodable", "parquet_column"])
def test_bad_input_files_name_file_and_line(tok, tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if case == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("  \n")
        match = r"empty\.txt: empty file"
    elif case == "undecodable":
        path = tmp_path / "bad.txt"
        path.write_bytes(b"line one\nline two\xff\xfe\n")
        match = r"bad\.txt:2: undecodable bytes"
    elif case == "jsonl_undecodable":
        path = tmp_path / "bad.jsonl"
        path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
        match = r"bad\.jsonl:2: undecodable bytes"
    else:
        path = tmp_path / "t.parquet"
        pq.write_table(pa.table({"content": ["x"]}), path)
        match = r"t\.parquet: no column 'text'"
    with pytest.raises(ValueError, match=match):
        prepare_files([str(path)], str(tmp_path / "o"), str(tok.path), layout="documents",
                      seq_len=None, num_workers=1, progress=False)


def test_seq_len_longer_than_all_text_is_an_error(tok, tmp_path):
    (tmp_path / "short.txt").write_text("tiny doc")
    with pytest.raises(ValueError, match=r"split 'train' has \d+ tokens .*seq_len\+1=4097"):
        prepare_files([str(tmp_path / "short.txt")], str(tmp_path / "o"), str(tok.path),
                      layout="packed", seq_len=4096, num_workers=1, progress=False)


def test_writer_rejects_token_beyond_vocab(tmp_path):
    rec = [("train", "gen:0", np.array([1, 2, 70000], dtype=np.uint32))]
    with pytest.raises(ValueError, match=r"gen:0: token id 70000 >= vocab_size 1000"):
        write_dataset(str(tmp_path), rec, layout="documents", seq_len=None, vocab_size=1000,
                      eos_id=2, tokenizer_sha256="x")
    big = [("train", "gen:0", np.array([1, 2, 70000], dtype=np.uint32))]
    m = write_dataset(str(tmp_path / "big"), big, layout="documents", seq_len=None,
                      vocab_size=80000, eos_id=2, tokenizer_sha256="x")
    assert m.dtype == "uint32"
    assert read_split(tmp_path / "big", "train")[0].tolist() == [1, 2, 70000]


def test_embedded_corpus_is_deterministic_and_idempotent(tmp_path):
    files = stdlib_files(max_files=30)
    assert files == stdlib_files(max_files=30)
    sp = split_files(files, 0.1)
    assert sp["val"] and sp["train"] and not {f.relpath for f in sp["val"]} & {
        f.relpath for f in sp["train"]}
    assert all(str(f.path).startswith(str(STDLIB)) for f in files)
    capped = stdlib_files(max_bytes=50_000)
    assert sum(f.size for f in capped) <= 50_000 or len(capped) == 1
    first = prepare_embedded_corpus(str(tmp_path), vocab_size=400, seq_len=64, max_files=8,
                                    num_workers=1)
    assert not first.reused and set(first.manifest.splits) == {"train", "val"}
    stamp = (Path(first.root) / "manifest.json").stat().st_mtime_ns
    second = prepare_embedded_corpus(str(tmp_path), vocab_size=400, seq_len=64, max_files=8,
                                     num_workers=1)
    assert second.reused and (Path(first.root) / "manifest.json").stat().st_mtime_ns == stamp
    assert Tokenizer(second.tokenizer_path).sha256 == second.manifest.tokenizer_sha256
    third = prepare_embedded_corpus(str(tmp_path), vocab_size=400, seq_len=64, max_files=9,
                                    num_workers=1, overwrite=True)
    assert not third.reused  # different parameters -> rebuilt


def test_assoc_recall_rows_are_answerable(tmp_path):
    rows = generate_assoc_recall(8, seq_len=63, vocab_size=64, num_pairs=6, seed=3)
    assert rows.shape == (8, 64)
    for row in rows:
        pairs = dict(zip(row[1:13:2].tolist(), row[2:13:2].tolist()))
        assert row[0] == 1 and row[13] == 3
        q = row[14:].tolist()
        for k, v in zip(q[0::2], q[1::2]):
            assert pairs[k] == v
    p = prepare_assoc_recall(str(tmp_path), vocab_size=64, seq_len=63, num_pairs=6, num_train=16,
                             num_val=4)
    assert p.manifest.layout == "packed" and p.manifest.splits["train"].num_samples == 16
    assert np.array_equal(np.stack(read_split(tmp_path, "train")),
                          generate_assoc_recall(16, seq_len=63, vocab_size=64, num_pairs=6, seed=0))
    assert prepare_assoc_recall(str(tmp_path), vocab_size=64, seq_len=63, num_pairs=6,
                                num_train=16, num_val=4).reused


def test_data_config_validation():
    cfg = DataConfig.from_dict({"streams": ["a", {"path": "b", "weight": 3}], "seq_len": 128,
                                "layout": "packed"})
    assert [(s.path, s.weight) for s in cfg.streams] == [("a", 1.0), ("b", 3)]
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    # one error format for every section: config key '<section.key>' [= value] is not valid: ...
    bad = [({"streams": ["a"], "seq_lenn": 3}, r"^config key 'data\.seq_lenn' is not valid: unknown key"),
           ({"streams": ["a"], "seq_len": 0}, r"^config key 'data\.seq_len' = 0 is not valid: must be >= 1"),
           ({"streams": ["a"], "layout": "flat"}, r"^config key 'data\.layout' = 'flat' is not valid: choose one of"),
           ({"streams": [{"path": "a", "weight": -1}]}, r"^config key 'data\.streams\[0\]\.weight'"),
           ({"streams": [{"path": "a", "w": 1}]}, r"^config key 'data\.streams\[0\]\.w' is not valid: unknown key"),
           ({"streams": [{"weight": 1}]}, r"^config key 'data\.streams\[0\]\.path' is not valid: missing"),
           ({}, r"^config key 'data\.streams' = \[\] is not valid: at least one"),
           ({"streams": ["a"], "shuffle": "yes"}, r"^config key 'data\.shuffle' = 'yes' is not valid: expected true or false"),
           ({"streams": ["a"], "num_workers": -1}, r"^config key 'data\.num_workers'")]
    for d, match in bad:
        with pytest.raises(ValueError, match=match) as info:
            DataConfig.from_dict(d)
        assert "\n" not in str(info.value)


def test_cli_tokenizer_train_and_data_prepare(tmp_path, capsys):
    from miras_pretrain.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f.path.read_text(encoding="utf-8")}) + "\n"
                              for f in stdlib_files(max_files=5)))
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400",
                 "--out", str(tmp_path / "tk")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["eos_id"] == 2 and Path(info["model"]).is_file()
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", info["model"],
                 "--out", str(tmp_path / "ds"), "--layout", "packed", "--seq-len", "32",
                 "--workers", "1", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["splits"]["train"]["documents"] == 5
    # user errors: exit code 2, one line naming the problem
    assert main(["data", "prepare", "--input", str(corpus), "--out", str(tmp_path / "x"),
                 "--tokenizer", info["model"], "--layout", "packed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--seq-len is required" in err
    assert main(["data", "prepare", "--builtin", "assoc-recall", "--out", str(tmp_path / "ar"),
                 "--vocab-size", "64", "--seq-len", "63", "--num-pairs", "4",
                 "--num-samples", "32"]) == 0
    assert read_manifest(str(tmp_path / "ar")).splits["train"].num_samples == 32
