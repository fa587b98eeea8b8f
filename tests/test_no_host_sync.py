"""No host syncs inside a layer (issue #16 item 5).

A host read of device memory (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``.cpu()``,
``.numpy()``, or an op whose output size depends on tensor values: ``nonzero``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``torch.equal``...) stalls the GPU until
its queue drains and cannot be captured in a CUDA graph. :class:`NoHostSync` records every such
call while a layer runs forward and backward; the packed-document metadata (``VarlenMeta``) is
built on the host before, as the data path does (``data_bridge.attach_varlen``).

The Triton interpreter (CPU) itself turns kernel arguments into numpy arrays; calls made from
``triton/runtime/interpreter.py`` are not the layer's and are excluded (nothing else is). The
backward runs through ``torch.autograd.graph._engine_run_backward`` so that the mode stays active
inside the autograd engine (``Tensor.backward`` is itself a torch function, and a mode is switched
off while it handles one).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import miras_kernels.api as kernels_api
from miras_kernels import VarlenMeta
from miras_pretrain.model.lm import Block, build_model
from miras_pretrain.testing.devices import test_device as layer_device
from miras_pretrain.testing.tiny_models import tiny_config

# methods / functions that read device memory on the host or size their output from it
SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "argwhere", "equal", "allclose", "masked_select", "unique", "unique_consecutive", "bincount"}


def _in_triton_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "triton/runtime/interpreter" in name:
            return True
        f = f.f_back
    return False


def _caller() -> str:
    """The innermost frame outside torch and this file: where the syncing call was written."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("test_no_host_sync.py"):
            return f"{name.split('/main/')[-1]}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "?"


class NoHostSync(TorchFunctionMode):
    """Records every host-syncing tensor call (see module docstring) made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        bad = name in SYNCING
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            bad = isinstance(repeats, torch.Tensor) and repeats.numel() > 1
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            bad = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
        if bad and not _in_triton_interpreter():
            self.violations.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)


def _backward(loss: torch.Tensor) -> None:
    torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                              allow_unreachable=True, accumulate_grad=True)


def _run_layer(block: torch.nn.Module, h: torch.Tensor, varlen) -> list[str]:
    """Forward + backward of ``block`` under :class:`NoHostSync`; on a GPU (``MIRAS_TEST_DEVICE=cuda``)
    also under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any real synchronisation."""
    on_cuda = h.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with NoHostSync() as mode:
            out = block(h, varlen)
            _backward(out.float().square().sum())
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
    return mode.violations


LINEAR = {"memory": "linear", "bias": "l2", "retention": "decay"}
# documents: one crossing a chunk boundary, an empty one, one not a chunk multiple
OFFSETS = [0, 5, 5, 21, 32]

CASES = [
    # (miras, layer pattern, backend)
    pytest.param(LINEAR, "M", "chunked", id="linear-chunked"),
    pytest.param({"preset": "yaad"}, "M", "chunked", id="mlp-chunked"),
    pytest.param({"preset": "titans"}, "M", "chunked", id="mlp-momentum-chunked"),
    pytest.param({"preset": "yaad"}, "A", "chunked", id="attention"),
    pytest.param({"preset": "yaad"}, "M", "triton", id="mlp-triton", marks=pytest.mark.triton),
    pytest.param(LINEAR, "M", "triton", id="linear-triton", marks=pytest.mark.triton),
]


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if the Triton backend falls back to the chunked path (the test would test nothing)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton backend fell back to 'chunked'")
    monkeypatch.setattr(kernels_api, "miras_memory_chunked", refuse)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("miras,pattern,backend", CASES)
def test_layer_forward_backward_has_no_host_sync(miras, pattern, backend, varlen, request):
    """A Miras layer (linear / MLP memory; chunked PyTorch or Triton) or an attention layer,
    forward + backward, dense and packed: no host read of device memory."""
    if backend == "triton":
        request.getfixturevalue("no_fallback")
    cfg = tiny_config(miras=miras, pattern=pattern, d_model=32, n_heads=2, n_layers=1, chunk_size=16,
                      backend=backend)
    dev = layer_device()
    block = Block(cfg, 0).to(dev)
    if varlen:
        # built once per batch from the host offsets, as the data path does
        meta = VarlenMeta.from_host(torch.tensor(OFFSETS, dtype=torch.int32), device=dev)
        h = torch.randn(1, OFFSETS[-1], cfg.d_model, device=dev, requires_grad=True)
    else:
        meta = None
        h = torch.randn(2, 32, cfg.d_model, device=dev, requires_grad=True)
    violations = _run_layer(block, h, meta)
    assert not violations, f"{request.node.name}: host syncs inside the layer:\n" + "\n".join(sorted(set(violations)))


def test_model_step_from_the_data_path_has_no_host_sync():
    """The whole model (Miras + attention blocks, loss) on a packed batch whose metadata the data
    path built before the (here: no-op) device move: forward + backward read nothing on the host."""
    from miras_pretrain.train import data_bridge

    cfg = tiny_config(miras={"preset": "yaad"}, pattern="MA", d_model=32, n_heads=2, n_layers=2, chunk_size=16)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1),
             "cu_seqlens": torch.tensor([0, 7, 16, 20, 32], dtype=torch.int32)}
    batch = data_bridge.attach_varlen(batch)
    ids, labels, _ = data_bridge.model_inputs(batch)
    varlen = data_bridge.model_varlen(batch)
    assert isinstance(varlen, VarlenMeta) and varlen.offsets == (0, 7, 16, 20, 32)
    with NoHostSync() as mode:
        loss = model(ids, labels=labels, cu_seqlens=varlen)
        _backward(loss)
    assert torch.isfinite(loss.detach())
    assert not mode.violations, "host syncs in the model step:\n" + "\n".join(sorted(set(mode.violations)))


def test_detector_catches_syncs_in_forward_and_backward():
    """The detector is not vacuous: .item(), bool(t) and a value-sized repeat_interleave are
    caught, in a custom autograd Function's backward too."""
    class Syncs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.sum().item()
            return g * 2

    x = torch.ones(3, requires_grad=True)
    with NoHostSync() as mode:
        if x.sum() > 0:
            torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        _backward(Syncs.apply(x).sum())
    names = [v.split(" ")[0] for v in mode.violations]
    assert names == ["__bool__", "repeat_interleave", "item"], mode.violations


def test_bare_cu_seqlens_reads_once_at_the_api_boundary():
    """A bare cu_seqlens tensor still works: the operator reads it once (documented), and a
    tensor that belongs to a VarlenMeta is recognised (no read)."""
    from miras_kernels import MirasSpec, miras_memory

    spec = MirasSpec.from_dict(LINEAR)
    T, H, d = 32, 2, 8
    q, k, v = (torch.randn(1, T, H, d) for _ in range(3))
    alpha, eta = torch.rand(1, T, H) * 0.5 + 0.5, torch.rand(1, T, H)
    cu = torch.tensor(OFFSETS, dtype=torch.int32)
    with NoHostSync() as mode:
        y_bare, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, cu_seqlens=cu.clone(),
                                 backend="chunked")
    assert [v.split(" ")[0] for v in mode.violations] == ["tolist"], mode.violations
    meta = VarlenMeta.from_host(cu)
    with NoHostSync() as mode:
        y_meta, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, cu_seqlens=meta, backend="chunked")
        y_tensor, _ = miras_memory(q, k, v, alpha, eta, spec=spec, chunk_size=16, cu_seqlens=meta.cu_seqlens,
                                   backend="chunked")
    assert not mode.violations, mode.violations
    torch.testing.assert_close(y_meta, y_bare, rtol=0, atol=0)
    torch.testing.assert_close(y_tensor, y_bare, rtol=0, atol=0)


def test_varlen_meta_validates_once_with_one_line_errors():
    """Bad offsets are refused where the metadata is built (one-line ValueError naming cu_seqlens)."""
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        VarlenMeta.from_host([0, 5, 3, 8])
    with pytest.raises(ValueError, match="end at T=8"):
        VarlenMeta.from_host([0, 5, 7], total=8)
    with pytest.raises(ValueError, match="1-D int32/int64"):
        VarlenMeta.from_host(torch.tensor([0.0, 8.0]))
    meta = VarlenMeta.from_host([0, 5, 5, 21, 32])
    assert (meta.n_docs, meta.total, meta.max_len) == (4, 32, 16)
    assert meta.n_chunks(16) == (3, 1) and meta.n_chunks(8) == (5, 2)
    assert meta.chunk_offsets(8).tolist() == [0, 1, 1, 3, 5]
    assert meta.chunk_indices(8).tolist() == [[0, 0], [2, 0], [2, 1], [3, 0], [3, 1]]
    assert meta.positions().tolist() == [0, 1, 2, 3, 4] + list(range(16)) + list(range(11))
