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
    tr.add_argument("--input", nargs="+", help="text/JSONL/Parquet files or directories")
    tr.add_argument("--stdlib", action="store_true",
                    help="train on the embedded Python-stdlib corpus (train files) instead")
    tr.add_argument("--max-files", type=int, default=None, help="stdlib: limit the file count")
    tr.add_argument("--max-bytes", type=int, default=None, help="limit the training bytes")
    tr.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    tr.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--pad", action="store_true", help="add a PAD piece (id 3)")
    tr.add_argument("--out", required=True, help="model prefix: writes OUT.model and OUT.vocab")
    tr.set_defaults(func=_tokenizer_train)

    data = subparsers.add_parser("data", help="prepare training data (MDS shards)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    pr = dsub.add_parser("prepare", help="tokenize files into mosaicml-streaming MDS shards")
    pr.add_argument("--input", nargs="+", help="text/JSONL/Parquet files or directories")
    pr.add_argument("--builtin", choices=["stdlib", "assoc-recall"],
                    help="prepare a built-in set instead of --input")
    pr.add_argument("--out", required=True, help="output root (local dir or s3://, gs://, ...)")
    pr.add_argument("--tokenizer", help="sentencepiece .model (stdlib: trained when omitted)")
    pr.add_argument("--layout", default="documents", choices=["packed", "documents"])
    pr.add_argument("--seq-len", type=int, default=None, help="required for --layout packed")
    pr.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
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
    pr.add_argument("--vocab-size", type=int, default=4096, help="builtin sets: vocab size")
    pr.add_argument("--max-files", type=int, default=None, help="stdlib: limit the file count")
    pr.add_argument("--max-bytes", type=int, default=None, help="stdlib: limit the bytes")
    pr.add_argument("--num-samples", type=int, default=4096, help="assoc-recall: train samples")
    pr.add_argument("--num-pairs", type=int, default=16, help="assoc-recall: key/value pairs")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=_data_prepare)


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


def _data_prepare(args: argparse.Namespace) -> int:
    if bool(args.input) == bool(args.builtin):
        raise ValueError("data prepare: give exactly one of --input or --builtin")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"data prepare: --val-fraction must be in [0, 1), got {args.val_fraction}")
    progress = not args.no_progress
    if args.builtin == "stdlib":
        from miras_pretrain.data.embedded import prepare_embedded_corpus, prepared_to_dict

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
                                   overwrite=args.overwrite)
        print(json.dumps({k: v for k, v in prepared_to_dict(res).items() if k != "manifest"}))
        return 0
    from miras_pretrain.data.prepare import prepare_files

    if not args.tokenizer:
        raise ValueError("data prepare: --tokenizer is required with --input")
    if args.layout == "packed" and not args.seq_len:
        raise ValueError("data prepare: --seq-len is required with --layout packed")
    m = prepare_files(args.input, args.out, args.tokenizer, layout=args.layout,
                      seq_len=args.seq_len, fmt=args.format, text_field=args.text_field,
                      split=args.split, val_fraction=args.val_fraction or 0.0,
                      num_workers=args.workers, progress=progress, overwrite=args.overwrite)
    summary = {name: {"samples": s.num_samples, "tokens": s.num_tokens,
                      "documents": s.num_documents} for name, s in m.splits.items()}
    print(json.dumps({"out": args.out, "layout": m.layout, "vocab_size": m.vocab_size,
                      "splits": summary, "skipped": m.skipped}), file=sys.stdout)
    return 0
