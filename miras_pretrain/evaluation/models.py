"""Load the model under evaluation: an exported directory, or a checkpoint exported on the fly."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_exported_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "modeling_miras.py").is_file()


@contextlib.contextmanager
def exported_model_dir(path: str | Path, tokenizer: str | None = None) -> Iterator[Path]:
    """Yield an exported HF directory for ``path``: the path itself when it is one, otherwise a
    training checkpoint (``<run>/checkpoints/<step|latest>``) exported to a temp directory."""
    p = Path(path)
    if is_exported_dir(p):
        yield p
        return
    if not p.exists() and p.name != "latest":
        raise FileNotFoundError(f"--model {p} does not exist: pass an exported directory or "
                                "<run>/checkpoints/<step|latest>")
    if p.is_dir() and (p / "config.json").is_file():
        raise ValueError(f"{p} has a config.json but no modeling_miras.py: it is not a directory "
                         "written by `miras-pretrain export hf`")
    from miras_pretrain.export import checkpoint as ck
    from miras_pretrain.export.hf import export_hf
    from miras_pretrain.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(p, flag="--model")
    cfg = ck.checkpoint_model_config(ckpt)
    tok = tokenizer or ck.run_tokenizer(ckpt)
    if tok is None:
        raise ValueError(f"no tokenizer for checkpoint {ckpt}: pass --tokenizer <sentencepiece .model>")
    from miras_pretrain.export.tokenizer_check import check_export_tokenizer, trained_tokenizer

    # the numbers must be the trained model's: refuse a tokenizer it was not trained with
    check_export_tokenizer(tok, trained_tokenizer(ckpt), accept_flag=None)
    sd = ck.consolidated_state_dict(ckpt)
    with tempfile.TemporaryDirectory(prefix="miras-eval-") as tmp:
        yield export_hf(cfg, sd, tok, Path(tmp) / f"export-{ckpt.name}")


def load_hf(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode, tokenizer) from an exported directory, with remote code, offline-safe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not valid: choose one of {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=DTYPES[dtype])
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return model.to(device).eval(), tok
