"""The language model: embedding, N pre-norm blocks, final norm + output head.

The three stage-able pieces (:class:`TokenEmbedding`, :class:`Block`, :class:`LMHead`) are the
same modules in the single-process / TP model (:class:`MirasLM`) and in the DeepSpeed pipeline
(``miras_pretrain.parallel.pipeline``), so there is one copy of the model code.

Parallelism is passed in, never looked up: the tensor-parallel split as the
:class:`~miras_pretrain.parallel.layout.ParallelLayout` the pieces are built with, context
parallelism as the ``cp`` argument of a forward (one context per batch).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from miras_kernels import VarlenMeta
from miras_pretrain.parallel.layout import SINGLE_PROCESS, ContextParallelContext, ParallelLayout

from . import sharded_layers as sl
from .attention import Attention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU, batch_varlen
from .miras_mixer import MirasMixer


def residual_out_std(cfg: ModelConfig) -> float:
    """Init std of projections that write into the residual stream (o_proj, MLP down):
    init_std / sqrt(2 * n_layers), GPT-2 style, so the residual's variance stays O(1) in depth."""
    return cfg.init_std / math.sqrt(2.0 * cfg.n_layers)


def check_tp_divisibility(cfg: ModelConfig, layout: ParallelLayout = SINGLE_PROCESS) -> None:
    """Refuse a config whose heads, vocabulary or MLP width do not split over the TP ranks."""
    tp = layout.tp_size
    for key, value in (("n_heads", cfg.n_heads), ("vocab_size", cfg.vocab_size), ("ffn_hidden", cfg.ffn_width)):
        if value % tp:
            raise ValueError(
                f"ModelConfig.{key}={value} is not divisible by the tensor parallel size {tp}: "
                "choose a multiple of it"
            )


class TokenEmbedding(nn.Module):
    """input_ids [B, T] long -> [B, T, D] (vocab-parallel under TP)."""

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.layout = layout
        # the embedding's own std when set: at 0.02 a small attention model starts at a saddle of
        # recall tasks (uniform attention) that it does not leave in a CPU-sized budget
        std = cfg.init_std if cfg.embed_init_std is None else cfg.embed_init_std
        self.word = sl.vocab_embedding(layout, cfg.vocab_size, cfg.d_model, init_std=std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word(input_ids)


class Block(nn.Module):
    """h + mixer(norm(h)), then h + SwiGLU(norm(h)). h [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.kind = cfg.layer_kinds()[layer_idx]
        out_std = residual_out_std(cfg)
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        if self.kind == "miras":
            self.mixer: nn.Module = MirasMixer(cfg, out_std=out_std, layout=layout)
        else:
            self.mixer = Attention(cfg, sliding=self.kind == "sliding_attention", out_std=out_std, layout=layout)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_width, init_std=cfg.init_std, out_std=out_std, layout=layout)

    def _forward(self, h: torch.Tensor, cu_seqlens: torch.Tensor | VarlenMeta | None,
                 cp: ContextParallelContext | None) -> torch.Tensor:
        if isinstance(cu_seqlens, VarlenMeta) and not isinstance(self.mixer, MirasMixer):
            # attention takes the offsets tensor; layers.doc_positions finds the metadata of that
            # tensor, so its positions are the cached ones and nothing is read on the host
            cu_seqlens = cu_seqlens.cu_seqlens
        h = h + self.mixer(self.norm1(h), cu_seqlens, cp)
        return h + self.mlp(self.norm2(h))

    def forward(self, h: torch.Tensor, cu_seqlens: torch.Tensor | VarlenMeta | None = None,
                cp: ContextParallelContext | None = None) -> torch.Tensor:
        """h [B, T, D] -> [B, T, D] (``cu_seqlens``, ``cp``: see :class:`MirasLM`; pass the batch's
        :class:`VarlenMeta` so that no layer reads device memory on the host)."""
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            # recompute the block in backward: keeps one [B, T, D] activation per block
            return checkpoint(self._forward, h, cu_seqlens, cp, use_reentrant=False)
        return self._forward(h, cu_seqlens, cp)


class LMHead(nn.Module):
    """Final RMSNorm + output projection. h [B, T, D] -> logits [B, T, V / tp].

    With ``tie_embeddings`` the projection has no weight of its own: the embedding's weight is
    passed to :meth:`forward`.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.layout = layout
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.tied = cfg.tie_embeddings
        if not self.tied:
            self.proj = sl.column_linear(layout, cfg.d_model, cfg.vocab_size, init_std=cfg.init_std)

    def forward(self, h: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(h)
        if self.tied:
            if tied_weight is None:
                raise ValueError("tie_embeddings=True: pass the embedding weight to LMHead.forward")
            return tied_output(h, tied_weight, self.layout)
        return self.proj(h)


def tied_output(h: torch.Tensor, weight: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Output head sharing the embedding's weight. h [B, T, D], weight [V / tp, D] ->
    logits [B, T, V / tp]."""
    # the replicated input enters the TP region so its grad is all-reduced, as
    # ColumnParallelLinear does for its own input
    h = sl.copy_to_tensor_parallel_region(h, layout)
    return torch.nn.functional.linear(h, weight)


def collect_memory_stats(model: nn.Module, layout: ParallelLayout = SINGLE_PROCESS) -> dict[str, float]:
    """Per-Miras-layer stats of the last forward, combined over TP ranks (call on every rank):
    ``layer{i}/init_{W}_norm`` (Frobenius norm of the learned initial memory weights, all heads)
    and ``layer{i}/{gate}_mean`` (mean gate value over batch, time and heads)."""
    keys, values, ops = [], [], []
    for module in model.modules():
        if isinstance(module, Block) and isinstance(module.mixer, MirasMixer):
            for name, (val, op) in module.mixer.local_stats().items():
                keys.append(f"layer{module.layer_idx}/{name}")
                values.append(val.detach().float().reshape(()))
                ops.append(op)
    if not keys:
        return {}
    vec = torch.stack(values)
    means = torch.tensor([op == "mean" for op in ops])
    sl.tp_all_reduce_(vec, layout)
    vec = torch.where(means, vec / layout.tp_size, vec)
    out = {}
    for key, val in zip(keys, vec.tolist()):
        if key.endswith("_sqnorm"):
            out[key[: -len("_sqnorm")] + "_norm"] = math.sqrt(val)
        else:
            out[key] = val
    return out


class MirasLM(nn.Module):
    """Decoder LM. ``forward(input_ids [B, T], labels=None, cu_seqlens=None, cp=None)``.

    Returns logits [B, T, V / tp] when ``labels`` is None, else the mean cross entropy over
    tokens with ``labels != -100``. ``labels`` are the targets *aligned with* ``input_ids``
    (``labels[:, t]`` is the token that should follow ``input_ids[:, t]``; the data loader
    shifts), Megatron's convention. ``cu_seqlens`` [N+1] (B == 1): packed documents; nothing
    (memory state, conv, attention) crosses a document boundary. Pass it as a
    :class:`~miras_kernels.VarlenMeta` built from the host copy of the offsets (the trainer's data
    path does) and no layer reads device memory on the host; a bare tensor is read once per
    forward (validation and chunk-grid sizes) and the layers get the metadata built from it.
    ``cp``: this batch's context parallelism (``input_ids`` and ``labels`` are this rank's slice,
    ``cu_seqlens`` its local offsets), or None.

    ``layout``: the tensor-parallel split (:func:`miras_pretrain.parallel.tensor_parallel.
    parallel_layout` gives this process's); the default is one TP rank with plain torch layers.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        check_tp_divisibility(cfg, layout)
        self.cfg = cfg
        self.layout = layout
        self.embed = TokenEmbedding(cfg, layout)
        self.layers = nn.ModuleList(Block(cfg, i, layout) for i in range(cfg.n_layers))
        self.head = LMHead(cfg, layout)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | VarlenMeta | None = None,
        cp: ContextParallelContext | None = None,
    ) -> torch.Tensor:
        # validated once per batch; the layers get the metadata and read nothing on the host
        varlen = batch_varlen(cu_seqlens, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, varlen, cp)
        logits = self.head(h, self.embed.word.weight if self.cfg.tie_embeddings else None)
        if labels is None:
            return logits
        return sl.lm_cross_entropy(logits, labels, self.layout)

    def memory_stats(self) -> dict[str, float]:
        return collect_memory_stats(self, self.layout)


def build_model(cfg: ModelConfig | dict, layout: ParallelLayout = SINGLE_PROCESS) -> MirasLM:
    """The model for ``layout``: the whole model with plain torch layers by default, this
    rank's shard under tensor parallelism (every rank built from the same seed holds slices of
    the single-process initialisation)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return MirasLM(cfg, layout)
