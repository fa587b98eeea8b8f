"""Read what an export needs from a training run: a checkpoint's model config (``meta.json``),
its fp32 state dict (through the trainer's consolidation, any ZeRO stage / TP / PP / CP layout)
and the tokenizer the run was trained with. Which directory ``--checkpoint`` names is decided by
:func:`miras_pretrain.train.checkpoint.resolve_checkpoint`, as for ``--resume`` and consolidation.

Layout written by the trainer (``miras_pretrain/train/checkpoint.py``)::

    <run>/config.yaml                    the resolved run config (data.tokenizer)
    <run>/checkpoints/latest             text file naming the newest complete tag
    <run>/checkpoints/step_00000100/     DeepSpeed shards + meta.json (written last, with the
                                         digest of every file: resolve_checkpoint verifies them
                                         before anything here reads the shards)
"""

from __future__ import annotations

from pathlib import Path

import torch

from miras_pretrain.model.config import ModelConfig


def checkpoint_model_config(ckpt_dir: Path) -> ModelConfig:
    """The model config recorded in the (complete, resolved and so verified) checkpoint's
    meta.json; an unreadable meta.json is a one-line error naming it."""
    from miras_pretrain.train.checkpoint import read_meta

    meta = read_meta(ckpt_dir)
    if "model" not in meta:
        raise ValueError(f"{ckpt_dir / 'meta.json'} has no 'model' entry: this checkpoint predates "
                         "model configs in meta.json; export its consolidated state dict with --state-dict")
    try:
        return ModelConfig.from_dict(meta["model"])
    except ValueError as err:
        raise ValueError(f"{ckpt_dir / 'meta.json'}: {err}") from None


def run_tokenizer(ckpt_dir: Path) -> Path | None:
    """The tokenizer named in the run's config.yaml (``data.tokenizer``), if any and present."""
    import yaml

    run_cfg = ckpt_dir.parent.parent / "config.yaml"
    if not run_cfg.is_file():
        return None
    data = yaml.safe_load(run_cfg.read_text()) or {}
    tok = (data.get("data") or {}).get("tokenizer")
    if not tok:
        return None
    tok = Path(tok)
    for cand in (tok, run_cfg.parent / tok):
        if cand.is_file():
            return cand
    return None


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 single-process MirasLM state dict from a sharded checkpoint, via the trainer's
    consolidation (``tools/consolidate.py``)."""
    try:
        from miras_pretrain.train.consolidate import consolidate_checkpoint
    except ImportError:
        raise ValueError(
            f"cannot read {ckpt_dir}: the trainer's checkpoint consolidation "
            "(miras_pretrain.train.consolidate) is not available in this version; run "
            "tools/consolidate.py and pass its output with --state-dict and --model-config"
        ) from None
    return consolidate_checkpoint(ckpt_dir)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A consolidated state dict saved with ``torch.save`` (.pt) or safetensors."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"state dict {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"state dict {p} cannot be read ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and "module" in obj and isinstance(obj["module"], dict):
        obj = obj["module"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"state dict {p} is not a mapping of parameter names to tensors")
    return obj
