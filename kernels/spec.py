"""The Miras design grid as a validated dataclass.

A Miras memory is four choices (see ``docs/semantics.md``):

* ``memory``     -- ``linear`` (M(W, x) = W x) or ``mlp`` (M(x) = x + LN(W1 gelu(W2 x))).
* ``bias``       -- the inner loss: ``dot``, ``l2``, ``lp`` or ``huber``.
* ``retention``  -- the forgetting regulariser: ``none``, ``decay``, ``lq`` or ``kl``.
* ``learner``    -- ``gd`` or ``momentum``.

Every combination is valid. The recurrent *state* is a dict of tensors per head. For each
weight matrix (``"W"`` for linear memory; ``"W1"`` and ``"W2"`` for MLP memory) the state holds
the retention's *free variable* ``X``, from which the weights are derived:

* ``none`` / ``decay``: ``X`` is the weight itself, ``W = X``.
* ``lq`` (Moneta):      ``X`` is the accumulator ``A``, ``W = A / (||A||_q + eps)^(q-2)``.
* ``kl`` (Memora):      ``X`` is the logit matrix ``Z``, ``W = c * softmax(Z, dim=-1)``.

With ``learner="momentum"`` the state also holds ``"S_<name>"`` (same shape as ``X``).

Shapes (``B`` batch or documents, ``H`` heads, ``dk``/``dv`` key/value head dims, ``d`` the MLP
memory's head dim (``dk == dv == d``), ``e`` the expansion):

* linear: ``W``  ``[B, H, dv, dk]``
* mlp:    ``W1`` ``[B, H, d, e*d]`` and ``W2`` ``[B, H, e*d, d]`` (``M(x) = x + LN(W1 gelu(W2 x))``)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

MEMORIES = ("linear", "mlp")
BIASES = ("dot", "l2", "lp", "huber")
RETENTIONS = ("none", "decay", "lq", "kl")
LEARNERS = ("gd", "momentum")
# Where the inner gradient is taken (docs/semantics.md): at the previous state (Miras, DeltaNet)
# or at the retained state, i.e. after the retention gate (Gated DeltaNet's order).
STEP_AT = ("previous", "retained")
# How a chunk of C > 1 tokens is computed: mini-batch GD (every gradient of a chunk at the
# chunk-start state; Titans, TTT, the Miras models) or exactly the per-token rule (the delta rule's
# WY form; DeltaNet, Gated DeltaNet).
CHUNK_RULES = ("minibatch", "exact")
# Where lq / kl apply their nonlinearity inside a chunk: per token (the default) or only at chunk
# boundaries (the paper's chunk semantics for Moneta and Memora).
RETENTION_CHUNKINGS = ("per_token", "boundary")

# Smoothing of |x| ~ sqrt(x^2 + eps) used by the l_p gradient (``docs/semantics.md``, per-bias rules).
SMOOTH_ABS_EPS = 1e-6
# Default smoothing of Yaad's l1-branch sign, sign(x) ~ x / sqrt(x^2 + huber_eps) (the paper's
# Remark 5 smooth |x|). Its slope at 0 is 1/sqrt(huber_eps): 1e-6 (slope 1000) made the outer
# gradient through the inner gradient spike on recall (Yaad's MQAR accuracy 0.117 vs 0.381 at
# 1e-2 after 300 steps, docs/training_health.md); 1e-2 caps the slope at 10, as steep as the
# paper's tanh(10 x).
HUBER_EPS = 1e-2
# Layer-norm epsilon inside the MLP memory (``docs/semantics.md``, memory architectures).
MEMORY_LN_EPS = 1e-5


def _metadata_violation(value, meta) -> str | None:
    """What is wrong with ``value`` under a field's metadata (choices / gt / ge / finite /
    integer), phrased with its ``fix`` text, or None when it is fine."""
    if "choices" in meta:
        return None if value in meta["choices"] else f"choose one of {', '.join(meta['choices'])}"
    fix = meta.get("fix", "out of range")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return fix
    if meta.get("integer") and not (math.isfinite(value) and int(value) == value):
        return fix
    if meta.get("finite") and not math.isfinite(value):
        return fix
    if ("gt" in meta and not value > meta["gt"]) or ("ge" in meta and not value >= meta["ge"]):
        return fix
    return None


@dataclass(frozen=True)
class MirasSpec:
    """One point of the Miras grid plus its hyper-parameters.

    Attributes:
        memory: ``"linear"`` or ``"mlp"``.
        bias: ``"dot"``, ``"l2"``, ``"lp"`` or ``"huber"``.
        retention: ``"none"``, ``"decay"``, ``"lq"`` or ``"kl"``.
        learner: ``"gd"`` or ``"momentum"``.
        p: exponent of the l_p attentional bias (``bias="lp"``), > 1.
        q: exponent of the l_q retention (``retention="lq"``), >= 2.
        expansion: hidden width factor ``e`` of the MLP memory.
        c: scale of Memora's softmax weights (``retention="kl"``), > 0.
        lq_eps: the ``eps`` in ``A / (||A||_q + eps)^(q-2)``.
        huber_eps: the ``eps`` of the smooth sign ``e / sqrt(e^2 + eps)`` in the Huber bias's l1
            branch (``bias="huber"``), > 0; the slope at 0 is ``1/sqrt(eps)``.
        step_at: ``"previous"`` (gradient at the state before the token) or ``"retained"``
            (gradient at the state after the retention gate, Gated DeltaNet's order).
        chunk_rule: ``"minibatch"`` (all gradients of a chunk at the chunk-start state) or
            ``"exact"`` (the per-token rule at any chunk size; linear memory, l2 bias, none/decay
            retention, gd learner only).
        retention_chunking: ``"per_token"`` or ``"boundary"`` (the paper's chunk semantics: lq's
            normalisation and kl's softmax step only at chunk boundaries; lq/kl only).
    """

    # Choices and bounds are plain field metadata (choices, gt, ge, finite, integer, fix, doc) so
    # that miras_pretrain's config schema engine reads them without this package importing it;
    # __post_init__ applies the same metadata to a spec built in code.
    memory: str = field(default="linear", metadata=dict(
        choices=MEMORIES, doc="memory architecture: linear (W x) or mlp (x + LN(W1 gelu(W2 x)))"))
    bias: str = field(default="l2", metadata=dict(
        choices=BIASES, doc="attentional bias (the inner loss)"))
    retention: str = field(default="decay", metadata=dict(
        choices=RETENTIONS, doc="retention gate (the forgetting regulariser)"))
    learner: str = field(default="gd", metadata=dict(
        choices=LEARNERS, doc="memory learning algorithm"))
    p: float = field(default=3.0, metadata=dict(
        gt=1.0, finite=True, fix="the l_p bias needs a finite p > 1", doc="exponent of the l_p bias"))
    q: float = field(default=4.0, metadata=dict(
        ge=2.0, finite=True, fix="the l_q retention needs a finite q >= 2", doc="exponent of the l_q retention"))
    expansion: int = field(default=4, metadata=dict(
        ge=1, integer=True, fix="use a positive integer (paper: 4)", doc="hidden width factor of the MLP memory"))
    c: float = field(default=1.0, metadata=dict(
        gt=0.0, fix="Memora's scale c must be > 0", doc="scale of Memora's softmax weights"))
    lq_eps: float = field(default=1e-6, metadata=dict(
        gt=0.0, fix="use a small positive number", doc="eps in A / (||A||_q + eps)^(q-2)"))
    huber_eps: float = field(default=HUBER_EPS, metadata=dict(
        gt=0.0, finite=True, fix=f"use a finite number > 0 (default {HUBER_EPS})",
        doc="eps of the Huber bias's smooth sign"))
    step_at: str = field(default="previous", metadata=dict(
        choices=STEP_AT, doc="where the inner gradient is taken: previous state, or retained state (Gated DeltaNet)"))
    chunk_rule: str = field(default="minibatch", metadata=dict(
        choices=CHUNK_RULES, doc="chunk semantics: minibatch GD, or exact per-token rule (delta rule only)"))
    retention_chunking: str = field(default="per_token", metadata=dict(
        choices=RETENTION_CHUNKINGS, doc="lq/kl nonlinearity per token, or only at chunk boundaries (paper)"))

    PRESETS: ClassVar[dict[str, dict]] = {
        # The paper's new models.
        "moneta": dict(memory="mlp", bias="lp", retention="lq", learner="gd", p=3.0, q=4.0),
        "yaad": dict(memory="mlp", bias="huber", retention="decay", learner="gd"),
        "memora": dict(memory="mlp", bias="l2", retention="kl", learner="gd"),
        # Baselines that are points of the same grid.
        "titans": dict(memory="mlp", bias="l2", retention="decay", learner="momentum"),
        "ttt_mlp": dict(memory="mlp", bias="l2", retention="none", learner="gd"),
        # DeltaNet and Gated DeltaNet are published with exact chunking (the WY / UT form of the
        # per-token rule), and Gated DeltaNet retains before it steps: S_t = a_t S_{t-1}(I - b_t
        # k_t k_tᵀ) + b_t v_t k_tᵀ. Their presets compute those models at every chunk size.
        "deltanet": dict(memory="linear", bias="l2", retention="none", learner="gd", chunk_rule="exact"),
        "gated_delta": dict(memory="linear", bias="l2", retention="decay", learner="gd", chunk_rule="exact",
                            step_at="retained"),
        "linear_attn": dict(memory="linear", bias="dot", retention="none", learner="gd"),
        "gla": dict(memory="linear", bias="dot", retention="decay", learner="gd"),
    }

    def __post_init__(self) -> None:
        # Single-field rules from the metadata above. Every combination of the four grid choices
        # is valid; the only cross-field rules are where a chunk form cannot exist.
        for f in dataclasses.fields(self):
            what = _metadata_violation(getattr(self, f.name), f.metadata)
            if what:
                raise ValueError(f"MirasSpec.{f.name}={getattr(self, f.name)!r} is not valid: {what}")
        if self.chunk_rule == "exact" and not self.exact_chunking_exists:
            raise ValueError(
                f"MirasSpec.chunk_rule='exact' is not valid for memory={self.memory!r}, bias={self.bias!r}, "
                f"retention={self.retention!r}, learner={self.learner!r}: exact chunking exists only for the "
                "delta rule (memory linear, bias l2, retention none/decay, learner gd); use chunk_rule='minibatch'"
            )
        if self.retention_chunking == "boundary" and self.retention not in ("lq", "kl"):
            raise ValueError(
                f"MirasSpec.retention_chunking='boundary' is not valid for retention={self.retention!r}: "
                "only lq and kl have a nonlinearity to move to chunk boundaries; use 'per_token'"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> "MirasSpec":
        """The spec of a named model (``moneta``, ``yaad``, ``memora``, ``titans``, ``ttt_mlp``,
        ``deltanet``, ``gated_delta``, ``linear_attn``, ``gla``), with optional field overrides."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown Miras preset {name!r}: choose one of {', '.join(sorted(cls.PRESETS))}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "MirasSpec":
        """Build a spec from a plain dict (a config section); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"preset"})
        if unknown:
            raise ValueError(
                f"unknown MirasSpec field(s) {unknown}: valid fields are {sorted(known)} (or 'preset')"
            )
        data = dict(data)
        name = data.pop("preset", None)
        return cls.preset(name, **data) if name else cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ----- what the rule needs -------------------------------------------------------------
    @property
    def needs_alpha(self) -> bool:
        """Retention ``none`` has no forgetting gate; every other retention decays by alpha."""
        return self.retention != "none"

    @property
    def exact_chunking_exists(self) -> bool:
        """True where the per-token rule has an exact chunk-parallel form (the delta rule's WY /
        UT transform): linear memory, l2 bias, none/decay retention, gd learner."""
        return (self.memory == "linear" and self.bias == "l2"
                and self.retention in ("none", "decay") and self.learner == "gd")

    @property
    def steps_on_retained(self) -> bool:
        """True when the inner gradient is taken at the retained state (``step_at="retained"``)
        and the retention actually moves the state (``none`` has alpha = 1, so both orders agree
        and the cheaper ``previous`` form is used)."""
        return self.step_at == "retained" and self.retention != "none"

    @property
    def needs_delta(self) -> bool:
        return self.bias == "huber"

    @property
    def bias_eps(self) -> float:
        """Smoothing constant of the active bias's |x| / sign: ``huber_eps`` for huber, else the
        l_p gradient's :data:`SMOOTH_ABS_EPS` (kernels take it as their ``EPS``)."""
        return self.huber_eps if self.bias == "huber" else SMOOTH_ABS_EPS

    @property
    def needs_mu(self) -> bool:
        return self.learner == "momentum"

    @property
    def weights_are_state(self) -> bool:
        """True when ``materialize`` is the identity (``W = X``): retention none or decay, and lq
        at q = 2, which normalises nothing. Such a memory reads and updates its state directly."""
        return self.retention in ("none", "decay") or (self.retention == "lq" and self.q == 2.0)

    @property
    def is_affine(self) -> bool:
        """True when the chunk update is affine in the state: linear memory, dot/l2 bias,
        none/decay retention (gd or momentum). Sequence parallelism can then combine states by
        an all-gather instead of passing them rank to rank."""
        return (
            self.memory == "linear"
            and self.bias in ("dot", "l2")
            and self.retention in ("none", "decay")
        )

    def weight_names(self) -> tuple[str, ...]:
        return ("W",) if self.memory == "linear" else ("W1", "W2")

    def state_keys(self) -> tuple[str, ...]:
        names = self.weight_names()
        if self.learner == "momentum":
            return names + tuple(f"S_{n}" for n in names)
        return names

    def weight_shapes(self, dk: int, dv: int) -> dict[str, tuple[int, int]]:
        """Per-head shape of every weight matrix (and so of its free variable)."""
        if self.memory == "linear":
            return {"W": (dv, dk)}
        if dk != dv:
            raise ValueError(
                f"memory='mlp' needs equal key and value head dims (got dk={dk}, dv={dv}): "
                "the residual x + LN(...) maps a head vector to one of the same size"
            )
        hidden = int(self.expansion) * dk
        return {"W1": (dk, hidden), "W2": (hidden, dk)}

    def materialize(self, x: torch.Tensor) -> torch.Tensor:
        """Weights from the retention's free variable ``x`` (``[..., rows, cols]``).

        ``none``/``decay``: identity. ``lq``: ``x / (||x||_q + eps)^(q-2)`` with the q-norm over
        the last two dims. ``kl``: ``c * softmax(x, dim=-1)`` (over the input dimension).
        """
        if self.retention == "lq":
            if self.q == 2.0:
                return x
            return x * self.lq_scale(x)
        if self.retention == "kl":
            return self.c * torch.softmax(x, dim=-1)
        return x

    def lq_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Moneta's normalisation factor ``(||x||_q + eps)^(2-q)`` (``[..., 1, 1]``) so that
        ``materialize(x) = x * lq_scale(x)``. ``vector_norm`` is one fused op and its gradient
        stays finite at x = 0 (``|x|^q`` summed then raised to ``1/q`` would give 0 * inf)."""
        return (self.lq_norm(x) + self.lq_eps).pow(2.0 - self.q)

    def lq_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``||x||_q`` over the last two dims (``[..., 1, 1]``), the norm inside :meth:`lq_scale`."""
        if self.q == 4.0:
            # ||x||_4 = sqrt(||x*x||_2): the 2-norm kernel is ~10x faster than a generic-order one
            # (clamped at the smallest normal number so the gradient at x = 0 stays finite)
            n2 = torch.linalg.vector_norm(x * x, ord=2, dim=(-2, -1), keepdim=True)
            return n2.clamp_min(torch.finfo(n2.dtype).tiny).sqrt()
        return torch.linalg.vector_norm(x, ord=self.q, dim=(-2, -1), keepdim=True)

    def free_variable_from_weights(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`materialize` where one exists (``kl``: ``log(W / c)``, needs W > 0;
        ``none``/``decay``: identity). ``lq`` is not invertible in closed form for q > 2, so its
        state is always the accumulator itself."""
        if self.retention == "kl":
            if bool((w <= 0).any()):
                raise ValueError("retention='kl' needs strictly positive initial weights (W = c*softmax(Z))")
            return torch.log(w / self.c)
        if self.retention == "lq" and self.q != 2.0:
            raise ValueError("retention='lq' state is the accumulator A; pass A, not the weights")
        return w
