"""Analytic parameter and FLOP counts (no model is built, so 1.3B configs count instantly).

FLOP convention: a multiply-add is 2 FLOPs; training FLOPs per token = 3 x forward (backward
= 2 x forward); recomputation (activation checkpointing, and the chunked op's per-token weights
for lq/kl, which its backward recomputes from segment checkpoints) is NOT counted, nor are norms, activations and
other elementwise work outside the memory. The embedding lookup is free; the output head is a
matmul. The memory is counted as the ``chunked`` backend computes it (see kernels/pytorch/chunked.py): per
token and head, the forward of the frozen memory at the key and the backprop vectors for the
inner gradient, the chunk-end state update (sum of outer products), and the read at the query
-- for ``none``/``decay`` retention a frozen-weights read plus GLA-like in-chunk products
(4*C*(rows+cols)), for ``lq``/``kl`` the per-token weights of the chunk built by the in-chunk
scan (one scaled rank-1 update, 2 FLOPs per entry, twice with momentum; kernels/pytorch/per_token_scan.py),
their materialisation (~5 FLOPs per entry) and a full matvec. ``chunk_rule="exact"`` (the delta
rule's WY form, kernels/pytorch/delta_exact.py) is counted as that path computes it: per chunk
``K Kᵀ`` and ``Q Kᵀ``, the unit-triangular solve by forward substitution (~C³/3 multiply-adds),
``W = T(βK)`` and ``U = T(βV)``, the corrected values ``U - W Sᵀ``, the read ``Q Sᵀ`` plus the
in-chunk product with the corrected values, and the chunk-end update.
"""

from __future__ import annotations

from miras_kernels.spec import MirasSpec

from .config import ModelConfig

MATERIALIZE_FLOPS_PER_ENTRY = 5  # lq: |x|, pow, sum, scale; kl: exp, sum, divide (approx.)


def _mixer_gate_count(cfg: ModelConfig) -> int:
    return len(cfg.gate_names)


def parameter_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part: embedding, head (0 when tied), final_norm, attention_layers,
    miras_layers, mlp (all blocks' SwiGLU + block norms), total, non_embedding."""
    d, f, h, dh = cfg.d_model, cfg.ffn_width, cfg.n_heads, cfg.head_dim
    spec = cfg.spec
    kinds = cfg.layer_kinds()
    n_miras = kinds.count("miras")
    n_attn = len(kinds) - n_miras
    attn = 4 * d * d
    n_g = _mixer_gate_count(cfg)
    inner = h * dh
    miras = (
        4 * d * inner + inner * d  # q, k, v, output gate; output projection
        + 3 * inner * cfg.conv_size  # depthwise convs
        + d * cfg.gate_rank + cfg.gate_rank * h * n_g + h * n_g  # low-rank gates (+ bias)
        + inner  # per-head output norm
    )
    if spec.memory == "mlp":
        miras += h * sum(r * c for r, c in spec.weight_shapes(dh, dh).values())
    out = {
        "embedding": cfg.vocab_size * d,
        "head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
        "final_norm": d,
        "attention_layers": n_attn * attn,
        "miras_layers": n_miras * miras,
        "mlp": cfg.n_layers * (3 * d * f + 2 * d),
    }
    out["total"] = sum(out.values())
    out["non_embedding"] = out["total"] - out["embedding"] - out["head"]
    return out


def count_parameters(cfg: ModelConfig) -> int:
    """Total trainable parameters of ``build_model(cfg)`` (single-process layout)."""
    return parameter_breakdown(cfg)["total"]


def memory_flops_per_token_head(spec: MirasSpec, d: int, chunk: int) -> float:
    """Forward FLOPs of the memory op per token and head (chunked algorithm, see module doc)."""
    shapes = list(spec.weight_shapes(d, d).values())
    entries = sum(r * c for r, c in shapes)
    if spec.chunk_rule == "exact":
        # per token: K K^T, Q K^T, T(bK), T(bV), (Q K^T) U': 5 x 2Cd; U - W S^T, Q S^T, S += U'^T K:
        # 3 x 2d^2; the forward substitution: 2C^3/3 per chunk = 2C^2/3 per token
        return float(6 * d * d + 10 * chunk * d + 2 * chunk * chunk / 3)
    momentum = spec.learner == "momentum"
    affine = spec.weights_are_state
    if spec.memory == "linear":
        fwd_keys = 0 if spec.bias == "dot" else 2 * d * d  # the error needs W k
        backprop = 0
    else:
        hid = shapes[0][1]
        fwd_keys = 4 * d * hid  # W2 k, W1 gelu(.)
        backprop = 2 * d * hid  # W1^T u for the W2 gradient
    update = 2 * entries * (2 if momentum else 1)  # chunk-end sums of outer products (X and S)
    if affine:
        read = 2 * entries * (2 if momentum else 1)  # frozen X0 (and S0) reads
        read += sum(4 * chunk * (r + c) for r, c in shapes)  # in-chunk masked products
    else:
        read = 2 * entries * (2 if momentum else 1)  # per-token weights: in-chunk scan of X (and S)
        read += MATERIALIZE_FLOPS_PER_ENTRY * entries + 2 * entries  # materialise + matvec
    frozen = 0 if spec.retention in ("none", "decay") else MATERIALIZE_FLOPS_PER_ENTRY * entries / chunk
    return float(fwd_keys + backprop + update + read + frozen)


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part, plus ``forward`` and ``train`` (= 3 x forward)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    d, f, h, dh = cfg.d_model, cfg.ffn_width, cfg.n_heads, cfg.head_dim
    spec = cfg.spec
    kinds = cfg.layer_kinds()
    out = {"projections": 0.0, "mlp": 0.0, "attention_core": 0.0, "memory": 0.0, "head": 0.0}
    n_g = _mixer_gate_count(cfg)
    for kind in kinds:
        out["mlp"] += 2 * 3 * d * f
        if kind == "miras":
            out["projections"] += 2 * (5 * d * h * dh + d * cfg.gate_rank + cfg.gate_rank * h * n_g)
            out["projections"] += 2 * 3 * h * dh * cfg.conv_size  # depthwise convs
            out["memory"] += h * memory_flops_per_token_head(spec, dh, cfg.chunk_size)
        else:
            out["projections"] += 2 * 4 * d * d
            w = cfg.window if kind == "sliding_attention" else seq_len
            # mean number of keys a query sees: (1/T) sum_{t=1..T} min(t, w)
            m = min(w, seq_len)
            ctx = (m * (m + 1) / 2 + (seq_len - m) * m) / seq_len
            out["attention_core"] += 2 * 2 * d * ctx  # Q K^T and P V
    out["head"] = 2.0 * d * cfg.vocab_size
    out["forward"] = sum(out.values())
    out["train"] = 3.0 * out["forward"]
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at context ``seq_len``."""
    return flops_breakdown(cfg, seq_len)["train"]
