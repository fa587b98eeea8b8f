"""Context parallelism is NCCL-safe: every tensor it creates is on the input's device, and every
neighbour pair posts its point-to-point messages in one matching order (no tags).

One launch of 2 gloo processes runs a hybrid model's CP forward + backward (Miras layer under
both schemes, sliding-window and full attention, packed documents crossing the rank boundary):

* A ``TorchFunctionMode`` records every tensor factory call (``torch.zeros``, ``empty``,
  ``ones``, ``full``, ``tensor``, ``arange``, ``eye``, ...; ``*_like`` and ``Tensor.new_*`` take
  their device from a tensor and are fine) made while the layers run, forward and backward, and
  the test fails on any call whose ``device`` is not given explicitly as the input's device: a
  factory that "defaults to CPU" would put a CPU buffer in front of NCCL on a GPU run.
* ``dist.isend`` / ``dist.irecv`` are wrapped to log (peer, size, dtype) in posting order; rank
  0's sends to rank 1 must equal rank 1's receives from rank 0, message by message, and vice
  versa (NCCL matches in posting order and ignores tags), and no call may pass a tag.
* The CP loss equals the single-process loss (1e-5): the recorder changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miras_pretrain.testing.context_parallel_launch import spawn

pytestmark = [pytest.mark.distributed]

FACTORIES = {
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "eye", "linspace", "logspace",
    "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor",
}
V, D, T = 64, 16, 48
PACKED_CU = [0, 13, 37, 40, 48]  # crosses the CP = 2 boundary (24) off the chunk grid


class FactoryRecorder(torch.overrides.TorchFunctionMode):
    """Record every torch factory call: (name, device kwarg, caller 'file:line')."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if getattr(func, "__module__", None) in ("torch", "torch._C._VariableFunctions", None) and name in FACTORIES:
            self.calls.append((name, kwargs.get("device"), _caller()))
        return func(*args, **kwargs)


def _caller() -> str:
    """The first stack frame outside torch and this file: who asked for the tensor."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if "/torch/" not in fn and not fn.endswith("test_cp_devices.py"):
            return f"{fn.split('/main/')[-1]}:{f.f_lineno} ({f.f_code.co_qualname})"
        f = f.f_back
    return "?"


def _backward_inside_mode(loss: torch.Tensor) -> None:
    """``loss.backward()`` with the recorder still active: ``Tensor.backward`` is itself a torch
    function, and a mode is switched off while it handles one, so the engine is called directly."""
    engine = torch.autograd.variable.Variable._execution_engine
    engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (), True, True)


def _worker(rank: int, world: int, workdir: str) -> None:
    import torch.distributed as dist

    from miras_pretrain.model import ModelConfig, build_model
    from miras_pretrain.parallel.context_parallel import ContextParallel, CPGroup, cp_loss_reduce, slice_batch_for_cp

    msgs: list[tuple[str, int, int, str]] = []
    tags: list[int] = []
    real_isend, real_irecv = dist.isend, dist.irecv

    def isend(tensor, dst=None, group=None, tag=0, **kw):
        msgs.append(("send", dst, tensor.numel(), str(tensor.dtype)))
        tags.append(tag)
        return real_isend(tensor, dst=dst, group=group, tag=tag, **kw)

    def irecv(tensor, src=None, group=None, tag=0, **kw):
        msgs.append(("recv", src, tensor.numel(), str(tensor.dtype)))
        tags.append(tag)
        return real_irecv(tensor, src=src, group=group, tag=tag, **kw)

    dist.isend, dist.irecv = isend, irecv
    grp = CPGroup([0, 1], dist.group.WORLD)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (1, T), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    batch = {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(PACKED_CU, dtype=torch.int32)}
    bad: list[str] = []
    seen: list[str] = []
    losses = {}
    for scheme in ("state_passing", "all_gather"):
        cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=2, ffn_hidden=32, layer_pattern="MAT",
                          miras={"preset": "gated_delta"}, chunk_size=4, gate_rank=4, window=5, backend="chunked")
        torch.manual_seed(0)
        model = build_model(cfg)
        ref = model(ids, labels=labels, cu_seqlens=batch["cu_seqlens"]).detach()
        cp = ContextParallel(grp, scheme)
        local = slice_batch_for_cp(batch, grp.rank, grp.size, chunk_size=cfg.chunk_size)
        rec = FactoryRecorder()
        with rec:
            with cp.batch(local["cp_slice"]) as ctx:
                loss = model(local["input_ids"], labels=local["labels"], cu_seqlens=local["cu_seqlens"], cp=ctx)
                loss = loss * local["cp_loss_scale"]
            _backward_inside_mode(loss)
        cp.finish_step()
        losses[scheme] = (float(cp_loss_reduce(loss, grp)), float(ref))
        want = local["input_ids"].device
        seen += [f"{name} {where}" for name, _, where in rec.calls]
        for name, dev, where in rec.calls:
            if dev is None or torch.device(dev) != want:
                bad.append(f"{scheme}: torch.{name}(device={dev!r}) at {where}")
        if not any("comm.py" in w and ".backward)" in w for _, _, w in rec.calls):
            bad.append(f"{scheme}: the recorder saw no factory call in backward (is the mode active there?)")
    dist.isend, dist.irecv = real_isend, real_irecv
    torch.save({"bad": bad, "seen": seen, "msgs": msgs, "tags": tags, "losses": losses},
               Path(workdir) / f"dev_{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("cpdev")
    spawn(_worker, 2, str(path), timeout=200.0)
    return [torch.load(path / f"dev_{r}.pt") for r in range(2)]


def test_every_cp_tensor_is_on_the_input_device(results):
    """No factory call during a CP forward + backward leaves its device to the default."""
    bad = sorted({b for out in results for b in out["bad"]})
    assert not bad, "factory calls without the input's device:\n" + "\n".join(bad)


def test_pairs_post_messages_in_matching_order(results):
    """Rank 0's sends to rank 1 are rank 1's receives from rank 0, in the same order and sizes
    (and the other way round); no message carries a tag."""
    m0, m1 = results[0]["msgs"], results[1]["msgs"]
    sent01 = [(n, dt) for kind, peer, n, dt in m0 if kind == "send" and peer == 1]
    recv01 = [(n, dt) for kind, peer, n, dt in m1 if kind == "recv" and peer == 0]
    sent10 = [(n, dt) for kind, peer, n, dt in m1 if kind == "send" and peer == 0]
    recv10 = [(n, dt) for kind, peer, n, dt in m0 if kind == "recv" and peer == 1]
    assert sent01 and sent10, "no point-to-point messages were exchanged"
    assert sent01 == recv01
    assert sent10 == recv10
    assert all(t == 0 for out in results for t in out["tags"]), "a CP message carries a tag"


def test_cp_loss_equals_single_process(results):
    for out in results:
        for scheme, (got, ref) in out["losses"].items():
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-5), scheme
