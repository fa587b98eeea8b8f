"""Tiny models and tokenizers for export/eval tests, benchmarks and docs examples."""

from __future__ import annotations

from pathlib import Path

from miras_pretrain.model.config import ModelConfig


def tiny_config(preset: str = "moneta", pattern: str = "M", **overrides) -> ModelConfig:
    """A 2-layer, d=64 model on a 512-token vocab with chunk size 8 and window 16, so short
    inputs cross several chunk boundaries and the sliding window."""
    fields = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, ffn_hidden=128,
                  layer_pattern=pattern, miras={"preset": preset}, chunk_size=8, conv_size=4,
                  gate_rank=8, eta_max=1.0, window=16, backend="chunked")
    fields.update(overrides)
    return ModelConfig.from_dict(fields)


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 400) -> Path:
    """Train a Llama-style sentencepiece model on a few stdlib files; returns the .model path."""
    from miras_pretrain.data.embedded import stdlib_files
    from miras_pretrain.data.tokenizer import train_tokenizer

    files = stdlib_files(max_files=12)
    tok = train_tokenizer((f.path.read_text(encoding="utf-8") for f in files),
                          Path(out_dir) / "tok", vocab_size=vocab_size)
    return tok.path
