"""Built-in data that needs no download.

* The stdlib corpus: the Python standard library's own ``.py`` files (``sysconfig.get_paths()
  ["stdlib"]``, present on every machine), split into train/val *by file* with a hash of the
  relative path (deterministic), optionally limited by file count / bytes.
* Synthetic multi-query associative recall (MQAR): ``k1 v1 ... kN vN SEP q1 a1 q2 a2 ...`` with
  each query key drawn from the pairs, the answer its value -- a quick sanity task for memory
  models.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from miras_pretrain.data.manifest import MANIFEST_NAME, Manifest, read_manifest

ASSOC_RECALL_TOKENIZER = "synthetic:assoc-recall-v1"


@dataclass
class CorpusFile:
    path: Path
    relpath: str
    size: int


def _order_key(relpath: str) -> bytes:
    return hashlib.sha1(relpath.encode()).digest()


@functools.lru_cache(maxsize=1)
def _scan_stdlib() -> tuple[Path, list[tuple[str, Path]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune installed packages and caches: not part of the standard library
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath, name)
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: _order_key(t[0]))
    return root, found


def stdlib_files(max_files: int | None = None, max_bytes: int | None = None) -> list[CorpusFile]:
    """Non-empty UTF-8 ``.py`` files of the stdlib (no site-packages), in a fixed hash order,
    cut at ``max_files`` files / ``max_bytes`` total bytes (whichever comes first)."""
    root, found = _scan_stdlib()
    out: list[CorpusFile] = []
    total = 0
    for rel, p in found:
        if max_files is not None and len(out) >= max_files:
            break
        try:
            data = p.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few test fixtures are deliberately not UTF-8: not corpus material
        if not data.strip():
            continue  # empty __init__.py files
        if max_bytes is not None and total + len(data) > max_bytes and out:
            break
        out.append(CorpusFile(p, rel, len(data)))
        total += len(data)
    if len(out) < 2:
        raise ValueError(f"stdlib corpus at {root}: need >= 2 files, got {len(out)} "
                         "(raise max_files/max_bytes)")
    return out


def split_files(files: list[CorpusFile], val_fraction: float) -> dict[str, list[CorpusFile]]:
    """Train/val by file: hash(relpath) < val_fraction -> val; at least one file in each when
    ``val_fraction > 0``, none in val when it is 0 (no validation split asked for)."""
    def h(f):
        return int.from_bytes(hashlib.sha256(f.relpath.encode()).digest()[:8], "little") / 2.0**64

    if val_fraction <= 0:
        return {"train": list(files), "val": []}
    val = [f for f in files if h(f) < val_fraction]
    if not val:
        val = [min(files, key=h)]
    if len(val) == len(files):
        val = val[:-1]
    val_set = {f.relpath for f in val}
    return {"train": [f for f in files if f.relpath not in val_set], "val": val}


@dataclass
class PreparedData:
    """Paths returned by the one-call helpers."""

    root: str  # dataset root (manifest + split dirs); use as a DataConfig stream path
    tokenizer_path: str | None
    train_split: str
    val_split: str | None  # None: prepared without a validation split (val_fraction 0)
    manifest: Manifest
    reused: bool


def prepare_embedded_corpus(out_dir: str, *, vocab_size: int = 4096, seq_len: int = 512,
                            layout: str = "documents", max_files: int | None = None,
                            max_bytes: int | None = None, val_fraction: float = 0.05,
                            num_workers: int = 0, progress: bool = False,
                            tokenizer_path: str | None = None,
                            overwrite: bool = False) -> PreparedData:
    """Train a tokenizer on the stdlib corpus (train files only) and write train/val shards.

    Writes ``<out_dir>/tokenizer.model`` (unless ``tokenizer_path`` is given, e.g. a Llama .model),
    ``<out_dir>/data/{manifest.json,train/,val/}`` (no ``val/`` when ``val_fraction`` is 0).
    Idempotent: when an existing manifest records the same parameters and file list and the
    tokenizer hash matches, nothing is redone. Otherwise a non-empty ``out_dir`` is refused
    unless ``overwrite``, which removes the previous preparation first.
    """
    from miras_pretrain.data.output_dir import claim_output_dir
    from miras_pretrain.data.prepare import prepare_documents_from_files
    from miras_pretrain.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

    out = Path(out_dir)
    files = stdlib_files(max_files, max_bytes)
    splits = split_files(files, val_fraction)
    params = {
        "corpus": "stdlib", "python": sys.version.split()[0], "vocab_size": vocab_size,
        "seq_len": seq_len, "layout": layout, "max_files": max_files, "max_bytes": max_bytes,
        "val_fraction": val_fraction, "tokenizer": str(tokenizer_path or ""),
        "files_sha256": hashlib.sha256(json.dumps(
            {k: [(f.relpath, f.size) for f in v] for k, v in splits.items()}).encode()).hexdigest(),
    }
    data_root = out / "data"
    tok_path = Path(tokenizer_path) if tokenizer_path else out / "tokenizer.model"
    if (data_root / MANIFEST_NAME).is_file() and tok_path.is_file():
        try:
            old = read_manifest(str(data_root))
        except ValueError:
            old = None
        if old is not None and old.params == params and \
                old.tokenizer_sha256 == file_sha256(tok_path):
            return PreparedData(str(data_root), str(tok_path), "train",
                                "val" if "val" in old.splits else None, old, reused=True)

    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer_path} does not exist")
    claim_output_dir(str(out), overwrite=overwrite, keep=(str(tokenizer_path or ""),))
    if tokenizer_path is None:
        tok = train_tokenizer((f.path.read_text(encoding="utf-8") for f in splits["train"]),
                              out / "tokenizer", vocab_size=vocab_size,
                              num_threads=min(2, os.cpu_count() or 1))
    else:
        tok = Tokenizer(tokenizer_path)
    file_split = [(f.path, name) for name in ("train", "val") for f in splits[name]]
    manifest = prepare_documents_from_files(
        file_split, str(data_root), tok, layout=layout, seq_len=seq_len, params=params,
        num_workers=num_workers, progress=progress)
    return PreparedData(str(data_root), str(tok.path), "train",
                        "val" if splits["val"] else None, manifest, reused=False)


ASSOC_RECALL_LOSSES = ("all", "answers")


def check_assoc_recall_shape(*, seq_len: int, vocab_size: int, num_pairs: int) -> None:
    """Refuse an MQAR shape that cannot hold ``num_pairs`` distinct keys and one query (one-line
    ``ValueError`` naming the argument)."""
    n_keys = (vocab_size - 4) // 2
    n_vals = vocab_size - 4 - n_keys
    if vocab_size < 6:
        raise ValueError(f"vocab_size={vocab_size} must be >= 6 (4 special ids, one key, one value)")
    if num_pairs < 1 or num_pairs > min(n_keys, n_vals):
        raise ValueError(f"num_pairs={num_pairs} must be in [1, {min(n_keys, n_vals)}] for "
                         f"vocab_size={vocab_size}")
    if seq_len + 1 < 2 * num_pairs + 4:
        raise ValueError(f"seq_len={seq_len} too short for {num_pairs} pairs plus one query "
                         f"(need >= {2 * num_pairs + 3})")


def assoc_recall_answer_start(num_pairs: int) -> int:
    """Input position of the first query key in an MQAR row (``BOS``, ``2 N`` pair tokens,
    ``SEP``): the model's prediction there is the first answer. Answers follow every 2 tokens."""
    return 2 * num_pairs + 2


def assoc_recall_answer_mask(seq_len: int, num_pairs: int) -> np.ndarray:
    """``[seq_len]`` bool over the *inputs* ``row[:-1]`` of an MQAR row: True where the next token
    (the label ``row[t + 1]``) is an answer, i.e. at every query key. Every row of a given
    ``(seq_len, num_pairs)`` has its answers at these positions."""
    t = np.arange(seq_len)
    start = assoc_recall_answer_start(num_pairs)
    return (t >= start) & ((t - start) % 2 == 0)


def generate_assoc_recall(num_samples: int, *, seq_len: int, vocab_size: int, num_pairs: int,
                          seed: int | list[int]) -> np.ndarray:
    """MQAR samples ``[num_samples, seq_len + 1]`` (uint16/uint32).

    Ids: 0 unused, 1 BOS, 2 EOS, 3 SEP; keys in ``[4, 4 + K)``, values in ``[4 + K, vocab)`` with
    ``K = (vocab - 4) // 2``. Each row: BOS, N distinct key/value pairs, SEP, then (query key,
    value) pairs drawn from the N until the row is full (:func:`assoc_recall_answer_mask` marks
    the query keys of ``row[:-1]``). ``seed``: an int, or a list of ints (a seed sequence; the
    held-out evaluation rows use ``[tag, seed]``, a stream no int seed gives).
    """
    check_assoc_recall_shape(seq_len=seq_len, vocab_size=vocab_size, num_pairs=num_pairs)
    n_keys = (vocab_size - 4) // 2
    n_vals = vocab_size - 4 - n_keys
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    out = np.empty((num_samples, seq_len + 1), dtype=dtype)
    n_q = (seq_len + 1 - 2 - 2 * num_pairs + 1) // 2
    for i in range(num_samples):
        keys = 4 + rng.choice(n_keys, num_pairs, replace=False)
        vals = 4 + n_keys + rng.choice(n_vals, num_pairs, replace=True)
        q = rng.integers(0, num_pairs, n_q)
        row = np.concatenate([[1], np.stack([keys, vals], 1).ravel(), [3],
                              np.stack([keys[q], vals[q]], 1).ravel()])
        out[i] = row[:seq_len + 1]
    return out


def prepare_assoc_recall(out_dir: str, *, vocab_size: int = 256, seq_len: int = 128,
                         num_pairs: int = 16, num_train: int = 4096, num_val: int = 256,
                         seed: int = 0, loss: str = "all", overwrite: bool = False) -> PreparedData:
    """Write MQAR train/val as a packed-layout dataset (samples of ``seq_len + 1`` tokens);
    ``num_val`` 0 writes no validation split.

    ``loss``: ``"all"`` trains (and validates) on every next token, as any corpus; ``"answers"``
    only on the answers (Zoology's MQAR objective): the manifest's ``label_positions`` mark the
    query keys, and the loader sets every other label to -100, so the validation loss is the
    answers' loss too.

    Idempotent like :func:`prepare_embedded_corpus` (and, like it, refuses a non-empty
    ``out_dir`` holding something else unless ``overwrite``). Its manifest's tokenizer hash is
    ``synthetic:assoc-recall-v1``: it mixes only with other MQAR data.
    """
    from miras_pretrain.data.output_dir import claim_output_dir
    from miras_pretrain.data.prepare import write_dataset

    if loss not in ASSOC_RECALL_LOSSES:
        raise ValueError(f"loss={loss!r} is not valid: choose one of {', '.join(ASSOC_RECALL_LOSSES)}")
    check_assoc_recall_shape(seq_len=seq_len, vocab_size=vocab_size, num_pairs=num_pairs)
    params = {"corpus": "assoc-recall", "vocab_size": vocab_size, "seq_len": seq_len,
              "num_pairs": num_pairs, "num_train": num_train, "num_val": num_val, "seed": seed}
    if loss != "all":  # absent for "all", so data prepared before the option is still reused
        params["loss"] = loss
    root = Path(out_dir)
    if (root / MANIFEST_NAME).is_file():
        try:
            old = read_manifest(str(root))
            if old.params == params:
                return PreparedData(str(root), None, "train",
                                    "val" if "val" in old.splits else None, old, reused=True)
        except ValueError:
            pass
    claim_output_dir(str(root), overwrite=overwrite)

    def records():
        for split, n, s in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
            for i, row in enumerate(generate_assoc_recall(n, seq_len=seq_len, vocab_size=vocab_size,
                                                          num_pairs=num_pairs, seed=s)):
                yield split, f"assoc-recall:{split}:{i}", row

    manifest = write_dataset(str(root), records(), layout="packed", seq_len=seq_len, rows=True,
                             vocab_size=vocab_size, eos_id=2, bos_id=1, pad_id=None,
                             tokenizer_sha256=ASSOC_RECALL_TOKENIZER, params=params,
                             label_positions=None if loss == "all" else
                             {"start": assoc_recall_answer_start(num_pairs), "step": 2})
    return PreparedData(str(root), None, "train", "val" if num_val else None, manifest,
                        reused=False)


def prepared_to_dict(p: PreparedData) -> dict:
    d = asdict(p)
    d["manifest"] = json.loads(p.manifest.to_json())
    return d
