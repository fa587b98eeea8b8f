"""Softmax attention with RoPE (Transformer++), full causal or sliding window, packed docs.

**Packed documents without a dense mask.** A query attends a key when the key is not later,
lies in the same document and (sliding window) fewer than ``window`` tokens back. Without
documents and without a window this is plain ``is_causal=True`` SDPA. Otherwise
:func:`document_causal_attention` never builds the ``[T, T]`` boolean mask (1 GiB per layer at
32K tokens):

* CUDA: FlexAttention (``torch.nn.attention.flex_attention``, compiled once per process) with a
  block mask made from a ``mask_mod`` over per-token document ids (``create_block_mask(...,
  _compile=True)``, which does not materialise the dense mask either). Blocks of other documents
  and outside the window are skipped entirely.
* Elsewhere (CPU): FlexAttention has no backward on CPU in torch 2.13 (``NotImplementedError``)
  and its eager form materialises full score matrices, so the CPU path tiles the queries: per
  tile of ``tile`` queries one SDPA call over the keys it can see (the window, or every earlier
  key), with a ``[tile, keys]`` mask. Memory O(T x tile) for full causal, O(T x (tile + window))
  with a window; compute is the causal triangle (other documents are masked, not skipped).

The document ids come from ``cu_seqlens`` on its device (``searchsorted``); neither path needs
the number of documents or the longest document, and nothing syncs with the host (no
``.item()``/``.tolist()``): every loop bound is a shape. The block mask is built once per batch
and reused by every attention layer (a one-entry cache keyed by the ``cu_seqlens`` tensor, its
version, T, window and device).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from miras_pretrain.parallel.layout import SINGLE_PROCESS, ContextParallelContext, ParallelLayout

from . import sharded_layers as sl
from .config import ModelConfig
from .layers import doc_positions, rotary

DEFAULT_TILE = 256  # queries per SDPA call on the tiled path (mask [tile, keys])
IMPLS = ("auto", "tiled", "flex")


def document_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Index of the document holding each token, [T] long on ``cu_seqlens``' device
    (``cu_seqlens`` [N+1] offsets 0 .. T)."""
    cu = cu_seqlens.to(dtype=torch.long)
    t = torch.arange(seq_len, device=cu.device)
    return torch.searchsorted(cu[1:], t, right=True)


def _mask_block(qg: torch.Tensor, kg: torch.Tensor, window: int | None, doc_q: torch.Tensor | None,
                doc_k: torch.Tensor | None) -> torch.Tensor:
    """[len(qg), len(kg)] bool: causal, key index >= 0, inside the window, same document."""
    mask = (kg[None, :] <= qg[:, None]) & (kg[None, :] >= 0)
    if window is not None:
        mask &= (qg[:, None] - kg[None, :]) < window
    if doc_q is not None:
        mask &= doc_q[:, None] == doc_k[None, :]
    return mask


def _tile_attention(q, k, v, doc_q, doc_k, q_first: int, k_first: int, window: int | None) -> torch.Tensor:
    """One query tile against its key range (global indices start at ``q_first``/``k_first``);
    the [tile, keys] mask is made here so that a recomputation makes it again."""
    qg = torch.arange(q_first, q_first + q.shape[2], device=q.device)
    kg = torch.arange(k_first, k_first + k.shape[2], device=q.device)
    mask = _mask_block(qg, kg, window, doc_q, doc_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _tiled(q, k, v, *, window, doc_q, doc_k, q_start, k_start, tile) -> torch.Tensor:
    t_q, t_k = q.shape[2], k.shape[2]
    # With autograd each tile is recomputed in backward (torch.utils.checkpoint): otherwise every
    # tile's SDPA keeps its [tile, keys] float mask for backward, and together those are the
    # causal half of a dense T x T mask again. Saved per tile: views of q, k, v only.
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i0 in range(0, t_q, tile):
        i1 = min(i0 + tile, t_q)
        # global key range this tile may see: from the window's start (or 0) to its last query
        lo = max(0, k_start, q_start + i0 - window + 1 if window is not None else 0)
        hi = min(q_start + i1, k_start + t_k)
        j0, j1 = lo - k_start, hi - k_start
        args = (q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], None if doc_q is None else doc_q[i0:i1],
                None if doc_k is None else doc_k[j0:j1], q_start + i0, lo, window)
        if recompute:
            outs.append(checkpoint(_tile_attention, *args, use_reentrant=False))
        else:
            outs.append(_tile_attention(*args))
    return torch.cat(outs, dim=2)


_COMPILED_FLEX: Callable | None = None
_BLOCK_MASK_CACHE: dict = {}


def _flex_fn(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_block_mask(t_q: int, t_k: int, *, window: int | None, doc_q: torch.Tensor | None, doc_k: torch.Tensor | None,
                    q_start: int, k_start: int, device: torch.device, compile_mask: bool):
    """FlexAttention ``BlockMask`` of :func:`document_causal_attention`'s rule (query i at global
    index ``q_start + i``, key j at ``k_start + j``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, kj):
        qg, kg = qi + q_start, kj + k_start
        m = (kg <= qg) & (kg >= 0)
        if window is not None:
            m = m & ((qg - kg) < window)
        if doc_q is not None:
            m = m & (doc_q[qi] == doc_k[kj])
        return m

    return create_block_mask(mask_mod, None, None, t_q, t_k, device=device, _compile=compile_mask)


def _flex(q, k, v, *, window, doc_q, doc_k, q_start, k_start, cache_for) -> torch.Tensor:
    on_cuda = q.is_cuda
    # one entry: the block mask of the batch being run, shared by its attention layers. Without
    # documents it depends on shapes only; with them on the cu_seqlens tensor, which the cache
    # keeps alive so its id cannot be reused by another tensor while cached.
    docs = None if doc_q is None else ("docs", None if cache_for is None else (id(cache_for), getattr(cache_for, "_version", 0)))
    key = (docs, q.shape[2], k.shape[2], window, q_start, k_start, str(q.device))
    cacheable = doc_q is None or cache_for is not None
    if cacheable and _BLOCK_MASK_CACHE.get("key") == key:
        bm = _BLOCK_MASK_CACHE["mask"]
    else:
        bm = flex_block_mask(q.shape[2], k.shape[2], window=window, doc_q=doc_q, doc_k=doc_k, q_start=q_start,
                             k_start=k_start, device=q.device, compile_mask=on_cuda)
        if cacheable:
            _BLOCK_MASK_CACHE.clear()
            _BLOCK_MASK_CACHE.update(key=key, mask=bm, ref=cache_for)
    return _flex_fn(on_cuda)(q, k, v, block_mask=bm)


def document_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
    doc_q: torch.Tensor | None = None, doc_k: torch.Tensor | None = None, q_start: int = 0, k_start: int = 0,
    impl: str = "auto", tile: int | None = None, cache_for: object | None = None,
) -> torch.Tensor:
    """Causal (sliding-window, packed-document) softmax attention without a dense mask.

    q [B, H, Tq, d], k and v [B, H, Tk, d] -> [B, H, Tq, d]. Query i sits at global index
    ``q_start + i``, key j at ``k_start + j``; query i attends key j iff ``0 <= kg <= qg``,
    ``qg - kg < window`` (when ``window`` is given) and ``doc_q[i] == doc_k[j]`` (when document
    ids [Tq], [Tk] long are given, on q's device). Every query must see at least itself
    (``k_start <= q_start`` and the keys reach ``q_start + Tq - 1``).

    ``impl``: ``"auto"`` (FlexAttention on CUDA, tiled SDPA elsewhere), ``"tiled"`` or ``"flex"``
    (FlexAttention; on CPU forward only, eager). ``tile``: queries per SDPA call on the tiled
    path (default :data:`DEFAULT_TILE`). ``cache_for``: the object the document ids were
    made from (the batch's ``cu_seqlens`` tensor, or the CP layout), unchanged while it lives: the
    FlexAttention block mask is then reused by the next call with the same object (every layer of
    the batch); None with documents builds it every call.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not valid: choose one of {', '.join(IMPLS)}")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1 (or None for full causal attention)")
    if (doc_q is None) != (doc_k is None):
        raise ValueError("doc_q and doc_k must be given together (document ids of the queries and of the keys)")
    tile = DEFAULT_TILE if tile is None else tile
    if tile < 1:
        raise ValueError(f"tile={tile} must be >= 1 (queries per SDPA call on the tiled path)")
    if impl == "flex" or (impl == "auto" and q.is_cuda):
        return _flex(q, k, v, window=window, doc_q=doc_q, doc_k=doc_k, q_start=q_start, k_start=k_start,
                     cache_for=cache_for)
    return _tiled(q, k, v, window=window, doc_q=doc_q, doc_k=doc_k, q_start=q_start, k_start=k_start, tile=tile)


def dense_attention_mask(
    seq_len: int, *, window: int | None, cu_seqlens: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The REFERENCE rule as a dense boolean mask [T, T] (True = may attend): causal, same
    document, within ``window``. O(T^2) memory: for tests and the benchmark only, never the
    model's path. None when plain causal suffices."""
    if window is None and cu_seqlens is None:
        return None
    i = torch.arange(seq_len, device=device)
    doc = None if cu_seqlens is None else document_ids(cu_seqlens.to(device), seq_len)
    return _mask_block(i, i, window, doc, doc)


class Attention(nn.Module):
    """Multi-head causal attention; heads split over TP ranks. x [B, T, D] -> [B, T, D].
    Packed documents and sliding windows go through :func:`document_causal_attention` (no
    dense mask; see the module docstring)."""

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
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        if self.window is None and cu_seqlens is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            doc = None if cu_seqlens is None else document_ids(cu_seqlens.to(x.device), t)
            o = document_causal_attention(q, k, v, window=self.window, doc_q=doc, doc_k=doc, cache_for=cu_seqlens)
        o = o.transpose(1, 2).reshape(b, t, self.n_local * self.head_dim)
        return self.o_proj(o)
