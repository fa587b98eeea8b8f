"""Differentiable CP communication: halo exchange, state passing (send / receive), all-gather.

:class:`CPTransport` is what every exchange needs from the runtime: the group, the non-blocking
sends still in flight and the timers (:class:`CPStats`).

Every message is ONE flat buffer (tensors packed in order, cast back on arrival) in fp32, or
fp64 when any of its tensors is fp64 (:func:`wire_dtype`; both sides derive it from the same
shapes and dtypes): fewer messages, and bf16 inputs round-trip exactly through fp32.
Point-to-point messages use global ranks on ``CPGroup.p2p`` (a group that carries no
collectives; the default group when None).

**Message order, no tags.** NCCL ignores point-to-point tags: between two ranks it matches the
i-th send with the i-th receive. So no message here carries a tag (gloo then matches the same
way, which is what the gloo tests exercise), and both ranks of every neighbour pair post their
sends and receives in one fixed order:

* Forward, messages flow r -> r+1 only, in program order: every rank runs the same layers and
  exchanges in the same order, and a send/receive pair is decided from the shared layout, so the
  k-th forward send of rank r to r+1 is the k-th forward receive of r+1 from r. A receive is
  posted only where its exchange sits in that order (never ahead of an earlier exchange's
  receive from the same rank).
* Backward, messages flow r+1 -> r only, in exactly the reverse forward order. Autograd would
  otherwise schedule the communication nodes by its own rules, which may differ between ranks
  whose graphs differ. Within a layer the nodes are therefore chained (:class:`Chain`): each
  node takes the previous node's token as an input, so node k's backward runs only after node
  k+1's. The chain starts from a zero-size view of a tensor computed from the layer's input, so
  every node of layer l+1 finishes its backward before the gradient of layer l's output exists,
  i.e. before any node of layer l runs. A chain never spans two layers (nor two micro-batches of
  a pipeline), so it never links two separate autograd graphs.
* Forward waits only on rank r-1, backward waits only on rank r+1: no cycle, no deadlock.

**Devices.** Every tensor this package creates (receive buffers, zero fillers, tokens, chain
anchors) is created on the device of the tensors it works on, so NCCL (CUDA) never sees a CPU
buffer; ``tests/test_cp_devices.py`` fails on any factory call without that explicit device.

Sends are non-blocking (``isend``; the work and its buffer are kept until
:meth:`CPTransport.finish_step`). Receives are waited for only where the data is needed; the time
spent waiting is added to ``stats.wait_s`` (state / state gradient) or ``stats.comm_s`` (halos,
all-gathers). On NCCL ``wait()`` only orders the current CUDA stream, so these timers measure the
host side only there.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .group import CPGroup


@dataclass
class CPStats:
    """Counters since the last reset. ``wait_s``: time blocked on another rank's memory state
    (forward) or state gradient (backward) -- the wavefront bubble plus transfer; ``comm_s``: time
    in the other CP communication (halos, all-gathers); ``bytes_sent`` and ``messages`` sent by
    this rank; ``tokens``: local tokens run through the model."""

    wait_s: float = 0.0
    comm_s: float = 0.0
    bytes_sent: int = 0
    messages: int = 0
    tokens: int = 0

    def as_dict(self, prefix: str = "cp/") -> dict[str, float]:
        return {prefix + f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


class CPTransport:
    """Per-process state of CP communication: the group, pending sends, timers."""

    def __init__(self, group: CPGroup) -> None:
        self.group = group
        self.stats = CPStats()
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def add_pending(self, work: Any, buf: torch.Tensor) -> None:
        # the buffer is kept alive with its work: an asynchronous backend (NCCL) reads it later
        self._pending.append((work, buf))

    def finish_step(self) -> None:
        """Wait for every outstanding send (call after backward, before the optimizer step)."""
        t0 = time.perf_counter()
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
        self.stats.comm_s += time.perf_counter() - t0

    def reset_stats(self) -> CPStats:
        """The counters since the last reset; start new ones."""
        old, self.stats = self.stats, CPStats()
        return old


Like = Sequence[tuple[tuple[int, ...], torch.dtype]]


def wire_dtype(dtypes) -> torch.dtype:
    """fp64 if any tensor of the message is fp64, else fp32."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def pack(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate tensors into one flat buffer of their wire dtype on ``device``."""
    wire = wire_dtype([t.dtype for t in tensors])
    if not tensors:
        return torch.zeros(0, dtype=wire, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=wire) for t in tensors])


def unpack(buf: torch.Tensor, like: Like) -> list[torch.Tensor]:
    """Split a flat buffer into tensors of the given (shape, dtype) (on the buffer's device)."""
    out, off = [], 0
    for shape, dtype in like:
        n = math.prod(shape)
        out.append(buf[off:off + n].view(shape).to(dtype))
        off += n
    if off != buf.numel():
        raise RuntimeError(f"CP message has {buf.numel()} values, expected {off}: the ranks of a CP group disagree on shapes")
    return out


def zeros_like_spec(like: Like, device: torch.device) -> list[torch.Tensor]:
    """Zero tensors of the given (shape, dtype) on ``device``."""
    return [torch.zeros(s, dtype=d, device=device) for s, d in like]


def _isend(cp: CPTransport, buf: torch.Tensor, dst: int) -> None:
    cp.add_pending(dist.isend(buf, dst=dst, group=cp.group.p2p), buf)
    cp.stats.bytes_sent += buf.numel() * buf.element_size()
    cp.stats.messages += 1


class PostedRecv:
    """An ``irecv`` of the message ``like`` (shapes, dtypes) from ``src`` into a buffer on
    ``device``, posted now (its place in the pair's message order), waited for by :meth:`wait`."""

    def __init__(self, cp: CPTransport, like: Like, src: int, device: torch.device) -> None:
        numel = sum(math.prod(s) for s, _ in like)
        self.cp = cp
        self.buf = torch.empty(numel, dtype=wire_dtype([d for _, d in like]), device=device)
        self.work = dist.irecv(self.buf, src=src, group=cp.group.p2p)

    def wait(self, counter: str) -> torch.Tensor:
        t0 = time.perf_counter()
        self.work.wait()
        setattr(self.cp.stats, counter, getattr(self.cp.stats, counter) + time.perf_counter() - t0)
        return self.buf


def _token(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device)


# ----------------------------------------------------------------------------- halo
class HaloExchange(torch.autograd.Function):
    """Send ``tensors`` to the next rank and return the previous rank's tensors of shapes
    ``recv_like`` (zeros where there is no previous rank) and a token. Backward returns the
    gradient of what was received to the previous rank and receives the gradient of what was
    sent from the next.

    ``send``/``recv`` say whether this rank sends / receives (both sides decide it from the same
    layout, so they agree). ``link`` is the previous token of the layer's :class:`Chain`."""

    @staticmethod
    def forward(ctx, cp, send, recv, recv_like, link, *tensors):
        dev = link.device
        ctx.cp, ctx.send, ctx.recv, ctx.device = cp, send, recv, dev
        ctx.like = [(tuple(t.shape), t.dtype) for t in tensors]
        ctx.recv_like = list(recv_like)
        grp = cp.group
        if send:
            _isend(cp, pack(tensors, dev), grp.next)
        if recv:
            out = unpack(PostedRecv(cp, recv_like, grp.prev, dev).wait("comm_s"), recv_like)
        else:
            out = zeros_like_spec(recv_like, dev)
        return (*out, _token(dev))

    @staticmethod
    def backward(ctx, *grads):
        cp, dev = ctx.cp, ctx.device
        grp = cp.group
        grads = grads[:-1]  # the token's gradient is meaningless
        if ctx.recv:
            full = [torch.zeros(s, dtype=d, device=dev) if g is None else g.to(d)
                    for g, (s, d) in zip(grads, ctx.recv_like)]
            _isend(cp, pack(full, dev), grp.prev)
        if ctx.send:
            gin = unpack(PostedRecv(cp, ctx.like, grp.next, dev).wait("comm_s"), ctx.like)
        else:
            gin = zeros_like_spec(ctx.like, dev)
        return (None, None, None, None, None, *gin)


# ----------------------------------------------------------------------------- state passing
class FromPrev(torch.autograd.Function):
    """The state received from rank r-1 (already waited for) as tensors of the graph, plus a
    token; backward sends their gradient back to rank r-1 (non-blocking)."""

    @staticmethod
    def forward(ctx, cp, buf, like, link):
        ctx.cp, ctx.like, ctx.device = cp, like, link.device
        return (*unpack(buf, like), _token(link.device))

    @staticmethod
    def backward(ctx, *grads):
        full = [torch.zeros(s, dtype=d, device=ctx.device) if g is None else g.to(d)
                for g, (s, d) in zip(grads[:-1], ctx.like)]
        _isend(ctx.cp, pack(full, ctx.device), ctx.cp.group.prev)
        return None, None, None, None


class ToNext(torch.autograd.Function):
    """Send ``tensors`` to rank r+1 (non-blocking) and return a token to attach to the layer
    output (``Attach``); backward waits for rank r+1's gradient of those tensors (timed as
    ``stats.wait_s``) and hands it to the tensors' producers."""

    @staticmethod
    def forward(ctx, cp, link, *tensors):
        ctx.cp, ctx.device = cp, link.device
        ctx.like = [(tuple(t.shape), t.dtype) for t in tensors]
        _isend(cp, pack(tensors, link.device), cp.group.next)
        return _token(link.device)

    @staticmethod
    def backward(ctx, _grad_token):
        cp = ctx.cp
        buf = PostedRecv(cp, ctx.like, cp.group.next, ctx.device).wait("wait_s")
        return (None, None, *unpack(buf, ctx.like))


class Attach(torch.autograd.Function):
    """``y`` unchanged, with ``token`` made part of the graph: backward passes ``y``'s gradient
    through and gives ``token`` a zero gradient, so the token's producer's backward runs on every
    rank (needed for collectives and for the state-gradient exchange)."""

    @staticmethod
    def forward(ctx, y, token):
        ctx.like = (tuple(token.shape), token.dtype, token.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.like
        return g, torch.zeros(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- all-gather
class AllGather(torch.autograd.Function):
    """[n] -> ([cp_size, n], token) over the CP group; backward sums the gradient over the group
    and keeps this rank's row (an all-reduce: gloo has no reduce-scatter; on NCCL a
    reduce-scatter would move 1/cp_size of it). Every rank must run this backward (a collective),
    also a rank whose own contribution is a constant: the chain's ``link`` guarantees it."""

    @staticmethod
    def forward(ctx, cp, flat, link):
        ctx.cp = cp
        grp = cp.group
        token = _token(link.device)
        if grp.size == 1:
            return flat.detach().clone()[None], token
        t0 = time.perf_counter()
        out = [torch.empty_like(flat) for _ in range(grp.size)]
        dist.all_gather(out, flat.contiguous(), group=grp.group)
        cp.stats.comm_s += time.perf_counter() - t0
        cp.stats.bytes_sent += flat.numel() * flat.element_size() * (grp.size - 1)
        cp.stats.messages += 1
        return torch.stack(out), token

    @staticmethod
    def backward(ctx, g, _grad_token):
        cp = ctx.cp
        if cp.group.size == 1:
            return None, g[0], None
        t0 = time.perf_counter()
        g = g.contiguous().clone()
        dist.all_reduce(g, group=cp.group.group)
        cp.stats.comm_s += time.perf_counter() - t0
        return None, g[cp.group.rank], None


# ----------------------------------------------------------------------------- ordering
class Chain:
    """The communication nodes of ONE layer forward, in program order (see the module
    docstring): each exchange takes the previous token and returns the next, so backward runs
    them in exactly the reverse order on every rank.

    ``start``: any tensor computed from the layer's input (its device is the device of every
    buffer and token; a zero-size view of it starts the chain so the whole chain's backward
    precedes the gradient of the layer's input). Call :meth:`attach` on the layer's output."""

    def __init__(self, cp: CPTransport, start: torch.Tensor) -> None:
        self.cp, self.device = cp, start.device
        if start.requires_grad:
            self.link = start.reshape(-1)[:0] if start.is_contiguous() else start.narrow(-1, 0, 0)
        else:
            # nothing to hang the chain on (constant input or no grad): an empty leaf so the
            # nodes' backward still runs when grad is enabled
            self.link = torch.empty(0, device=start.device, requires_grad=torch.is_grad_enabled())

    def halo(self, tensors: Sequence[torch.Tensor], *, send: bool, recv: bool, recv_like: Like) -> list[torch.Tensor]:
        """:class:`HaloExchange`: send ``tensors`` to rank r+1, return rank r-1's (``recv_like``)."""
        *out, self.link = HaloExchange.apply(self.cp, send, recv, list(recv_like), self.link, *tensors)
        return out

    def from_prev(self, posted: PostedRecv, like: Like) -> list[torch.Tensor]:
        """:class:`FromPrev`: wait for the posted receive (``wait_s``), its tensors as graph nodes."""
        buf = posted.wait("wait_s")
        *out, self.link = FromPrev.apply(self.cp, buf, list(like), self.link)
        return out

    def to_next(self, tensors: Sequence[torch.Tensor]) -> None:
        """:class:`ToNext`: send ``tensors`` to rank r+1; backward waits for their gradient."""
        self.link = ToNext.apply(self.cp, self.link, *tensors)

    def all_gather(self, flat: torch.Tensor) -> torch.Tensor:
        """:class:`AllGather` of a flat tensor [n] -> [cp_size, n]."""
        out, self.link = AllGather.apply(self.cp, flat, self.link)
        return out

    def attach(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` with the chain's last token attached (every node's backward then runs)."""
        return Attach.apply(y, self.link)
