"""Softmax attention with RoPE (Transformer++), full causal or sliding window, packed docs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miras_pretrain.parallel import context_parallel
from miras_pretrain.parallel import layers as tpl

from .config import ModelConfig
from .layers import doc_positions, local_heads, rotary


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

    def __init__(self, cfg: ModelConfig, *, sliding: bool, out_std: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.window if sliding else None
        self.n_local = local_heads(cfg.n_heads)
        self.head_dim = cfg.head_dim
        d, std = cfg.d_model, cfg.init_std
        self.q_proj = tpl.column_linear(d, d, init_std=std)
        self.k_proj = tpl.column_linear(d, d, init_std=std)
        self.v_proj = tpl.column_linear(d, d, init_std=std)
        self.o_proj = tpl.row_linear(d, d, init_std=out_std)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, self.n_local, self.head_dim)
        q = self.q_proj(x)[0].view(shape)
        k = self.k_proj(x)[0].view(shape)
        v = self.v_proj(x)[0].view(shape)
        cp = context_parallel.active()  # sequence split over a context-parallel group?
        # RoPE restarts in every packed document (under CP: positions in the global sequence)
        pos = doc_positions(cu_seqlens, t, x.device) if cp is None else cp.positions(x.device)
        q = rotary(q, pos, self.cfg.rope_theta)
        k = rotary(k, pos, self.cfg.rope_theta)
        if cp is not None:
            o = cp.attention(q, k, v, window=self.window).reshape(b, t, self.n_local * self.head_dim)
            return self.o_proj(o)[0]
        mask = attention_mask(t, window=self.window, cu_seqlens=cu_seqlens, device=x.device)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(b, t, self.n_local * self.head_dim)
        return self.o_proj(o)[0]
