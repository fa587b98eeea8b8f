"""Softmax attention with RoPE (Transformer++), full causal or sliding window, packed docs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miras_pretrain.parallel.layout import SINGLE_PROCESS, ContextParallelContext, ParallelLayout

from . import sharded_layers as sl
from .config import ModelConfig
from .layers import doc_positions, rotary


def attention_mask(
    seq_len: int, *, window: int | None, cu_seqlens: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [T, T] (True = may attend): causal, within the same document, and within
    ``window`` tokens (query i sees keys i-window+1 .. i). None when plain causal suffices."""
    if window is None and cu_seqlens is None:
        return None
    i = torch.arange(seq_len, device=device)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.searchsorted(cu[1:], i, right=True)
        mask &= doc[:, None] == doc[None, :]
    return mask


class Attention(nn.Module):
    """Multi-head causal attention; heads split over TP ranks. x [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, *, sliding: bool, out_std: float,
                 layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.window if sliding else None
        self.n_local = sl.local_heads(cfg.n_heads, layout)
        self.head_dim = cfg.head_dim
        d, std = cfg.d_model, cfg.init_std
        self.q_proj = sl.column_linear(layout, d, d, init_std=std)
        self.k_proj = sl.column_linear(layout, d, d, init_std=std)
        self.v_proj = sl.column_linear(layout, d, d, init_std=std)
        self.o_proj = sl.row_linear(layout, d, d, init_std=out_std)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cp: ContextParallelContext | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. ``cu_seqlens`` [N+1] (B == 1): packed documents. ``cp``:
        this batch's context parallelism (x holds this rank's T_local tokens), or None."""
        b, t, _ = x.shape
        shape = (b, t, self.n_local, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
        # RoPE restarts in every packed document (under CP: positions in the global sequence)
        pos = doc_positions(cu_seqlens, t, x.device) if cp is None else cp.positions(x.device)
        q = rotary(q, pos, self.cfg.rope_theta)
        k = rotary(k, pos, self.cfg.rope_theta)
        if cp is not None:
            o = cp.attention(q, k, v, window=self.window).reshape(b, t, self.n_local * self.head_dim)
            return self.o_proj(o)
        mask = attention_mask(t, window=self.window, cu_seqlens=cu_seqlens, device=x.device)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(b, t, self.n_local * self.head_dim)
        return self.o_proj(o)
