"""Small building blocks: RMSNorm, SwiGLU MLP, rotary embeddings, document positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miras_kernels import VarlenMeta
from miras_kernels.common.varlen import lookup as varlen_lookup
from miras_pretrain.parallel.layout import SINGLE_PROCESS, ParallelLayout

from . import sharded_layers as sl


class RMSNorm(nn.Module):
    """x [..., D] -> x / rms(x) * weight, computed in fp32. The weight is replicated under TP."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def head_rms_norm(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm. y [B, T, H, d], weight [H, d] -> [B, T, H, d] (fp32 inside)."""
    yf = y.float()
    out = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(y.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel.
    x [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, hidden: int, *, init_std: float, out_std: float,
                 layout: ParallelLayout = SINGLE_PROCESS) -> None:
        super().__init__()
        self.gate = sl.column_linear(layout, d_model, hidden, init_std=init_std)
        self.up = sl.column_linear(layout, d_model, hidden, init_std=init_std)
        self.down = sl.row_linear(layout, hidden, d_model, init_std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def doc_positions(cu_seqlens: torch.Tensor | VarlenMeta | None, seq_len: int, device: torch.device) -> torch.Tensor:
    """Position of every token inside its document, [T] long (0..T-1 without cu_seqlens).

    A :class:`VarlenMeta` computes them once per batch (cached on it, shared by every layer);
    neither form reads device memory on the host."""
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = varlen_lookup(cu_seqlens) or cu_seqlens  # the batch's metadata, when it has one
    if isinstance(cu_seqlens, VarlenMeta):
        return cu_seqlens.to(device).positions()
    t = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return t
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu[1:], t, right=True).clamp_max(cu.numel() - 2)
    return t - cu[doc]


def batch_varlen(cu_seqlens: torch.Tensor | VarlenMeta | None, batch: int, seq_len: int,
                 device: torch.device | None = None) -> VarlenMeta | None:
    """The per-batch packed-document metadata the layers take, validated once per batch.

    A :class:`VarlenMeta` (built by the data path from the host copy of the offsets) is checked
    against the batch shape without reading device memory; a bare tensor is read to the host once
    here (one sync per model forward instead of one per layer). ``device``: where the layers run
    (the metadata's offsets are moved there when they are elsewhere)."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
    meta = VarlenMeta.from_cu_seqlens(cu_seqlens, total=seq_len)
    return meta if device is None else meta.to(device)


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """Refuse document offsets that are not ``[0, ..., seq_len]`` of one packed row."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed documents), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N+1] of document boundaries")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seq_len}")


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, H, d] (d even), pos [T] long -> [B, T, H, d]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    rot = torch.cat([-x2, x1], -1)
    return (xf * cos + rot * sin).to(x.dtype)
