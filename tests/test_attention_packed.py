"""Attention over packed documents without a dense [T, T] mask (miras_pretrain/model/attention.py).

The reference is the old rule as a dense boolean mask (``dense_attention_mask``: causal, same
document, inside the window) passed to ``F.scaled_dot_product_attention``. Tolerances: float64
``rtol = atol = 1e-10`` (the tiled path runs the same SDPA on sub-blocks: only the summation
order differs), float32 ``1e-5``; forward and the gradients of q, k, v (and, for the layer, of
its input and every parameter). The CPU FlexAttention path is checked forward only (torch 2.13
has no FlexAttention backward on CPU), float32 ``1e-5``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from miras_pretrain.model import ModelConfig
from miras_pretrain.model import attention as att
from miras_pretrain.model.attention import (
    Attention, dense_attention_mask, document_causal_attention, document_ids,
)
from miras_pretrain.model.layers import doc_positions, rotary

TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-5, atol=1e-5)
T = 40
CU = torch.tensor([0, 7, 19, 20, 33, 40], dtype=torch.int32)  # 5 documents, one of length 1


def _qkv(dtype=torch.float64, b=2, h=3, t=T, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(4)]


def _fwd_bwd(fn, q, k, v, go):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(go)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("window,docs", [(None, True), (5, False), (5, True), (17, True), (1, True)])
@pytest.mark.parametrize("tile", [1, 8, 64])
def test_tiled_matches_dense_mask_fp64(window, docs, tile):
    q, k, v, go = _qkv()
    cu = CU if docs else None
    mask = dense_attention_mask(T, window=window, cu_seqlens=cu, device=q.device)
    doc = document_ids(CU, T) if docs else None
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, go)
    got = _fwd_bwd(lambda a, b, c: document_causal_attention(a, b, c, window=window, doc_q=doc, doc_k=doc,
                                                             impl="tiled", tile=tile), q, k, v, go)
    for name, r, g in zip(("o", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(g, r, **TOL64, msg=name)


def test_tiled_matches_dense_mask_fp32():
    q, k, v, go = _qkv(torch.float32)
    mask = dense_attention_mask(T, window=9, cu_seqlens=CU, device=q.device)
    doc = document_ids(CU, T)
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, go)
    got = _fwd_bwd(lambda a, b, c: document_causal_attention(a, b, c, window=9, doc_q=doc, doc_k=doc, tile=16),
                   q, k, v, go)
    for name, r, g in zip(("o", "dq", "dk", "dv"), ref, got):
        torch.testing.assert_close(g, r, **TOL32, msg=name)


@pytest.mark.parametrize("window", [None, 6])
def test_offsets_give_the_global_rows(window):
    """The CP form: queries [s, e) of the global sequence against keys [k_start, e) (k_start < 0
    on the first rank: zero keys there, masked) equal those rows of the global attention."""
    q, k, v, go = _qkv()
    mask = dense_attention_mask(T, window=window, cu_seqlens=CU, device=q.device)
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), q, k, v, go)
    doc = document_ids(CU, T)
    for s, e in ((0, 10), (10, 20), (20, 40)):
        k_start = 0 if window is None else s - (window - 1)
        pad = max(0, -k_start)
        kk, vv = (torch.cat([x.new_zeros(*x.shape[:2], pad, x.shape[3]), x[:, :, max(k_start, 0):e]], 2) for x in (k, v))
        doc_k = torch.cat([doc.new_zeros(pad), doc[max(k_start, 0):e]])
        got = document_causal_attention(q[:, :, s:e], kk, vv, window=window, doc_q=doc[s:e], doc_k=doc_k,
                                        q_start=s, k_start=k_start, impl="tiled", tile=4)
        torch.testing.assert_close(got, ref[0][:, :, s:e], **TOL64)


@pytest.mark.parametrize("window,docs", [(None, True), (5, False), (7, True)])
def test_flex_forward_matches_dense_mask_on_cpu(window, docs):
    q, k, v, _ = _qkv(torch.float32)
    cu = CU if docs else None
    mask = dense_attention_mask(T, window=window, cu_seqlens=cu, device=q.device)
    doc = document_ids(CU, T) if docs else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with warnings.catch_warnings():  # eager FlexAttention warns (once) that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        got = document_causal_attention(q, k, v, window=window, doc_q=doc, doc_k=doc, impl="flex", cache_for=cu)
    torch.testing.assert_close(got, ref, **TOL32)


def test_flex_block_mask_is_built_once_per_batch():
    q, k, v, _ = _qkv(torch.float32)
    cu = CU.clone()
    doc = document_ids(cu, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        document_causal_attention(q, k, v, window=None, doc_q=doc, doc_k=doc, impl="flex", cache_for=cu)
        first = att._BLOCK_MASK_CACHE["mask"]
        document_causal_attention(q, k, v, window=None, doc_q=doc, doc_k=doc, impl="flex", cache_for=cu)
        assert att._BLOCK_MASK_CACHE["mask"] is first
        other = CU.clone()
        document_causal_attention(q, k, v, window=None, doc_q=doc, doc_k=doc, impl="flex", cache_for=other)
        assert att._BLOCK_MASK_CACHE["mask"] is not first


def _cfg(window=5):
    return ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, layer_pattern="A",
                       window=window, chunk_size=4)


def _layer_reference(layer: Attention, x: torch.Tensor, cu):
    """The old layer: same projections and RoPE, dense-mask SDPA."""
    b, t, _ = x.shape
    shape = (b, t, layer.n_local, layer.head_dim)
    q, k, v = (p(x).view(shape) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    pos = doc_positions(cu, t, x.device)
    q, k = rotary(q, pos, layer.cfg.rope_theta), rotary(k, pos, layer.cfg.rope_theta)
    mask = dense_attention_mask(t, window=layer.window, cu_seqlens=cu, device=x.device)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return layer.o_proj(o.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("sliding,docs", [(True, True), (False, True), (True, False), (False, False)])
def test_layer_matches_dense_reference_fp64(sliding, docs):
    torch.manual_seed(0)
    layer = Attention(_cfg(), sliding=sliding, out_std=0.02).double()
    cu = CU if docs else None
    x = torch.randn(1, T, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(1, T, 16, dtype=torch.float64)
    layer(x, cu).backward(gy)
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    y = layer(x, cu).detach()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y_ref = _layer_reference(layer, x, cu)
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref.detach(), **TOL64)
    ref = [x.grad] + [p.grad for p in layer.parameters()]
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g, r, **TOL64, msg=f"gradient {i}")


class _Spy(torch.overrides.TorchFunctionMode):
    """Fails on host syncs; records the mask shape / is_causal of every SDPA call."""

    SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.sdpa: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            raise AssertionError(f"host sync: Tensor.{name}")
        if func is F.scaled_dot_product_attention:
            m = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.sdpa.append((None if m is None else tuple(m.shape), kwargs.get("is_causal", False)))
        return func(*args, **kwargs)


def _backward_in_mode(y, gy):
    # Tensor.backward is a torch function itself (the mode is off while it runs): call the engine
    torch.autograd.variable.Variable._execution_engine.run_backward((y,), (gy,), False, False, (), True, True)


@pytest.mark.parametrize("sliding,docs", [(True, True), (False, True), (True, False)])
def test_layer_has_no_host_sync_and_no_dense_mask(sliding, docs):
    t = 64
    torch.manual_seed(0)
    layer = Attention(_cfg(window=9), sliding=sliding, out_std=0.02)
    cu = torch.tensor([0, 5, 30, 64], dtype=torch.int32) if docs else None
    x = torch.randn(1, t, 16, requires_grad=True)
    old_tile, att.DEFAULT_TILE = att.DEFAULT_TILE, 16
    try:
        spy = _Spy()
        with spy:
            y = layer(x, cu)
            _backward_in_mode(y, torch.ones_like(y))
    finally:
        att.DEFAULT_TILE = old_tile
    assert x.grad is not None and spy.sdpa
    assert all(shape is not None and shape[0] <= 16 for shape, _ in spy.sdpa), spy.sdpa  # never [T, T]


def test_dense_rows_use_is_causal_sdpa():
    layer = Attention(_cfg(), sliding=False, out_std=0.02)
    spy = _Spy()
    with spy:
        layer(torch.randn(2, 12, 16))
    assert spy.sdpa == [(None, True)]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(impl="dense"), "impl='dense'"), (dict(window=0), "window=0"), (dict(tile=0), "tile=0"),
    (dict(doc_q=torch.zeros(T, dtype=torch.long)), "doc_q and doc_k"),
])
def test_bad_arguments_are_one_line_errors(kwargs, needle):
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match=needle) as err:
        document_causal_attention(q, k, v, **kwargs)
    assert "\n" not in str(err.value)
