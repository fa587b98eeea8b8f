"""Export a Miras LM state dict to a self-contained Hugging Face model directory.

The directory holds ``config.json`` (with the full Miras spec and ``auto_map``), the modeling
code (``configuration_miras.py`` / ``modeling_miras.py``: pure PyTorch, no dependency on this
package) with copies of the operator modules that hold the memory rules (``operator_files``),
safetensors weights (sharded above ``max_shard_size``, with an index), the tokenizer
(slow ``LlamaTokenizer`` over the sentencepiece model, no BOS/EOS added so ids equal the data
pipeline's) and ``generation_config.json``. Input and output embeddings are always stored
untied (transformers 5 would load a random head for a tied 4.x checkpoint).

Everything is validated before anything is written, the files go to a temporary sibling
directory and are moved into place at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from miras_pretrain.model.config import ModelConfig

from .operator_files import write_operator_files

TEMPLATE_DIR = Path(__file__).resolve().parent / "hf_template"
MODELING_FILES = ("configuration_miras.py", "modeling_miras.py")
DEFAULT_MAX_SHARD_SIZE = "2GB"
DEFAULT_MAX_POSITIONS = 8192


def hf_config_dict(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                   max_position_embeddings: int = DEFAULT_MAX_POSITIONS) -> dict:
    """``config.json`` contents for ``cfg`` (MirasConfig fields + auto_map)."""
    return {
        "architectures": ["MirasForCausalLM"],
        "model_type": "miras",
        "auto_map": {
            "AutoConfig": "configuration_miras.MirasConfig",
            "AutoModelForCausalLM": "modeling_miras.MirasForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_width,
        "layer_pattern": cfg.layer_pattern,
        "miras_spec": cfg.spec.to_dict(),
        "chunk_size": cfg.chunk_size,
        "conv_size": cfg.conv_size,
        "gate_rank": cfg.gate_rank,
        "eta_max": cfg.eta_max,
        "huber_delta": cfg.huber_delta,
        "window": cfg.window,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "max_position_embeddings": int(max_position_embeddings),
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        # the training config, verbatim, so the export can be traced back / re-imported
        "miras_model_config": cfg.to_dict(),
    }


def hf_name(name: str) -> str:
    """Training (single-process MirasLM) parameter name -> exported name."""
    if name == "embed.word.weight":
        return "model.embed_tokens.weight"
    if name == "head.norm.weight":
        return "model.norm.weight"
    if name == "head.proj.weight":
        return "lm_head.weight"
    if name.startswith("layers."):
        return "model." + name
    raise ValueError(f"state dict has unexpected key {name!r}: it is not a MirasLM parameter")


def training_name(name: str) -> str:
    """Exported parameter name -> training (MirasLM) name (inverse of :func:`hf_name`)."""
    if name == "model.embed_tokens.weight":
        return "embed.word.weight"
    if name == "model.norm.weight":
        return "head.norm.weight"
    if name == "lm_head.weight":
        return "head.proj.weight"
    if name.startswith("model.layers."):
        return name[len("model."):]
    raise ValueError(f"exported weights have unexpected key {name!r}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Training-layout name -> shape of every MirasLM parameter of ``cfg``, read off the export
    template built on the meta device (no memory, no init cost, any model size)."""
    from .hf_template.configuration_miras import MirasConfig
    from .hf_template.modeling_miras import MirasForCausalLM

    fields = hf_config_dict(cfg, bos_id=None, eos_id=None, pad_id=None)
    for key in ("architectures", "model_type", "auto_map", "torch_dtype", "miras_model_config"):
        fields.pop(key)
    with torch.device("meta"):
        model = MirasForCausalLM(MirasConfig(**fields))
    shapes = {training_name(n): tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("head.proj.weight")
    return shapes


def convert_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Check a single-process MirasLM state dict against ``cfg`` and rename it to the exported
    layout (untied head: a tied model's head is a copy of the embedding). Raises ValueError
    naming the first missing, unexpected or mis-shaped entry."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in state_dict]
    if missing:
        raise ValueError(
            f"state dict lacks {missing[0]!r} ({len(missing)} missing): it was saved from a "
            "different model config (or the checkpoint is partial)"
        )
    extra = [n for n in state_dict if n not in want]
    if extra:
        raise ValueError(
            f"state dict has unexpected key {extra[0]!r} ({len(extra)} extra): it was saved from a "
            "different model config"
        )
    out: dict[str, torch.Tensor] = {}
    for name, shape in want.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"state dict entry {name!r} has shape {tuple(t.shape)} but the model config needs "
                f"{shape}: the checkpoint was saved from a different model config"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"state dict entry {name!r} contains NaN/Inf: refusing to export it")
        out[hf_name(name)] = t.detach().to("cpu", dtype).contiguous().clone()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def _check_tokenizer(path: str | os.PathLike, cfg: ModelConfig):
    from miras_pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{cfg.vocab_size}: pass the tokenizer the model was trained with"
        )
    return tok


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def _ordinary_permissions(root: Path) -> None:
    """Give the export the modes of any directory a person creates (0755 / 0644 under the usual
    umask 022): ``mkdtemp`` makes its directory 0700, which the final rename would carry into the
    export and hide the model from the rest of the group on a shared cluster."""
    mask = _current_umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _write_tokenizer(tok, out: Path) -> None:
    from transformers import LlamaTokenizer

    # The data pipeline encodes documents without BOS and ends them with EOS: the HF tokenizer
    # adds nothing either, so its ids equal the training ids. legacy=True keeps sentencepiece's
    # own handling of the dummy prefix (identical ids for any text).
    hf_tok = LlamaTokenizer(
        vocab_file=str(tok.path), add_bos_token=False, add_eos_token=False, legacy=True,
        unk_token=tok.id_to_piece(tok.unk_id) if tok.unk_id is not None else None,
        bos_token=tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else None,
        eos_token=tok.id_to_piece(tok.eos_id),
        pad_token=tok.id_to_piece(tok.pad_id) if tok.pad_id is not None else None,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out))
    # keep the AutoTokenizer on the slow (sentencepiece) class: no tokenizer.json is written
    cfg_path = out / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    data["tokenizer_class"] = "LlamaTokenizer"
    cfg_path.write_text(json.dumps(data, indent=2))


def _write_weights(weights: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> int:
    """safetensors files (+ index when sharded). Returns the number of files."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        weights, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: weights[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return len(split.filename_to_tensors)


def export_hf(
    model_cfg: ModelConfig | dict,
    state_dict: dict[str, torch.Tensor],
    tokenizer_model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face model directory for a single-process MirasLM state dict.

    Args:
        model_cfg: the training ``ModelConfig`` (or its dict).
        state_dict: ``MirasLM.state_dict()`` layout (e.g. ``gather_full_state_dict`` output or a
            consolidated checkpoint), any float dtype; stored as float32.
        tokenizer_model_path: the sentencepiece ``.model`` the model was trained with.
        out_dir: target directory; must not exist or be empty (unless ``overwrite``).
        max_shard_size: safetensors shard limit (bytes or a string such as ``"2GB"``).
        max_position_embeddings: advisory context length written to the config (harnesses
            truncate to it; Miras layers have no limit).

    Returns the output directory. Raises ValueError/FileNotFoundError before writing anything
    when an input is bad.
    """
    cfg = ModelConfig.from_dict(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"output directory {out} already exists and is not empty: choose a new path "
                         "or pass --overwrite")
    if int(max_position_embeddings) < 1:
        raise ValueError(f"max_position_embeddings={max_position_embeddings} must be >= 1")
    tok = _check_tokenizer(tokenizer_model_path, cfg)
    weights = convert_state_dict(cfg, state_dict)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        config = hf_config_dict(cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                max_position_embeddings=max_position_embeddings)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in MODELING_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        write_operator_files(tmp)
        _write_weights(weights, tmp, max_shard_size)
        _write_tokenizer(tok, tmp)
        from transformers import GenerationConfig

        GenerationConfig(
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id if tok.pad_id is not None else tok.eos_id, do_sample=False,
        ).save_pretrained(str(tmp))
        _ordinary_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_exported_state_dict(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an exported directory back into (training ModelConfig, MirasLM state dict): the
    reverse direction, for round-trip checks and for fine-tuning an export with this package."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not an exported Miras model directory")
    config = json.loads(cfg_file.read_text())
    if "miras_model_config" not in config:
        raise ValueError(f"{cfg_file} has no miras_model_config: it was not written by miras-pretrain export")
    cfg = ModelConfig.from_dict(config["miras_model_config"])
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update({training_name(n): t for n, t in load_file(str(f)).items()})
    if cfg.tie_embeddings:
        sd.pop("head.proj.weight", None)
    return cfg, sd
