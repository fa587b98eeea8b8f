"""``ModelConfig``: every architecture knob of the language model, validated at load."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miras_kernels.spec import MirasSpec

# Layer kinds in ``layer_pattern``: M = Miras mixer, A = sliding-window softmax attention,
# T = full causal softmax attention (Transformer++).
LAYER_KINDS = {"M": "miras", "A": "sliding_attention", "T": "attention"}
BACKENDS = ("auto", "recurrent", "chunked", "triton")


# The cap of the inner learning rate eta = sigmoid(.) * eta_max, by retention, when a config
# leaves ``eta_max`` unset. Memora's kl retention steps in logit space (exponentiated gradient,
# W = c softmax(Z), Z -= eta g), which is stable only while eta * |g| stays O(1); with near-uniform
# softmax rows the memory's LayerNorm sees an almost constant vector, its 1/std saturates at
# 1/sqrt(eps) ~ 316 and |g| is ~10-100, so eta up to 1.0 blew the first steps' gradient norm up to
# 1e4 (docs/training_health.md). 0.1 trains as stably as Moneta; every other retention keeps 1.0.
DEFAULT_ETA_MAX = {"kl": 0.1}


def _bad(key: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"ModelConfig.{key}={value!r} is not valid: {fix}")


@dataclass
class ModelConfig:
    """Llama-style pre-norm decoder with Miras / attention token mixers.

    ``layer_pattern`` is tiled over ``n_layers`` (``"M"`` = all Miras, ``"T"`` = Transformer++,
    ``"MMA"`` = two Miras layers then one sliding-window attention layer, repeated); its length
    must divide ``n_layers``. ``ffn_hidden`` = SwiGLU width; when None it is ``8/3 * d_model``
    rounded up to ``ffn_multiple_of``. ``miras`` is a dict accepted by ``MirasSpec.from_dict``.
    ``eta_max`` caps the inner learning rate ``eta = sigmoid(.) * eta_max``; unset (None) it is
    0.1 for kl retention (Memora) and 1.0 otherwise (:data:`DEFAULT_ETA_MAX`).
    """

    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 16
    ffn_hidden: int | None = None
    ffn_multiple_of: int = 64
    layer_pattern: str = "M"
    miras: dict = field(default_factory=lambda: {"preset": "moneta"})
    chunk_size: int = 64
    conv_size: int = 4
    gate_rank: int = 32
    eta_max: float | None = None
    window: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    norm_eps: float = 1e-6
    activation_checkpointing: bool = False
    backend: str = "auto"

    # ----- validation ------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of",
                    "chunk_size", "conv_size", "gate_rank", "window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(key, value, "use a positive integer")
        if self.ffn_hidden is not None and (
            isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int)
            or self.ffn_hidden < 1
        ):
            raise _bad("ffn_hidden", self.ffn_hidden, "use a positive integer or null (8/3 * d_model)")
        for key in ("eta_max", "rope_theta", "init_std", "norm_eps"):
            value = getattr(self, key)
            if key == "eta_max" and value is None:
                continue  # the retention's default, set once the miras section is parsed below
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise _bad(key, value, "use a finite number > 0")
            setattr(self, key, float(value))
        for key in ("tie_embeddings", "activation_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "use true or false")
        if self.d_model % self.n_heads:
            raise _bad("n_heads", self.n_heads, f"d_model={self.d_model} must be divisible by n_heads")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern or any(
            c not in LAYER_KINDS for c in self.layer_pattern
        ):
            raise _bad("layer_pattern", self.layer_pattern,
                       "use a non-empty string of M (Miras), A (sliding-window attention), T (full attention)")
        if self.n_layers % len(self.layer_pattern):
            raise _bad("layer_pattern", self.layer_pattern,
                       f"its length must divide n_layers={self.n_layers} (the pattern is tiled)")
        if self.backend not in BACKENDS:
            raise _bad("backend", self.backend, f"choose one of {', '.join(BACKENDS)}")
        if not isinstance(self.miras, dict):
            raise _bad("miras", self.miras, "use a mapping such as {preset: moneta}")
        try:
            spec = MirasSpec.from_dict(self.miras)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ModelConfig.miras: {err}") from None
        if self.eta_max is None:
            self.eta_max = DEFAULT_ETA_MAX.get(spec.retention, 1.0)
        if "M" in self.layer_pattern and spec.memory == "mlp" and self.head_dim < 2:
            raise _bad("n_heads", self.n_heads, "the MLP memory needs head_dim >= 2")

    # ----- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def spec(self) -> MirasSpec:
        return MirasSpec.from_dict(self.miras)

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        raw = int(math.ceil(8 * self.d_model / 3))
        m = self.ffn_multiple_of
        return ((raw + m - 1) // m) * m

    def layer_kinds(self) -> list[str]:
        """Kind of every layer: ``"miras"``, ``"sliding_attention"`` or ``"attention"``."""
        reps = self.n_layers // len(self.layer_pattern)
        return [LAYER_KINDS[c] for c in self.layer_pattern * reps]

    # ----- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig: expected a mapping of fields, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(
                    f"ModelConfig: unknown key {key!r}: remove it or use one of {', '.join(known)}"
                )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found: pass an existing YAML file "
                                    "(see configs/models/)")
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["miras"] = dict(self.miras)
        return out
