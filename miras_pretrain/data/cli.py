"""``miras-pretrain tokenizer train`` and ``miras-pretrain data prepare``."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train or inspect a sentencepiece tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    tr = tsub.add_parser("train", help="train a Llama-style BPE sentencepiece model")
    tr.add_argument("--input", nargs="+", help="text/JSONL/Parquet files or directories to train on "
                                               "(required: this or --stdlib)")
    tr.add_argument("--stdlib", action="store_true",
                    help="train on the embedded Python-stdlib corpus (train files) instead")
    tr.add_argument("--max-files", type=int, default=None, help="stdlib: limit the file count (default: all files)")
    tr.add_argument("--max-bytes", type=int, default=None, help="limit the training bytes (default: all of them)")
    tr.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                    help="input format; auto picks it from each file's extension")
    tr.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    tr.add_argument("--vocab-size", type=int, required=True, help="number of pieces in the vocabulary")
    tr.add_argument("--pad", action="store_true", help="add a PAD piece (id 3)")
    tr.add_argument("--out", required=True, help="model prefix: writes OUT.model and OUT.vocab")
    tr.set_defaults(func=_tokenizer_train)
    ins = tsub.add_parser(
        "inspect", help="show a tokenizer's vocabulary size, special tokens and a sample encode/decode",
        description="Print a sentencepiece tokenizer's vocabulary size, its special tokens with their ids "
                    "(BOS, EOS, PAD, UNK and every other control piece), the number of byte-fallback pieces, "
                    "and how a sample text encodes and decodes.")
    ins.add_argument("path", metavar="PATH",
                     help="a sentencepiece .model file, or a directory holding tokenizer.model (an `export hf` "
                          "directory, a prepared corpus)")
    ins.add_argument("--text", default=None,
                     help="sample text to encode and decode; \\n means a newline (default: a line of Python "
                          "with indentation, digits and a comment)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    ins.set_defaults(func=_tokenizer_inspect)

    data = subparsers.add_parser("data", help="prepare training data (MDS shards)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    pr = dsub.add_parser("prepare", help="tokenize files into mosaicml-streaming MDS shards")
    pr.add_argument("--input", nargs="+", help="text/JSONL/Parquet files or directories to tokenize "
                                               "(required: this or --builtin)")
    pr.add_argument("--builtin", choices=["stdlib", "assoc-recall"],
                    help="prepare a built-in set instead of --input (required: this or --input)")
    pr.add_argument("--out", required=True, help="output root (local dir or s3://, gs://, ...)")
    pr.add_argument("--tokenizer", help="sentencepiece .model; required with --input (default for --builtin "
                                        "stdlib: one is trained)")
    pr.add_argument("--layout", default="documents", choices=["packed", "documents"],
                    help="packed: fixed rows of --seq-len tokens; documents: whole documents with cu_seqlens")
    pr.add_argument("--seq-len", type=int, default=None,
                    help="tokens per row; required for --layout packed (default: 512 for stdlib, 128 for "
                         "assoc-recall)")
    pr.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                    help="input format; auto picks it from each file's extension")
    pr.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    pr.add_argument("--split", default="train", help="split name when --val-fraction is 0")
    pr.add_argument("--val-fraction", type=float, default=None,
                    help="send this fraction of documents (by hash) to split 'val'; 0 writes no "
                         "validation split (default: 0 for --input, 0.05 for stdlib, 1/16 of "
                         "--num-samples for assoc-recall)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace the data prepared in a non-empty --out (removed first, so no "
                         "stale split remains)")
    pr.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: auto)")
    pr.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU budget: torch threads, and the tokenizer processes when --workers is 0 (at most 4); "
                         "default: the CPUs / local processes, capped by OMP_NUM_THREADS and SLURM_CPUS_PER_TASK")
    pr.add_argument("--vocab-size", type=int, default=4096, help="builtin sets: vocab size")
    pr.add_argument("--max-files", type=int, default=None, help="stdlib: limit the file count (default: all files)")
    pr.add_argument("--max-bytes", type=int, default=None, help="stdlib: limit the bytes (default: all of them)")
    pr.add_argument("--num-samples", type=int, default=4096, help="assoc-recall: train samples")
    pr.add_argument("--num-pairs", type=int, default=16, help="assoc-recall: key/value pairs")
    pr.add_argument("--loss", default="all", choices=["all", "answers"],
                    help="assoc-recall: train on every next token, or only on the answers (Zoology's "
                         "objective; the other labels become -100)")
    pr.add_argument("--no-progress", action="store_true", help="print no progress bar while tokenizing")
    pr.set_defaults(func=_data_prepare)


# a sample that shows words, digits (split one by one), indentation and a newline
DEFAULT_SAMPLE_TEXT = "def area(r):\n    return 3.14159 * r ** 2  # Miras"


def inspect_tokenizer(path: str, text: str = DEFAULT_SAMPLE_TEXT) -> dict:
    """What ``tokenizer inspect`` prints, as a dict: model path, sha256, vocabulary size,
    special tokens (name -> id), control pieces, byte-fallback piece count and the sample's
    ids, pieces and decoded text (``roundtrip``: whether decode(encode(text)) == text)."""
    from pathlib import Path

    from miras_pretrain.data.tokenizer import Tokenizer

    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            raise FileNotFoundError(f"inspect PATH {path} is a directory without tokenizer.model; give the "
                                    f".model file")
        p = p / "tokenizer.model"
    elif not p.exists():
        raise FileNotFoundError(f"inspect PATH {path} does not exist; give a sentencepiece .model file")
    tok = Tokenizer(p)
    sp = tok._sp
    special = {name: i for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id),
                                       ("unk", tok.unk_id)) if i is not None}
    control = {sp.IdToPiece(i): i for i in range(tok.vocab_size) if sp.IsControl(i) or sp.IsUnknown(i)}
    ids = tok.encode(text)
    decoded = tok.decode(ids)
    return {"model": str(p), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "special_ids": special,
            "special_pieces": control, "byte_pieces": sum(1 for i in range(tok.vocab_size) if sp.IsByte(i)),
            "sample": {"text": text, "ids": ids, "pieces": [tok.id_to_piece(i) for i in ids], "decoded": decoded,
                       "roundtrip": decoded == text, "chars_per_token": round(len(text) / max(len(ids), 1), 3)}}


def _tokenizer_inspect(args: argparse.Namespace) -> int:
    text = DEFAULT_SAMPLE_TEXT if args.text is None else args.text.replace("\\n", "\n")
    info = inspect_tokenizer(args.path, text)
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    s = info["sample"]
    print(f"tokenizer:   {info['model']}  (sha256 {info['sha256'][:12]})")
    print(f"vocab size:  {info['vocab_size']}")
    print("special ids: " + ", ".join(f"{k} = {v}" for k, v in info["special_ids"].items()))
    print("special pieces: " + ", ".join(f"{k!s} = {v}" for k, v in info["special_pieces"].items()))
    print(f"byte-fallback pieces: {info['byte_pieces']}")
    print(f"sample text: {s['text']!r}")
    print(f"  ids ({len(s['ids'])}, {s['chars_per_token']} chars/token): {s['ids']}")
    print(f"  pieces:  {s['pieces']}")
    print(f"  decoded: {s['decoded']!r}  ({'round-trips exactly' if s['roundtrip'] else 'DIFFERS from the text'})")
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from miras_pretrain.data.tokenizer import train_tokenizer

    if bool(args.input) == bool(args.stdlib):
        raise ValueError("tokenizer train: give exactly one of --input or --stdlib")
    if args.stdlib:
        from miras_pretrain.data.embedded import split_files, stdlib_files

        files = split_files(stdlib_files(args.max_files, args.max_bytes), 0.05)["train"]
        texts = (f.path.read_text(encoding="utf-8") for f in files)
    else:
        from miras_pretrain.data.sources import SkipCounter, expand_inputs, read_documents

        skips = SkipCounter()
        docs = read_documents(expand_inputs(args.input), fmt=args.format,
                              text_field=args.text_field, skips=skips)

        def limited():
            total = 0
            for d in docs:
                if args.max_bytes is not None and total >= args.max_bytes:
                    return
                total += len(d.text)
                yield d.text

        texts = limited()
    tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, pad=args.pad)
    print(json.dumps({"model": str(tok.path), "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sha256": tok.sha256}))
    return 0


def _cpu_budget(args: argparse.Namespace, progress: bool) -> None:
    """``--threads`` (or the automatic choice, miras_pretrain/threads.py) for torch, and as the
    automatic ``--workers`` (at most 4, as before): unlike ``os.cpu_count()`` it respects the
    affinity mask, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS and a busy machine. Called after the
    argument checks, so an error stays one line."""
    from miras_pretrain.threads import apply_threads

    budget = apply_threads(args.threads, announce=False).threads
    if not args.workers:
        args.workers = min(4, budget)
    if progress:  # on stderr with the progress bars: stdout stays the one JSON summary line
        print(f"data prepare: {args.workers} tokenizer processes, {budget} threads", file=sys.stderr, flush=True)


def _data_prepare(args: argparse.Namespace) -> int:
    if bool(args.input) == bool(args.builtin):
        raise ValueError("data prepare: give exactly one of --input or --builtin")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"data prepare: --val-fraction must be in [0, 1), got {args.val_fraction}")
    progress = not args.no_progress
    if args.builtin == "stdlib":
        from miras_pretrain.data.embedded import prepare_embedded_corpus, prepared_to_dict

        _cpu_budget(args, progress)

        res = prepare_embedded_corpus(
            args.out, vocab_size=args.vocab_size, seq_len=args.seq_len or 512,
            layout=args.layout, max_files=args.max_files, max_bytes=args.max_bytes,
            val_fraction=0.05 if args.val_fraction is None else args.val_fraction,
            num_workers=args.workers, progress=progress, tokenizer_path=args.tokenizer,
            overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in prepared_to_dict(res).items() if k != "manifest"}))
        return 0
    if args.builtin == "assoc-recall":
        from miras_pretrain.data.embedded import prepare_assoc_recall, prepared_to_dict

        num_val = (max(1, args.num_samples // 16) if args.val_fraction is None
                   else round(args.num_samples * args.val_fraction))
        res = prepare_assoc_recall(args.out, vocab_size=args.vocab_size,
                                   seq_len=args.seq_len or 128, num_pairs=args.num_pairs,
                                   num_train=args.num_samples, num_val=num_val,
                                   loss=args.loss, overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in prepared_to_dict(res).items() if k != "manifest"}))
        return 0
    from miras_pretrain.data.prepare import prepare_files

    if not args.tokenizer:
        raise ValueError("data prepare: --tokenizer is required with --input")
    if args.layout == "packed" and not args.seq_len:
        raise ValueError("data prepare: --seq-len is required with --layout packed")
    _cpu_budget(args, progress)
    m = prepare_files(args.input, args.out, args.tokenizer, layout=args.layout,
                      seq_len=args.seq_len, fmt=args.format, text_field=args.text_field,
                      split=args.split, val_fraction=args.val_fraction or 0.0,
                      num_workers=args.workers, progress=progress, overwrite=args.overwrite)
    summary = {name: {"samples": s.num_samples, "tokens": s.num_tokens,
                      "documents": s.num_documents} for name, s in m.splits.items()}
    print(json.dumps({"out": args.out, "layout": m.layout, "vocab_size": m.vocab_size,
                      "splits": summary, "skipped": m.skipped}), file=sys.stdout)
    return 0
