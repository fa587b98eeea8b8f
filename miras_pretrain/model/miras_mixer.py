"""The Miras token mixer: the layer around the memory (the memory's maths and the gates' starting
points: docs/semantics.md §1-§5 and §8).

x [B, T, D] -> q, k, v (column-parallel projections) -> causal depthwise conv (kernel
``conv_size``) + SiLU on each -> l2-normalised q, k -> per-head gates from a low-rank projection
-> ``miras_memory`` (learned initial weights for the MLP memory) -> per-head RMSNorm -> output
gate silu(W_g x) -> output projection (row-parallel). Heads are split over TP ranks; everything
per head (conv channels, gates, initial memory, output norm) is split with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from miras_kernels import VarlenMeta, causal_depthwise_conv, miras_memory
from miras_pretrain.parallel.layout import SINGLE_PROCESS, ContextParallelContext, ParallelLayout

from . import sharded_layers as sl
from .config import ModelConfig
from .layers import doc_positions, head_rms_norm

# Gate activations and the bias each starts from (per gate, same for every head):
# alpha = sigmoid -> 0.99 (slow forgetting at init), eta = sigmoid * eta_max -> eta_max / 2,
# mu = sigmoid -> 0.9 (Titans-like momentum), delta = softplus -> see gate_init_bias.
GATE_INIT_BIAS = {
    "alpha": math.log(0.99 / 0.01),
    "eta": 0.0,
    "mu": math.log(0.9 / 0.1),
}
# Yaad's Huber threshold starts at DELTA_INIT_PER_SQRT_DIM * sqrt(head_dim). At initialisation the
# MLP memory's residual is e = k + LN(o) - v with ||LN(o)||_2 = sqrt(head_dim) and ||k||_2 = 1, so
# ||e||_2 ~ sqrt(head_dim + 1): a threshold of 1.0 (the old start) put every token on the l1
# branch, whose output gradient delta * sign(e) is not annihilated by the LayerNorm's backward
# projection (l2's e ~ LN(o) is) and whose derivative reaches delta / sqrt(eps) = 1000 x delta;
# through the second-order path that made the first steps' gradient norm 1e3-1e11
# (docs/training_health.md). Starting above ||e|| puts every token on the l2 branch (Yaad then
# begins as an l2 memory with decay) and the outer loop learns where to clip.
DELTA_INIT_PER_SQRT_DIM = 1.5


def gate_init_bias(name: str, head_dim: int) -> float:
    """Pre-activation bias of gate ``name`` at initialisation (the same for every head)."""
    if name == "delta":
        delta0 = DELTA_INIT_PER_SQRT_DIM * math.sqrt(head_dim)
        return delta0 + math.log(-math.expm1(-delta0))  # softplus^-1(delta0), stable for large delta0
    return GATE_INIT_BIAS[name]


def memory_init_std(spec, head_dim: int, init_std: float) -> float:
    """Std of the MLP memory's initial weights W1, W2 (before the retention's transform).

    Retention none/decay (Titans, TTT-MLP, Yaad): ``sqrt(2) * (e * d)^(-1/4)`` for both matrices,
    so that ``o = W1 gelu(W2 x)`` has entries of order 1 for a unit-norm x (``W2 x`` ~ sigma,
    ``gelu`` ~ sigma / 2, then a sum over ``e * d`` hidden units). With ``init_std`` (0.02) the
    LayerNorm after it saw entries of ~1e-3 and its 1/std was 100-300, so the first chunk's inner
    step grew the weights ~30x and the outer gradient through it (a 1/std^2 factor) spiked
    (docs/training_health.md). lq (Moneta) and kl (Memora) keep ``init_std``: their weights are a
    normalised accumulator / a softmax whose scale the retention sets, and both train stably; lq
    with q = 2 normalises nothing and follows the decay rule (at 0.02 its gradients exploded).
    """
    if spec.weights_are_state:
        return math.sqrt(2.0) * (int(spec.expansion) * head_dim) ** -0.25
    return init_std


def init_memory_free_variable(spec, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Initial free variable X of one MLP-memory weight, full shape [H, r, c].

    The weights start small and random (``W ~ N(0, std)``), so ``M(x) = x + LN(W1 gelu(W2 x))``
    begins close to the identity plus a small term. For ``lq`` X is the accumulator A with
    ``W = A / ||A||_q^(q-2)``; since ``||W||_q = ||A||_q^(3-q)`` we set ``A = W * ||A||_q^(q-2)``
    (q = 3 is scale-free: A = W). For ``kl`` X are logits Z of ``W = c softmax(Z)``; small
    random Z gives near-uniform positive rows.
    """
    w = torch.randn(shape) * std
    if spec.retention == "lq" and spec.q not in (2.0, 3.0):
        norm_w = w.abs().pow(spec.q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / spec.q)
        norm_a = norm_w.pow(1.0 / (3.0 - spec.q))
        return w * norm_a.pow(spec.q - 2.0)
    return w


class MirasMixer(nn.Module):
    """Multi-head Miras memory mixer. x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, *, out_std: float, layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = cfg.spec
        self.layout = layout
        self.n_heads = cfg.n_heads
        self.n_local = sl.local_heads(cfg.n_heads, layout)
        self.head_dim = dh = cfg.head_dim
        d, std = cfg.d_model, cfg.init_std
        inner = cfg.n_heads * dh
        self.q_proj = sl.column_linear(layout, d, inner, init_std=std)
        self.k_proj = sl.column_linear(layout, d, inner, init_std=std)
        self.v_proj = sl.column_linear(layout, d, inner, init_std=std)
        self.g_proj = sl.column_linear(layout, d, inner, init_std=std)  # output gate
        self.o_proj = sl.row_linear(layout, inner, d, init_std=out_std)
        # depthwise conv weights [channels, K]; nn.Conv1d's default init U(-1/sqrt(K), 1/sqrt(K))
        bound = 1.0 / math.sqrt(cfg.conv_size)
        self.q_conv = self._sharded(torch.empty(inner, cfg.conv_size).uniform_(-bound, bound))
        self.k_conv = self._sharded(torch.empty(inner, cfg.conv_size).uniform_(-bound, bound))
        self.v_conv = self._sharded(torch.empty(inner, cfg.conv_size).uniform_(-bound, bound))
        # gates: low-rank down (replicated under TP) then per-head up (column-parallel, head-major
        # [H, n_gates] outputs so a TP rank's slice holds exactly its heads' gates)
        self.gate_names = cfg.gate_names
        n_g = len(self.gate_names)
        self.gate_down = nn.Linear(d, cfg.gate_rank, bias=False, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            nn.init.normal_(self.gate_down.weight, std=std)
        self.gate_up = sl.column_linear(layout, cfg.gate_rank, cfg.n_heads * n_g, init_std=std, bias=True)
        with torch.no_grad():
            self.gate_up.bias.copy_(
                torch.tensor([gate_init_bias(g, dh) for g in self.gate_names]).repeat(self.n_local)
            )
        self.out_norm = self._sharded(torch.ones(cfg.n_heads, dh))
        # learned initial memory (MLP memory only): free variable per head [H, r, c]
        self.mem_init = nn.ParameterDict()
        if self.spec.memory == "mlp":
            for name, (r, c) in self.spec.weight_shapes(dh, dh).items():
                mem_std = memory_init_std(self.spec, dh, std) if cfg.memory_init_std is None else cfg.memory_init_std
                full = init_memory_free_variable(self.spec, (cfg.n_heads, r, c), mem_std)
                self.mem_init[name] = self._sharded(full)
        self._stats: dict[str, torch.Tensor] = {}
        self._state_norms: dict[str, torch.Tensor] = {}

    def _sharded(self, full: torch.Tensor) -> nn.Parameter:
        """Parameter holding this TP rank's heads (dim 0) of ``full``."""
        p = nn.Parameter(sl.shard_rows(full, self.layout, 0).contiguous())
        sl.mark_tensor_parallel(p, 0)
        return p

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, T, D] -> {name: [B, T, H_local]} in fp32."""
        b, t, _ = x.shape
        raw = self.gate_up(self.gate_down(x)).float().view(b, t, self.n_local, -1)
        out = {}
        for i, name in enumerate(self.gate_names):
            z = raw[..., i]
            if name == "eta":
                out[name] = torch.sigmoid(z) * self.cfg.eta_max
            elif name == "delta":
                out[name] = F.softplus(z)
            else:  # alpha, mu
                out[name] = torch.sigmoid(z)
        if self.spec.needs_delta and self.cfg.huber_delta is not None:
            # a fixed Huber threshold (the ablation of Yaad's learned one): same value everywhere
            out["delta"] = torch.full((b, t, self.n_local), float(self.cfg.huber_delta), device=x.device)
        return out

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | VarlenMeta | None = None,
                cp: ContextParallelContext | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. ``cu_seqlens`` (B == 1): packed documents, nothing crosses a
        document start; the batch's :class:`VarlenMeta` (validated once per batch, then nothing is
        read on the host here: no GPU sync per layer) or a bare ``[N+1]`` tensor (read once by the
        operator). ``cp``: this batch's context parallelism (x holds this rank's T_local tokens of
        the sequence), or None."""
        b, t, _ = x.shape
        h, dh = self.n_local, self.head_dim
        if cp is None:
            pos = None if cu_seqlens is None else doc_positions(cu_seqlens, t, x.device)
            conv = lambda z, w: causal_depthwise_conv(z, w, pos)  # noqa: E731
            memory = miras_memory
        else:
            # the sequence is split over a context-parallel group: the conv needs the previous
            # rank's last inputs and the memory its state (parallel/context_parallel/memory.py)
            seq = cp.miras_layer(self.spec, batch=b, heads=h, head_dim=dh, chunk_size=self.cfg.chunk_size,
                                 dtype=x.dtype)
            conv, memory = seq.conv, seq.memory
            if isinstance(cu_seqlens, VarlenMeta):
                cu_seqlens = cu_seqlens.cu_seqlens  # the CP memory compares it with its layout's

        def branch(proj, conv_w):
            z = conv(proj(x), conv_w.to(x.dtype))
            return F.silu(z).view(b, t, h, dh)

        q = F.normalize(branch(self.q_proj, self.q_conv), dim=-1)
        k = F.normalize(branch(self.k_proj, self.k_conv), dim=-1)
        v = branch(self.v_proj, self.v_conv)
        g = self.gates(x)
        init = {n: p for n, p in self.mem_init.items()} if len(self.mem_init) else None
        # the final state comes for free on every backend (the chunk loop ends with it); it feeds
        # the memory-state norm in the training metrics. The CP memory passes states itself.
        extra = {"output_final_state": True} if cp is None else {}
        y, final = memory(
            q, k, v, g.get("alpha"), g["eta"], spec=self.spec, chunk_size=self.cfg.chunk_size,
            delta=g.get("delta"), mu=g.get("mu"), initial_state=init, cu_seqlens=cu_seqlens,
            backend=self.cfg.backend, **extra,
        )
        y = head_rms_norm(y, self.out_norm, self.cfg.norm_eps)
        y = y * F.silu(self.g_proj(x)).view(b, t, h, dh)
        self._stats = {name: gate.detach().mean() for name, gate in g.items()}
        # Frobenius norm of each final free variable (W, A for lq, Z for kl), mean over
        # sequences and heads: a memory that blows up shows here before the loss does
        self._state_norms = {} if final is None else {
            name: final[name].detach().float().flatten(-2).norm(dim=-1).mean() for name in self.spec.weight_names()}
        return self.o_proj(y.reshape(b, t, h * dh))

    @torch.no_grad()
    def local_stats(self) -> dict[str, tuple[torch.Tensor, str]]:
        """Per-rank statistics and how to combine them over TP ("sum" of squares or "mean")."""
        out: dict[str, tuple[torch.Tensor, str]] = {}
        for name, p in self.mem_init.items():
            w = self.spec.materialize(p.float())
            out[f"init_{name}_sqnorm"] = (w.pow(2).sum(), "sum")
        for name, val in self._stats.items():
            out[f"{name}_mean"] = (val.float(), "mean")
        for name, val in self._state_norms.items():
            out[f"state_{name}_norm"] = (val, "mean")
        return out
