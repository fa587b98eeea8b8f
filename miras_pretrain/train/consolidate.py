"""Sharded training checkpoint -> one fp32 single-process ``MirasLM`` state dict.

* Data parallel only (TP = PP = 1, any ZeRO stage): DeepSpeed's own
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` merges the fp32
  optimizer partitions offline, in this process.
* Tensor / pipeline parallel: the checkpoint is loaded by as many processes as wrote it (a
  ``torchrun`` child job on CPU/gloo, started automatically), every rank takes its full-over-DP
  fp32 master weights with ``deepspeed.utils.safe_get_full_fp32_param`` and the model helper's
  ``gather_full_state_dict`` concatenates the TP shards and merges the pipeline stages into the
  single-process names; rank 0 writes the result.

Names are ``build_model(cfg).state_dict()``'s, values fp32 CPU tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from miras_pretrain.train.checkpoint import META, read_meta, resolve_checkpoint


def _zero_only(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def _worker(ckpt: Path, out: Path) -> None:
    """Body of one rank of the TP/PP consolidation job (run under torchrun)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from miras_pretrain.parallel.checkpoint import gather_full_state_dict
    from miras_pretrain.parallel.mpu import MegatronMPU
    from miras_pretrain.train import dist as mdist
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.setup import build_local_model, setup_parallel, teardown_parallel

    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    from miras_pretrain.train.config import resolve_model_config

    model_cfg = resolve_model_config(cfg)
    device = torch.device("cpu")
    layout = setup_parallel(cfg, device)
    try:
        from miras_pretrain.train.engine import build_engine

        model = build_local_model(model_cfg, layout, cfg)
        mpu = MegatronMPU() if layout.pp == 1 else None  # a PipelineModule carries its own grid
        engine, _ = build_engine(model, cfg, device, mpu=mpu,
                                 zero3_persistence_threshold=cfg.train.zero3_persistence_threshold)
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {ckpt}")
        module = engine.module
        fp32 = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)  # full over data parallel, this rank's TP shard
            fp32[name] = (full if full is not None else p.detach()).float().cpu()
        merged = gather_full_state_dict(module, fp32)
        if mdist.rank() == 0:
            torch.save(merged, out)
    finally:
        teardown_parallel(layout)


def consolidate_checkpoint(path: str | Path, *, timeout: float = 1800) -> dict[str, torch.Tensor]:
    """The fp32 single-process state dict (``{name: fp32 CPU tensor}``, names of
    ``build_model(cfg).state_dict()``) of a checkpoint written by ``miras-pretrain train``.

    ``path``: a ``step_*`` directory, a checkpoints root or ``<root>/latest`` (see
    :func:`~miras_pretrain.train.checkpoint.resolve_checkpoint`). Its files are verified against
    the manifest in meta.json before any is read: a damaged one is a one-line ``ValueError``
    naming the file (no walk-back: the caller asked for this checkpoint)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    tp, pp, world = int(meta.get("tp", 1)), int(meta.get("pp", 1)), int(meta.get("world_size", 1))
    if tp == 1 and pp == 1:
        return _zero_only(ckpt)
    if "config" not in meta:
        raise ValueError(f"{ckpt / META} lacks the run config needed to rebuild the TP/PP layout")
    with tempfile.TemporaryDirectory(prefix="miras-consolidate-") as tmp:
        out = Path(tmp) / "full.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "miras_pretrain.train.consolidate", "--worker", str(ckpt), str(out)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"consolidation job for {ckpt} failed (exit {proc.returncode}):\n{tail}")
        return torch.load(out, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        _worker(Path(argv[1]), Path(argv[2]))
        return 0
    raise SystemExit("use tools/consolidate.py")


if __name__ == "__main__":
    sys.exit(main())
