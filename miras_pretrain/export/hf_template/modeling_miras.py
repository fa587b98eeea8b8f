"""Miras language model for inference with Hugging Face transformers (pure PyTorch).

Written next to the weights by ``miras-pretrain export hf``, together with copies of the training
operator's modules that hold the memory rules (``miras_spec.py``, ``miras_rules.py``,
``miras_chunk_step.py``); needs torch and transformers only. Load with::

    model = AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

Numerics follow the training code (the same rules, fp32 memory state): a prompt runs through the
chunk-parallel form of the memory (``memory_chunk_step``); every later token runs through the same
chunk math with a run of one token.

Recurrent cache (``MirasCache``), per layer:

* Miras layer: the memory's free variables ``X`` (and momentum ``S``) ``[B, H, r, c]`` after the
  last seen token, what the start of the chunk the next token belongs to fixed (``frozen``, see
  ``miras_chunk_step.freeze``: the weights ``W0 = materialize(X_{t0})``; with
  ``step_at="retained"`` the free variable ``X_{t0}`` carried by the retention to the last seen
  token; nothing for the exact delta rule), the last ``conv_size - 1`` pre-convolution q/k/v
  projections, and the position.
* Attention layer: keys/values ``[B, H, L, d]`` (all tokens for full attention, the last
  ``window - 1`` for sliding-window attention) and the position.

Chunk grid: with mini-batch GD training takes every inner gradient of a chunk of ``chunk_size``
tokens (counted from the sequence start) at the weights frozen at the chunk start (or at their
retained copy). Keeping ``frozen`` in the cache and re-freezing exactly when ``position %
chunk_size == 0`` makes cached decoding, and prefill in pieces of any length, compute the same
function as one full forward pass. The exact delta rule (``chunk_rule="exact"``: DeltaNet, Gated
DeltaNet) does not depend on the grid at all. Each new token
costs O(1) in the prompt length for Miras layers (O(window) for sliding attention).

Padding: the memory reads every token, so only un-padded batches are supported when a cache is
used; right padding is accepted with ``use_cache=False`` (e.g. scoring). Left padding raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_miras import MirasConfig

# The memory rules are the training operator's own modules, copied next to this file by the
# export (``miras_kernels.spec``, ``.rules``, ``.chunk_step``). transformers copies only the
# modules this file imports itself, so each copy is imported here, the rules too.
from .miras_chunk_step import carry_frozen, freeze, memory_chunk_step
from .miras_rules import grad_factors  # noqa: F401  (imported so that transformers copies it)
from .miras_spec import MirasSpec


# =============================================================================== memory
def continue_memory(spec: MirasSpec, chunk_size: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    gates: dict[str, torch.Tensor], state: dict) -> tuple[torch.Tensor, dict]:
    """Run the memory over T new tokens, continuing ``state`` on the training chunk grid.

    The tokens are cut where a chunk of the grid (counted from the sequence start) begins; at
    each such boundary the weights are frozen anew, as in training, and every run between cuts
    is one :func:`memory_chunk_step`.

    Args:
        q, k, v: ``[B, H, T, d]``.
        gates: gate name (``alpha``, ``eta``, ``delta``, ``mu``) -> ``[B, H, T]``.
        state: ``{"X", "S", "frozen": name -> [B, H, r, c] (see ``freeze``), "pos": tokens seen}``.

    Returns:
        ``y`` ``[B, H, T, d]`` and the new state (same keys).
    """
    T = q.shape[2]
    X, S, frozen, pos = state["X"], state["S"], state["frozen"], state["pos"]
    ys, s = [], 0
    while s < T:
        off = pos % chunk_size
        if off == 0:  # a new chunk of the training grid starts: freeze its weights
            frozen = freeze(spec, X)
        c = min(chunk_size - off, T - s)
        cut = lambda t: None if t is None else t[:, :, s:s + c]  # noqa: E731
        y, X, S = memory_chunk_step(spec, cut(q), cut(k), cut(v), cut(gates.get("alpha")), cut(gates["eta"]),
                                    cut(gates.get("delta")), cut(gates.get("mu")), X, S, frozen)
        frozen = carry_frozen(spec, frozen, cut(gates.get("alpha")))
        ys.append(y)
        s += c
        pos += c
    return torch.cat(ys, dim=2), {"X": X, "S": S, "frozen": frozen, "pos": pos}


# =============================================================================== layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE: x [B, T, H, d], pos [T] -> [B, T, H, d]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    xf = x.float()
    rot = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], -1)
    return (xf * cos + rot * sin).to(x.dtype)


def _causal_conv(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None):
    """Causal depthwise conv continuing ``tail`` (the previous K-1 inputs, zeros at the start).
    x [B, T, C], weight [C, K] -> out [B, T, C], new tail [B, K-1, C]."""
    t, k = x.shape[1], weight.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], k - 1, x.shape[2])
    full = torch.cat([tail, x], dim=1)
    out = x * weight[:, k - 1]
    for shift in range(1, k):
        out = out + full[:, k - 1 - shift:k - 1 - shift + t] * weight[:, k - 1 - shift]
    return out, full[:, full.shape[1] - (k - 1):]


class MirasMixer(nn.Module):
    """q/k/v projections + causal conv + SiLU, l2-normalised q/k, per-head gates, the memory,
    per-head RMSNorm, output gate, output projection. x [B, T, D] -> [B, T, D]."""

    def __init__(self, config: MirasConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = MirasSpec.from_dict(config.miras_spec)
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d, inner, K = config.hidden_size, config.num_attention_heads * config.head_dim, config.conv_size
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.g_proj = nn.Linear(d, inner, bias=False)
        self.o_proj = nn.Linear(inner, d, bias=False)
        self.q_conv = nn.Parameter(torch.zeros(inner, K))
        self.k_conv = nn.Parameter(torch.zeros(inner, K))
        self.v_conv = nn.Parameter(torch.zeros(inner, K))
        # the training mixer's gate order: one column of gate_up per head and gate
        self.gate_names = ["eta"]
        if self.spec.needs_alpha:
            self.gate_names.insert(0, "alpha")
        if self.spec.needs_delta and config.huber_delta is None:
            self.gate_names.append("delta")
        if self.spec.needs_mu:
            self.gate_names.append("mu")
        self.gate_down = nn.Linear(d, config.gate_rank, bias=False)
        self.gate_up = nn.Linear(config.gate_rank, self.n_heads * len(self.gate_names), bias=True)
        self.out_norm = nn.Parameter(torch.ones(self.n_heads, self.head_dim))
        self.mem_init = nn.ParameterDict()
        if self.spec.memory == "mlp":
            for name, (r, c) in self.spec.weight_shapes(self.head_dim, self.head_dim).items():
                self.mem_init[name] = nn.Parameter(torch.zeros(self.n_heads, r, c))

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        X = {}
        for name, (r, c) in self.spec.weight_shapes(self.head_dim, self.head_dim).items():
            if name in self.mem_init:
                X[name] = self.mem_init[name].to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
            else:
                X[name] = torch.zeros(batch, self.n_heads, r, c, device=device, dtype=dtype)
        S = {n: torch.zeros_like(x) for n, x in X.items()} if self.spec.learner == "momentum" else {}
        return {"X": X, "S": S, "frozen": {}, "pos": 0, "conv": {}}

    def gates(self, x: torch.Tensor) -> dict:
        b, t, _ = x.shape
        raw = self.gate_up(self.gate_down(x)).float().view(b, t, self.n_heads, -1)
        out = {}
        for i, name in enumerate(self.gate_names):
            z = raw[..., i]
            if name == "eta":
                out[name] = torch.sigmoid(z) * self.config.eta_max
            elif name == "delta":
                out[name] = F.softplus(z)
            else:
                out[name] = torch.sigmoid(z)
        if self.spec.needs_delta and self.config.huber_delta is not None:
            # a fixed Huber threshold: no gate column, the same value everywhere
            out["delta"] = torch.full((b, t, self.n_heads), float(self.config.huber_delta), device=x.device)
        return out

    def forward(self, x: torch.Tensor, state: dict | None):
        b, t, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        cdt = torch.promote_types(x.dtype, torch.float32)  # the memory state is at least fp32
        if state is None:
            state = self.initial_state(b, x.device, cdt)
        conv_tails = {}

        def branch(name, proj, w):
            z, conv_tails[name] = _causal_conv(proj(x), w.to(x.dtype), state["conv"].get(name))
            return F.silu(z).view(b, t, h, dh)

        q = F.normalize(branch("q", self.q_proj, self.q_conv), dim=-1)
        k = F.normalize(branch("k", self.k_proj, self.k_conv), dim=-1)
        v = branch("v", self.v_proj, self.v_conv)
        g = self.gates(x)
        hm = lambda z: z.to(cdt).transpose(1, 2).contiguous()  # noqa: E731  [B,T,H,..] -> [B,H,T,..]
        y, mem = continue_memory(
            self.spec, self.config.chunk_size, hm(q), hm(k), hm(v), {n: hm(z) for n, z in g.items()},
            {key: state[key] for key in ("X", "S", "frozen", "pos")},
        )
        y = y.transpose(1, 2).to(x.dtype)
        yf = y.float()
        y = (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
             * self.out_norm.float()).to(x.dtype)
        y = y * F.silu(self.g_proj(x)).view(b, t, h, dh)
        mem["conv"] = conv_tails
        return self.o_proj(y.reshape(b, t, h * dh)), mem


class Attention(nn.Module):
    """Causal softmax attention with RoPE, full or sliding window; KV cache."""

    def __init__(self, config: MirasConfig, sliding: bool) -> None:
        super().__init__()
        self.config = config
        self.window = config.window if sliding else None
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None):
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        pos0 = 0 if state is None else state["pos"]
        qpos = torch.arange(pos0, pos0 + t, device=x.device)
        q = _rotary(self.q_proj(x).view(shape), qpos, self.config.rope_theta).transpose(1, 2)
        k = _rotary(self.k_proj(x).view(shape), qpos, self.config.rope_theta).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
        kpos = torch.arange(pos0 + t - k.shape[2], pos0 + t, device=x.device)
        if state is None and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = kpos[None, :] <= qpos[:, None]
            if self.window is not None:
                mask &= (qpos[:, None] - kpos[None, :]) < self.window
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.window is not None:  # the next query sees at most window - 1 earlier keys
            start = max(k.shape[2] - (self.window - 1), 0)
            k, v = k[:, :, start:], v[:, :, start:]
        o = o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(o), {"k": k, "v": v, "pos": pos0 + t}


class MirasBlock(nn.Module):
    def __init__(self, config: MirasConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_kinds()[layer_idx]
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.kind == "miras":
            self.mixer = MirasMixer(config)
        else:
            self.mixer = Attention(config, sliding=self.kind == "sliding_attention")
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, state: dict | None):
        mixed, state = self.mixer(self.norm1(h), state)
        h = h + mixed
        return h + self.mlp(self.norm2(h)), state


# =============================================================================== cache
class MirasCache:
    """Recurrent inference state of every layer (see the module docstring)."""

    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.layers: list[dict | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def __len__(self) -> int:
        return len(self.layers)

    def _map(self, fn) -> None:
        def walk(obj):
            if isinstance(obj, torch.Tensor):
                return fn(obj)
            if isinstance(obj, dict):
                return {key: walk(val) for key, val in obj.items()}
            return obj

        self.layers = [walk(s) for s in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "MirasCache":
        """Select batch rows (beam search). Every cached tensor has the batch in dim 0."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))
        return self

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def nbytes(self) -> int:
        """Total bytes held (to show it stays constant for Miras layers)."""
        total = [0]

        def add(t):
            total[0] += t.numel() * t.element_size()
            return t

        self._map(add)
        return total[0]


# =============================================================================== models
class MirasPreTrainedModel(PreTrainedModel):
    config_class = MirasConfig
    base_model_prefix = "model"
    _no_split_modules = ["MirasBlock"]
    _is_stateful = True  # own recurrent cache: generate() must not build a DynamicCache
    supports_gradient_checkpointing = False
    _tied_weights_keys = {}  # nothing tied (transformers 5 expects a mapping, 4.x iterates it)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # stated explicitly (not only via _is_stateful) so every transformers 4.x/5.x generate()
        # leaves past_key_values to the model, which creates its MirasCache on the first call
        return False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)


class MirasModel(MirasPreTrainedModel):
    def __init__(self, config: MirasConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MirasBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, cache: MirasCache | None = None,
                output_hidden_states: bool = False):
        """input_ids [B, T] -> final hidden states [B, T, D] (normed), the updated cache (when one
        is passed) and optionally every layer's input."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden.append(h)
            h, state = layer(h, None if cache is None else cache.layers[i])
            if cache is not None:
                cache.layers[i] = state
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        if cache is not None:
            cache.seen_tokens += h.shape[1]
        return h, hidden


def _check_attention_mask(mask: torch.Tensor | None, caching: bool) -> None:
    if mask is None or bool(mask.all()):
        return
    m = mask.long()
    right_padded = bool((m[:, 1:] <= m[:, :-1]).all())
    if not right_padded:
        raise ValueError(
            "MirasForCausalLM: left padding (or holes) in attention_mask is not supported: the "
            "recurrent memory would read the pad tokens; use batch size 1 or right padding"
        )
    if caching:
        raise ValueError(
            "MirasForCausalLM: a right-padded batch cannot be cached (the cache would include the "
            "pads); pass use_cache=False to score it, or generate one sequence at a time"
        )


class MirasForCausalLM(MirasPreTrainedModel, GenerationMixin):
    """Miras LM with an untied output head. ``forward`` returns ``CausalLMOutputWithPast``
    (logits [B, T, V] in fp32 and, with ``use_cache``, the ``MirasCache``)."""

    def __init__(self, config: MirasConfig) -> None:
        super().__init__(config)
        self.model = MirasModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: MirasCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MirasForCausalLM: pass exactly one of input_ids and inputs_embeds")
        if past_key_values is None:  # transformers 5 renamed the argument to ``cache``
            past_key_values = kwargs.pop("cache", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, MirasCache):
            raise ValueError(
                f"MirasForCausalLM: past_key_values must be a MirasCache (got {type(past_key_values).__name__})"
            )
        caching = bool(use_cache) or past_key_values is not None
        _check_attention_mask(attention_mask, caching)
        cache = past_key_values
        if cache is None and use_cache:
            cache = MirasCache(self.config.num_hidden_layers)
        h, hidden = self.model(input_ids, inputs_embeds, cache, bool(output_hidden_states))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:  # HF convention: labels aligned with input_ids, shifted here
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )
        if return_dict is False:
            return out.to_tuple()
        return out

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen (all of them without a cache)."""
        if past_key_values is None:  # transformers 5 passes the cache as ``cache``
            past_key_values = kwargs.get("cache")
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
            inputs_embeds = None
        model_inputs = {"past_key_values": past_key_values, "use_cache": use_cache,
                        "attention_mask": attention_mask}
        if inputs_embeds is not None:
            model_inputs["inputs_embeds"] = inputs_embeds
        else:
            model_inputs["input_ids"] = input_ids
        if "logits_to_keep" in kwargs:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        return past_key_values.reorder_cache(beam_idx)


MirasConfig.register_for_auto_class()
MirasForCausalLM.register_for_auto_class("AutoModelForCausalLM")
