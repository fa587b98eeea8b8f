"""Named model sizes: every preset at every size, as one table in code.

A name is ``<preset>_<size>`` (``moneta_340m``, ``yaad_hybrid_tiny``). A training config writes
``model: moneta_340m``, ``model: {preset: moneta, size: 340m, n_layers: 12}`` or
``model: {from: moneta_340m, ...}``; a model YAML path works wherever a name does.
``miras-pretrain models`` lists the table with parameter counts; docs/model.md has it as a table
(``tools/param_table.py`` regenerates it, ``tests/test_registry_sizes.py`` checks it).

* ``tiny`` is the size for tests and the CPU demo (vocabulary of the demo tokenizer).
* The paper sizes (170m ... 1.3b) use a 32000-token vocabulary and untied embeddings;
  ``ffn_hidden`` is chosen per preset so that the total lands within 1% of the size's name
  (``tools/count_params.py`` prints the counts).
* ``*_hybrid``: Samba-style, Miras layers alternate with sliding-window attention (``MA``).
* ``transformer``: Transformer++, every layer full causal attention with RoPE (``T``); its
  ``miras`` section is unused.

Fields not given here take ``ModelConfig``'s defaults (conv_size 4, rope_theta 1e4, norm_eps
1e-6, init_std 0.02, untied, no activation checkpointing, backend auto).
"""

from __future__ import annotations

from typing import Any

SIZES: tuple[str, ...] = ("tiny", "170m", "340m", "760m", "1.3b")

# Shape of each size, shared by every preset.
SIZE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, chunk_size=16, gate_rank=16, window=64),
    "170m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=16, chunk_size=64, gate_rank=32, window=512),
    "340m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, chunk_size=64, gate_rank=32, window=512),
    "760m": dict(vocab_size=32000, d_model=1536, n_layers=24, n_heads=16, chunk_size=64, gate_rank=64, window=1024),
    "1.3b": dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, chunk_size=64, gate_rank=64, window=2048),
}

# preset -> (layer_pattern, Miras preset, ffn_hidden per size in SIZES order). Every preset of
# MirasSpec.preset has a row (tests/test_registry_sizes.py): ttt_mlp shares Titans' widths (same
# MLP memory and gates), linear_attn and gla share DeltaNet's (linear memory; their gate
# projections differ by a few thousand parameters, well inside the 1% budget).
PRESETS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "moneta": ("M", "moneta", (384, 2944, 1856, 3136, 4160)),
    "yaad": ("M", "yaad", (384, 2944, 1856, 3136, 4160)),
    "memora": ("M", "memora", (384, 2944, 1856, 3136, 4160)),
    "titans": ("M", "titans", (384, 2944, 1856, 3136, 4160)),
    "deltanet": ("M", "deltanet", (384, 3072, 1984, 3392, 4480)),
    "gated_delta": ("M", "gated_delta", (384, 3072, 1984, 3392, 4480)),
    "ttt_mlp": ("M", "ttt_mlp", (384, 2944, 1856, 3136, 4160)),
    "linear_attn": ("M", "linear_attn", (384, 3072, 1984, 3392, 4480)),
    "gla": ("M", "gla", (384, 3072, 1984, 3392, 4480)),
    "transformer": ("T", "moneta", (384, 3328, 2368, 3904, 5184)),
    "moneta_hybrid": ("MA", "moneta", (384, 3136, 2112, 3520, 4672)),
    "yaad_hybrid": ("MA", "yaad", (384, 3136, 2112, 3520, 4672)),
    "memora_hybrid": ("MA", "memora", (384, 3136, 2112, 3520, 4672)),
}


def model_names() -> list[str]:
    """Every registered name, preset-major (``moneta_tiny``, ``moneta_170m``, ...)."""
    return [f"{p}_{s}" for p in PRESETS for s in SIZES]


def registry_fields(preset: str, size: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields of ``preset`` at ``size`` (a fresh dict the caller may edit)."""
    if preset not in PRESETS:
        raise ValueError(f"config key 'model.preset' = {preset!r} is not valid: unknown preset; "
                         f"choose one of {', '.join(PRESETS)} (miras-pretrain models lists them)")
    if size not in SIZES:
        raise ValueError(f"config key 'model.size' = {size!r} is not valid: unknown size; "
                         f"choose one of {', '.join(SIZES)}")
    pattern, miras, ffn = PRESETS[preset]
    return {**SIZE_SHAPES[size], "ffn_hidden": ffn[SIZES.index(size)], "layer_pattern": pattern,
            "miras": {"preset": miras}}


def split_name(name: str) -> tuple[str, str] | None:
    """``"yaad_hybrid_1.3b"`` -> ``("yaad_hybrid", "1.3b")``; None if not a registered name."""
    preset, _, size = name.rpartition("_")
    return (preset, size) if preset in PRESETS and size in SIZES else None
