#!/usr/bin/env python
"""Data pipeline throughput on the embedded stdlib corpus.

Measures (1) tokenization: tokens/s of one core (in-process) and of a worker pool, and
(2) loading: tokens/s delivered by the streaming loader for both layouts and a few worker counts.
Target: the loader delivers >= 20x the tokens/s the tiny demo model trains at on CPU (a few
thousand tokens/s), i.e. >= 100k tokens/s. Prints a table and writes JSON to --out.

    python tools/bench_data.py [--quick] [--out bench_results/bench_data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_TOKENS_PER_S = 100_000  # 20 x ~5k tokens/s of the tiny demo model on CPU


def bench_tokenize(files, model_path: str, workers: int) -> dict:
    from miras_pretrain.data.prepare import tokenize_documents
    from miras_pretrain.data.sources import Document

    docs = [Document(f.path.read_text(encoding="utf-8"), str(f.path), 1) for f in files]
    t0 = time.perf_counter()
    n = sum(len(a) for _, a in tokenize_documents(iter(docs), model_path, num_workers=workers,
                                                  progress=False, chunk_chars=1 << 18))
    dt = time.perf_counter() - t0
    return {"workers": workers, "tokens": n, "seconds": dt, "tokens_per_s": n / dt,
            "tokens_per_s_per_core": n / dt / max(workers, 1)}


def bench_loader(root: str, layout: str, seq_len: int, batch: int, workers: int,
                 batches: int, cache: str) -> dict:
    from miras_pretrain.data import DataConfig, build_train_loader

    cfg = DataConfig.from_dict({"streams": [root], "layout": layout, "seq_len": seq_len,
                                "micro_batch_size": batch, "num_workers": workers,
                                "cache_dir": cache})
    t0 = time.perf_counter()
    with build_train_loader(cfg) as ld:
        build_s = time.perf_counter() - t0
        it = iter(ld)
        next(it)  # warm-up: worker start, first shard download/decompress
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t1
    tokens = batches * batch * seq_len
    return {"layout": layout, "workers": workers, "batch": batch, "seq_len": seq_len,
            "batches": batches, "build_s": build_s, "seconds": dt, "tokens_per_s": tokens / dt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_results/bench_data.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    p.add_argument("--work-dir", default=None, help="where to prepare data (default: temp)")
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    quick = args.quick
    max_files = args.max_files or (8 if quick else 300)
    vocab = args.vocab_size or (400 if quick else 8192)
    seq_len = args.seq_len or (64 if quick else 512)
    n_batches = 5 if quick else 200
    cores = os.cpu_count() or 1

    from miras_pretrain.data.embedded import (prepare_embedded_corpus, split_files,
                                              stdlib_files)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        t0 = time.perf_counter()
        docs = prepare_embedded_corpus(str(work / "documents"), vocab_size=vocab,
                                       seq_len=seq_len, max_files=max_files, layout="documents",
                                       num_workers=1)
        prep_s = time.perf_counter() - t0
        packed = prepare_embedded_corpus(str(work / "packed"), vocab_size=vocab, seq_len=seq_len,
                                         max_files=max_files, layout="packed", num_workers=1,
                                         tokenizer_path=docs.tokenizer_path)
        files = split_files(stdlib_files(max_files=max_files), 0.05)["train"]
        tok_rows = [bench_tokenize(files, docs.tokenizer_path, 1)]
        if not quick and cores > 1:
            tok_rows.append(bench_tokenize(files, docs.tokenizer_path, cores))
        load_rows = []
        for layout, root in (("packed", packed.root), ("documents", docs.root)):
            for workers in ((0,) if quick else (0, 1, 2)):
                load_rows.append(bench_loader(root, layout, seq_len, args.batch, workers,
                                              n_batches, str(work / "cache")))

    result = {
        "machine": {"cores": cores, "python": platform.python_version(),
                    "platform": platform.platform()},
        "corpus": {"files": max_files, "vocab_size": vocab, "seq_len": seq_len,
                   "train_tokens": docs.manifest.splits["train"].num_tokens,
                   "prepare_documents_s": prep_s},
        "tokenize": tok_rows, "loader": load_rows,
        "target_loader_tokens_per_s": TARGET_TOKENS_PER_S,
        "loader_meets_target": min(r["tokens_per_s"] for r in load_rows) >= TARGET_TOKENS_PER_S,
        "quick": quick,
    }
    print(f"corpus: {max_files} stdlib files, {result['corpus']['train_tokens']} train tokens, "
          f"vocab {vocab}, seq_len {seq_len}")
    print(f"{'tokenize':<22}{'workers':>8}{'tokens/s':>14}{'tok/s/core':>14}")
    for r in tok_rows:
        print(f"{'sentencepiece BPE':<22}{r['workers']:>8}{r['tokens_per_s']:>14,.0f}"
              f"{r['tokens_per_s_per_core']:>14,.0f}")
    print(f"{'loader':<22}{'workers':>8}{'tokens/s':>14}{'build s':>14}")
    for r in load_rows:
        name = f"{r['layout']} B={r['batch']}"
        print(f"{name:<22}{r['workers']:>8}"
              f"{r['tokens_per_s']:>14,.0f}{r['build_s']:>14.2f}")
    print(f"target >= {TARGET_TOKENS_PER_S:,} tokens/s (20x the CPU demo model): "
          f"{'met' if result['loader_meets_target'] else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
