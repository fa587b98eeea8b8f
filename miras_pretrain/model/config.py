"""``ModelConfig``: every architecture knob of the language model, and how a config names one.

A ``model:`` section (training config) or a model YAML file is one of:

* a registered name -- ``moneta_340m`` (:mod:`miras_pretrain.model.registry`, listed by
  ``miras-pretrain models``);
* a path to a model YAML file (relative to the CWD or to the config file's directory);
* a mapping of ``ModelConfig`` fields, optionally based on ``preset`` + ``size`` or on
  ``from: <name or path>``, whose other keys override the base.

:func:`expand_model_section` turns any of these into a flat mapping of fields; the schema engine
(:mod:`miras_pretrain.schema`) validates it into a ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miras_kernels.spec import MirasSpec

from miras_pretrain import config_yaml, schema
from miras_pretrain.model import registry

# Layer kinds in ``layer_pattern``: M = Miras mixer, A = sliding-window softmax attention,
# T = full causal softmax attention (Transformer++).
LAYER_KINDS = {"M": "miras", "A": "sliding_attention", "T": "attention"}
BACKENDS = ("auto", "recurrent", "chunked", "triton")


# The cap of the inner learning rate eta = sigmoid(.) * eta_max, by retention, when a config
# leaves ``eta_max`` unset (eta starts at eta_max / 2).
# - kl (Memora) steps in logit space (exponentiated gradient, W = c softmax(Z), Z -= eta g), which
#   is stable only while eta * |g| stays O(1); with near-uniform softmax rows the memory's
#   LayerNorm sees an almost constant vector, its 1/std saturates at 1/sqrt(eps) ~ 316 and |g| is
#   ~10-100, so eta up to 1.0 blew the first steps' gradient norm up to 1e4
#   (docs/training_health.md). 0.1 trains stably.
# - lq (Moneta, MLP memory): the normalisation W = A / ||A||_q^(q-2) and the memory's LayerNorm on
#   a small initial memory make one step move W 30-100x further than the same eta moves an
#   unnormalised memory: written into directly (tools/memory_capacity.py), a Moneta memory stores
#   8 pairs at eta 0.001-0.003 and loses them by eta 0.03 at head dims 32-128, where Titans and
#   Memora need 0.03-0.3. At 1.0 Moneta trained a good short-range language model but could not
#   recall (MQAR 0.18 vs 0.95 for Titans), 0.01-0.1 was unstable (gradient norms 230-979), 0.003
#   recalls (0.83) and trains stably (docs/results.md).
# Every other grid point keeps 1.0.
DEFAULT_ETA_MAX = {("mlp", "kl"): 0.1, ("linear", "kl"): 0.1, ("mlp", "lq"): 0.003}


def default_eta_max(spec: MirasSpec) -> float:
    """The ``eta_max`` a config gets when it leaves it unset (:data:`DEFAULT_ETA_MAX`). lq with
    q = 2 normalises nothing (``W = A``, the decay retention) and keeps 1.0."""
    if spec.weights_are_state:
        return 1.0
    return DEFAULT_ETA_MAX.get((spec.memory, spec.retention), 1.0)

_POSITIVE = dict(ge=1, fix="use a positive integer")
_POSITIVE_NUMBER = dict(gt=0, finite=True, fix="use a finite number > 0")


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A field with its config-reference line and constraints (schema metadata)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **meta})
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class ModelConfig:
    """Llama-style pre-norm decoder with Miras / attention token mixers.

    ``layer_pattern`` is tiled over ``n_layers`` (``"M"`` = all Miras, ``"T"`` = Transformer++,
    ``"MMA"`` = two Miras layers then one sliding-window attention layer, repeated); its length
    must divide ``n_layers``. ``ffn_hidden`` = SwiGLU width; when None it is ``8/3 * d_model``
    rounded up to ``ffn_multiple_of``. ``miras`` is a mapping of ``MirasSpec`` fields, optionally
    with ``preset``. ``eta_max`` caps the inner learning rate ``eta = sigmoid(.) * eta_max``;
    unset (None) it is 0.1 for kl retention (Memora), 0.003 for an MLP memory with lq retention
    (Moneta) and 1.0 otherwise (:func:`default_eta_max`).
    Construction validates every field (one-line ``ConfigError`` naming ``model.<field>``).
    """

    vocab_size: int = _f(32000, "vocabulary size (the tokenizer's)", **_POSITIVE)
    d_model: int = _f(768, "residual width", **_POSITIVE)
    n_layers: int = _f(12, "number of blocks", **_POSITIVE)
    n_heads: int = _f(16, "heads of every mixer; must divide d_model", **_POSITIVE)
    ffn_hidden: int | None = _f(None, "SwiGLU width; null = 8/3 d_model rounded up to ffn_multiple_of",
                                ge=1, fix="use a positive integer or null (8/3 * d_model)")
    ffn_multiple_of: int = _f(64, "rounding of the default ffn_hidden", **_POSITIVE)
    layer_pattern: str = _f("M", "layer kinds tiled over n_layers: M Miras, A sliding-window "
                                 "attention, T full attention")
    miras: dict = _f({"preset": "moneta"}, "the Miras memory: {preset: NAME} and/or MirasSpec fields "
                     "(model.miras.* rows)", fix="use a mapping such as {preset: moneta}")
    chunk_size: int = _f(64, "chunk length of the chunk-parallel memory", **_POSITIVE)
    conv_size: int = _f(4, "depthwise causal conv width on q, k, v", **_POSITIVE)
    gate_rank: int = _f(32, "rank of the low-rank gate projections", **_POSITIVE)
    eta_max: float | None = _f(None, "cap of the inner learning rate; null = 0.1 for kl retention, "
                                     "0.003 for MLP memory with lq retention (Moneta), 1.0 otherwise",
                               **_POSITIVE_NUMBER)
    window: int = _f(512, "sliding-window attention width (A layers)", **_POSITIVE)
    rope_theta: float = _f(10000.0, "RoPE base", **_POSITIVE_NUMBER)
    tie_embeddings: bool = _f(False, "share input embedding and output head")
    init_std: float = _f(0.02, "std of the normal weight init", **_POSITIVE_NUMBER)
    embed_init_std: float | None = _f(None, "std of the token embedding's init; null = init_std (a small "
                                      "attention model on a recall task needs ~1.0 to leave its start)",
                                      gt=0, finite=True, fix="use a number > 0, or null for init_std")
    memory_init_std: float | None = _f(None, "MLP memory only: std of the initial weights W1, W2 (for kl "
                                       "the logits Z); null = the rule by retention (memory_init_std in "
                                       "model/miras_mixer.py)", gt=0, finite=True,
                                       fix="use a number > 0, or null for the rule by retention")
    huber_delta: float | None = _f(None, "Huber bias only: null = the threshold is learned per token and "
                                   "head (a softplus gate, Yaad); a number = that fixed threshold, no gate",
                                   gt=0, finite=True, fix="use a number > 0, or null for the learned gate")
    norm_eps: float = _f(1e-6, "RMSNorm epsilon", **_POSITIVE_NUMBER)
    activation_checkpointing: bool = _f(False, "recompute every block in backward (the one switch: "
                                               "there is no train.activation_checkpointing)")
    backend: str = _f("auto", "memory operator backend", choices=BACKENDS)

    def __post_init__(self) -> None:
        schema.validate(self, "model")

    def check(self, prefix: str) -> None:
        """Cross-field rules (the schema engine checked each field already)."""
        if self.d_model % self.n_heads:
            raise schema.bad_value(f"{prefix}.n_heads", self.n_heads,
                                   f"d_model={self.d_model} must be divisible by n_heads")
        if not self.layer_pattern or any(c not in LAYER_KINDS for c in self.layer_pattern):
            raise schema.bad_value(f"{prefix}.layer_pattern", self.layer_pattern, "unknown layer kind",
                                   "use a non-empty string of M (Miras), A (sliding-window attention), "
                                   "T (full attention)")
        if self.n_layers % len(self.layer_pattern):
            raise schema.bad_value(f"{prefix}.layer_pattern", self.layer_pattern,
                                   f"its length must divide n_layers={self.n_layers} (the pattern is tiled)")
        spec = parse_miras(self.miras, f"{prefix}.miras")
        if self.eta_max is None:
            self.eta_max = default_eta_max(spec)
        if self.huber_delta is not None and not spec.needs_delta:
            raise schema.bad_value(f"{prefix}.huber_delta", self.huber_delta,
                                   f"the memory's bias is {spec.bias!r}: a threshold applies to the huber bias only",
                                   "leave it null, or use a huber bias (e.g. miras: {preset: yaad})")
        if "M" in self.layer_pattern and spec.memory == "mlp" and self.head_dim < 2:
            raise schema.bad_value(f"{prefix}.n_heads", self.n_heads, "the MLP memory needs head_dim >= 2",
                                   "use fewer heads")

    # ----- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def spec(self) -> MirasSpec:
        return MirasSpec.from_dict(self.miras)

    @property
    def gate_names(self) -> list[str]:
        """The per-token gates a Miras layer computes, in the gate projection's column order
        (alpha, eta, delta, mu, each where the spec uses it; no delta with a fixed huber_delta)."""
        spec = self.spec
        names = ["eta"]
        if spec.needs_alpha:
            names.insert(0, "alpha")
        if spec.needs_delta and self.huber_delta is None:
            names.append("delta")
        if spec.needs_mu:
            names.append("mu")
        return names

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
    def from_dict(cls, data: dict, prefix: str = "model") -> "ModelConfig":
        """Validate a flat mapping of fields (unknown keys name the closest field)."""
        return schema.build(cls, data, prefix)

    @classmethod
    def from_ref(cls, ref: str | Path, base_dir: str | Path = ".") -> "ModelConfig":
        """A registered name (``moneta_340m``) or a model YAML path, as the ``model:`` key takes."""
        return cls.from_dict(expand_model_section(str(ref), base_dir))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """A model YAML file: fields, optionally on a ``preset``/``size`` or ``from:`` base."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found: pass an existing YAML file "
                                    "or a registered name (miras-pretrain models)")
        data = config_yaml.read_mapping(path, "model")  # its errors name the file already
        try:
            return cls.from_dict(expand_model_section(data, path.parent))
        except ValueError as err:
            raise schema.ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["miras"] = dict(self.miras)
        return out


def parse_miras(miras: Any, prefix: str) -> MirasSpec:
    """``{preset: NAME, <MirasSpec field overrides>}`` -> a validated ``MirasSpec``; the schema
    engine reads MirasSpec's field metadata (choices, bounds) and MirasSpec its own rules."""
    if not isinstance(miras, dict):
        raise schema.bad_value(prefix, miras, "expected a mapping", "use a mapping such as {preset: moneta}")
    data = dict(miras)
    name = data.pop("preset", None)
    valid = [f.name for f in dataclasses.fields(MirasSpec)] + ["preset"]
    for key in data:
        if key not in valid:
            raise schema.unknown_key(prefix, key, valid)
    if name is not None:
        if name not in MirasSpec.PRESETS:
            raise schema.bad_value(f"{prefix}.preset", name, f"unknown Miras preset {name!r}",
                                   f"choose one of {', '.join(sorted(MirasSpec.PRESETS))}")
        data = {**MirasSpec.PRESETS[name], **data}
    return schema.build(MirasSpec, data, prefix)


_MAX_FROM_DEPTH = 8  # a `from:` chain longer than this is a loop


def expand_model_section(value: Any, base_dir: str | Path = ".", _depth: int = 0) -> dict:
    """A ``model:`` value (name, YAML path, or mapping with ``preset``/``size``/``from``) as a
    flat mapping of ``ModelConfig`` fields; relative paths resolve against ``base_dir``."""
    if _depth > _MAX_FROM_DEPTH:
        raise schema.bad_value("model.from", value, "the from: chain is too long", "check it for a loop")
    if value is None:
        return {}
    if isinstance(value, (str, Path)):
        value = {"from": str(value)}
    if not isinstance(value, dict):
        raise schema.bad_value("model", value, "expected a registered name, a YAML path or a mapping",
                               "see miras-pretrain models")
    value = dict(value)
    base: dict = {}
    ref = value.pop("from", None)
    preset, size = value.pop("preset", None), value.pop("size", None)
    if ref is not None and (preset is not None or size is not None):
        raise schema.bad_value("model.from", ref, "give either from: or preset + size, not both")
    if preset is not None or size is not None:
        if preset is None or size is None:
            raise schema.bad_value("model.preset" if preset is None else "model.size", None,
                                   "preset and size go together", "e.g. {preset: moneta, size: 340m}")
        base = registry.registry_fields(str(preset), str(size))
    elif ref is not None:
        base = _expand_ref(str(ref), base_dir, _depth)
    miras = value.pop("miras", None)
    base.update(value)
    if miras is not None:
        base["miras"] = _merge_miras(base.get("miras"), miras)
    return base


def _merge_miras(base: Any, override: Any) -> Any:
    """The ``miras`` mapping of a model built on a base (registry name, ``from:`` file): fields given
    over a base refine the base's memory (``{p: 2}`` over Moneta is Moneta with p = 2); a new
    ``preset`` starts from that preset instead. Replacing the mapping wholesale would silently turn
    ``{p: 2}`` into the default (linear) spec with p = 2."""
    if not isinstance(base, dict) or not isinstance(override, dict) or "preset" in override:
        return override
    return {**base, **override}


def _expand_ref(ref: str, base_dir: str | Path, depth: int) -> dict:
    """``from:`` target: a registered name, else a model YAML file (which may itself use
    ``from``/``preset``/``size``, relative to its own directory)."""
    named = registry.split_name(ref)
    if named:
        return registry.registry_fields(*named)
    path = config_yaml.resolve_path(ref, base_dir)
    if not path.is_file() and not ref.endswith((".yaml", ".yml")) and "/" not in ref:
        guess = schema.closest(ref, registry.model_names())
        hint = f"did you mean '{guess}'? " if guess else ""
        raise schema.bad_value("model", ref, "not a registered model name or a YAML file",
                               f"{hint}(miras-pretrain models lists the names)")
    return expand_model_section(config_yaml.read_mapping(path, "model.from"), path.parent, depth + 1)
