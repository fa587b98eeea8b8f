"""``miras-pretrain export hf``: a checkpoint (or consolidated state dict) -> HF model directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained model (Hugging Face format)")
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    hf = sub.add_parser(
        "hf", help="write a directory loadable with AutoModelForCausalLM(trust_remote_code=True)",
    )
    src = hf.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="the training checkpoint to export, <run>/checkpoints/<step_N|latest> "
                                          "(any ZeRO/TP/PP layout) (required: this or --state-dict)")
    src.add_argument("--state-dict", help="a consolidated single-process state dict (.pt or .safetensors) to "
                                          "export; needs --model-config (required: this or --checkpoint)")
    hf.add_argument("--model-config", help="registered model name (miras-pretrain models) or model YAML, for "
                                           "--state-dict (default: none; a checkpoint carries its own)")
    hf.add_argument("--tokenizer", help="sentencepiece .model (default: data.tokenizer of the run config)")
    hf.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    hf.add_argument("--max-shard-size", default="2GB", help="largest safetensors file; bigger models are sharded with an index, e.g. 500MB, 2GB")
    hf.add_argument("--max-positions", type=int, default=8192,
                    help="advisory context length written to config.json (what harnesses truncate to)")
    hf.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    hf.add_argument("--accept-other-tokenizer", action="store_true",
                    help="export with a --tokenizer whose sha256 differs from the one the "
                         "checkpoint was trained with")
    hf.set_defaults(func=run_export_hf)


def load_source(args) -> tuple:
    """(ModelConfig, state dict, tokenizer path) from --checkpoint or --state-dict.

    The tokenizer is ``--tokenizer`` or the run config's ``data.tokenizer``; for a checkpoint it
    is checked against the hash the checkpoint recorded *before* the (slow) consolidation. A bare
    state dict records no tokenizer: ``--tokenizer`` is taken as given.
    """
    from miras_pretrain.model.config import ModelConfig

    from . import checkpoint as ck
    from .tokenizer_check import check_export_tokenizer, trained_tokenizer

    if args.checkpoint:
        from miras_pretrain.train.checkpoint import resolve_checkpoint

        ckpt = resolve_checkpoint(args.checkpoint, flag="--checkpoint")
        cfg = ck.checkpoint_model_config(ckpt)
        tok = _tokenizer_or_error(args.tokenizer or ck.run_tokenizer(ckpt))
        check_export_tokenizer(tok, trained_tokenizer(ckpt), accept_other=args.accept_other_tokenizer)
        return cfg, ck.consolidated_state_dict(ckpt), tok
    if not args.model_config:
        raise ValueError("--state-dict needs --model-config (the model name or YAML it was trained with)")
    return (ModelConfig.from_ref(args.model_config), ck.load_state_dict_file(args.state_dict),
            _tokenizer_or_error(args.tokenizer))


def _tokenizer_or_error(tok):
    if tok is None:
        raise ValueError("no tokenizer found: pass --tokenizer <sentencepiece .model> "
                         "(the run config names none, or it has moved)")
    return tok


def run_export_hf(args) -> int:
    from .hf import export_hf

    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} does not exist")
    cfg, sd, tok = load_source(args)
    out = export_hf(cfg, sd, tok, args.out, max_shard_size=args.max_shard_size,
                    max_position_embeddings=args.max_positions, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0
