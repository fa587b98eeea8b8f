#!/usr/bin/env python
"""Cost of checkpoint checksums next to the save itself, at 170M parameters.

Builds a registered model (default ``moneta_170m``) in a DeepSpeed ZeRO-1 engine with torch
AdamW, exactly as ``miras-pretrain train`` does, takes one optimizer step on a short random batch
(so the Adam moments exist and are saved), then, ``--repeats`` times:

* ``save``: ``CheckpointManager.save`` -- the trainer's whole save (DeepSpeed's model and
  optimizer files, the trainer state, the digest manifest, meta.json, rename, ``latest``);
* ``hash``: the manifest alone (XXH3-128 of every file just written, what the save includes),
  and ``sha256``: the same with SHA-256, the fallback and the comparison that chose XXH3;
* ``verify``: ``verify_checkpoint`` (sizes, then re-reading and hashing every file), what
  ``--resume``, export and consolidation do before loading;
* ``load``: ``CheckpointManager.load`` into the engine, for scale.

Files are read back from the page cache (just written): on a cold disk the hash and the load both
wait for the same reads. Prints a table and writes JSON (``--out``, default
``bench_checkpoint.json`` in the working directory).

    python tools/bench_checkpoint.py                       # moneta_170m, 1 thread, 2 repeats
    python tools/bench_checkpoint.py --model transformer_170m --dir /scratch/bench
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bench(model_ref: str, root: Path, repeats: int, seq_len: int) -> dict:
    """Build the engine, step once, and time save / hash / verify / load ``repeats`` times."""
    import torch

    from miras_pretrain.model import ModelConfig, build_model, count_parameters
    from miras_pretrain.train import dist as mdist
    from miras_pretrain.train.checkpoint import CheckpointManager
    from miras_pretrain.train.checkpoint_manifest import (
        HASH_NAME,
        checkpoint_files,
        file_digest,
        hash_files,
        verify_checkpoint,
    )
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.engine import build_engine

    device = mdist.pick_device("cpu")
    mdist.init_distributed(device)
    mcfg = ModelConfig.from_ref(model_ref)
    cfg = config_from_dict({"train": {"max_steps": 10, "micro_batch_size": 1, "warmup_steps": 0, "zero_stage": 1}})
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(mcfg), cfg, device)
    x = torch.randint(0, mcfg.vocab_size, (1, seq_len))
    step_s, _ = _timed(lambda: (engine.backward(engine(x, labels=x)), engine.step()))
    mgr = CheckpointManager(root, keep_last=1)
    rows = []
    for i in range(repeats):
        step = i + 1
        save_s, ckpt = _timed(lambda: mgr.save(engine, step, {"step": step}, {"nonfinite_streak": 0}))
        files = checkpoint_files(ckpt)
        nbytes = sum((ckpt / f).stat().st_size for f in files)
        hash_s, _ = _timed(lambda: hash_files(ckpt, files))
        sha_s, _ = _timed(lambda: [file_digest(ckpt / f, "sha256") for f in files])
        verify_s, ok = _timed(lambda: verify_checkpoint(ckpt))
        assert ok, "a checkpoint written by CheckpointManager.save must verify"
        load_s, _ = _timed(lambda: mgr.load(engine, ckpt))
        rows.append({"repeat": step, "bytes": nbytes, "files": len(files), "save_s": save_s,
                     "hash": HASH_NAME, "hash_s": hash_s, "sha256_s": sha_s, "sha256_over_save": sha_s / save_s, "verify_s": verify_s, "load_s": load_s,
                     "hash_over_save": hash_s / save_s, "verify_over_load": verify_s / load_s})
    return {"model": model_ref, "params": int(count_parameters(mcfg)), "seq_len": seq_len,
            "train_step_s": step_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moneta_170m", help="registered model (miras-pretrain models)")
    ap.add_argument("--repeats", type=int, default=2, help="saves timed (each followed by hash/verify/load)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens of the one training step (states only)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: comparable on a shared machine)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir, removed)")
    ap.add_argument("--out", default="bench_checkpoint.json", help="JSON result (default bench_checkpoint.json)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    tmp = None
    if args.dir:
        root = Path(args.dir) / "checkpoints"
        if root.exists() and any(root.iterdir()):
            print(f"bench_checkpoint: error: --dir {args.dir} already holds checkpoints/: pass an empty directory",
                  file=sys.stderr)
            return 2
    else:
        tmp = tempfile.mkdtemp(prefix="bench-checkpoint-")
        root = Path(tmp) / "checkpoints"
    try:
        result = bench(args.model, root, args.repeats, args.seq_len)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.update({"threads": args.threads, "machine": platform.machine(), "python": platform.python_version(),
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    print(f"{result['model']}: {result['params'] / 1e6:.1f}M parameters, {args.threads} thread(s); "
          "save = DeepSpeed ZeRO-1 save_checkpoint + trainer state + manifest")
    print(f"{'repeat':>6} {'GiB':>5} {'files':>5} {'save s':>7} {'hash s':>7} {'hash/save':>9} "
          f"{'verify s':>8} {'load s':>7} {'verify/load':>11} {'hash MB/s':>9} {'sha256 s':>8} {'sha/save':>8}")
    for r in result["rows"]:
        print(f"{r['repeat']:>6} {r['bytes'] / 2**30:>5.2f} {r['files']:>5} {r['save_s']:>7.2f} {r['hash_s']:>7.2f} "
              f"{r['hash_over_save']:>9.1%} {r['verify_s']:>8.2f} {r['load_s']:>7.2f} {r['verify_over_load']:>11.1%} "
              f"{r['bytes'] / r['hash_s'] / 1e6:>9.0f} {r['sha256_s']:>8.2f} {r['sha256_over_save']:>8.1%}")
    print(f"hash = {result['rows'][0]['hash']}; save includes the hash; verify = sizes + re-read + hash")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
