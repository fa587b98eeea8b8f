"""Differentiable CP communication: halo exchange, state passing (send / receive), all-gather.

:class:`CPTransport` is what every exchange needs from the runtime: the group, a message tag per
exchange, the non-blocking sends still in flight and the timers (:class:`CPStats`).

Every message is ONE flat buffer (tensors packed in order, cast back on arrival) in fp32, or
fp64 when any of its tensors is fp64 (:func:`wire_dtype`; both sides derive it from the same
shapes and dtypes): fewer messages, and bf16 inputs round-trip exactly through fp32.
Point-to-point messages use global ranks on ``CPGroup.p2p`` (a group that carries no
collectives; the default group when None) with a tag per exchange
(:meth:`CPTransport.next_tag`; backward uses ``tag + 1``) so several messages between the same
pair can be in flight.

Sends are non-blocking (``isend``; the work is kept until :meth:`CPTransport.finish_step`).
Receives are posted early (``irecv``) and waited for only where the data is needed; the time
spent waiting is added to ``stats.wait_s`` (state / state gradient) or ``stats.comm_s`` (halos,
all-gathers).
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
    """Per-process state of CP communication: the group, message tags, pending sends, timers."""

    def __init__(self, group: CPGroup) -> None:
        self.group = group
        self.stats = CPStats()
        self._tag = 0
        self._pending: list[Any] = []

    # every CP exchange gets the next tag; all ranks of a group run the same program, so the
    # counters agree. Forward uses even tags, backward the odd tag after them.
    def next_tag(self) -> int:
        self._tag = (self._tag + 1) % (1 << 24)
        return 2 * self._tag

    def add_pending(self, work: Any) -> None:
        self._pending.append(work)

    def finish_step(self) -> None:
        """Wait for every outstanding send (call after backward, before the optimizer step)."""
        t0 = time.perf_counter()
        for w in self._pending:
            w.wait()
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


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat buffer of their wire dtype."""
    wire = wire_dtype([t.dtype for t in tensors])
    if not tensors:
        return torch.zeros(0, dtype=wire)
    return torch.cat([t.detach().reshape(-1).to(wire) for t in tensors])


def unpack(buf: torch.Tensor, like: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Split a flat buffer into tensors of the given (shape, dtype)."""
    out, off = [], 0
    for shape, dtype in like:
        n = math.prod(shape)
        out.append(buf[off:off + n].view(shape).to(dtype))
        off += n
    if off != buf.numel():
        raise RuntimeError(f"CP message has {buf.numel()} values, expected {off}: the ranks of a CP group disagree on shapes")
    return out


def _isend(cp: CPTransport, buf: torch.Tensor, dst: int, tag: int) -> None:
    cp.add_pending(dist.isend(buf, dst=dst, tag=tag, group=cp.group.p2p))
    cp.stats.bytes_sent += buf.numel() * buf.element_size()
    cp.stats.messages += 1


class PostedRecv:
    """An ``irecv`` of the message ``like`` (shapes, dtypes) from ``src`` posted now, waited for by
    :meth:`wait`."""

    def __init__(self, cp: CPTransport, like: Like, src: int, tag: int) -> None:
        numel = sum(math.prod(s) for s, _ in like)
        self.cp, self.buf = cp, torch.empty(numel, dtype=wire_dtype([d for _, d in like]))
        self.work = dist.irecv(self.buf, src=src, tag=tag, group=cp.group.p2p)

    def wait(self, counter: str) -> torch.Tensor:
        t0 = time.perf_counter()
        self.work.wait()
        setattr(self.cp.stats, counter, getattr(self.cp.stats, counter) + time.perf_counter() - t0)
        return self.buf


# ----------------------------------------------------------------------------- halo
class HaloExchange(torch.autograd.Function):
    """Send ``tensors`` to the next rank and return the previous rank's tensors of shapes
    ``recv_like`` (zeros where there is no previous rank). Backward returns the gradient of what
    was received to the previous rank and receives the gradient of what was sent from the next.

    ``send``/``recv`` say whether this rank sends / receives (both sides decide it from the same
    layout, so they agree)."""

    @staticmethod
    def forward(ctx, cp, tag, send, recv, recv_like, anchor, *tensors):
        ctx.cp, ctx.tag, ctx.send, ctx.recv = cp, tag, send, recv
        ctx.like = [(tuple(t.shape), t.dtype) for t in tensors]
        ctx.recv_like = list(recv_like)
        grp = cp.group
        if send:
            _isend(cp, pack(tensors), grp.next, tag)
        if recv:
            buf = PostedRecv(cp, recv_like, grp.prev, tag).wait("comm_s")
            out = unpack(buf, recv_like)
        else:
            out = [torch.zeros(s, dtype=d) for s, d in recv_like]
        return (*out, torch.zeros(()))

    @staticmethod
    def backward(ctx, *grads):
        cp = ctx.cp
        grp = cp.group
        grads = grads[:-1]  # the token's gradient is meaningless
        if ctx.recv:
            full = [torch.zeros(s, dtype=d) if g is None else g.to(d) for g, (s, d) in zip(grads, ctx.recv_like)]
            _isend(cp, pack(full), grp.prev, ctx.tag + 1)
        if ctx.send:
            buf = PostedRecv(cp, ctx.like, grp.next, ctx.tag + 1).wait("comm_s")
            gin = unpack(buf, ctx.like)
        else:
            gin = [torch.zeros(s, dtype=d) for s, d in ctx.like]
        return (None, None, None, None, None, None, *gin)


def anchor() -> torch.Tensor:
    """An empty tensor that requires grad (when grad is enabled): an input that makes autograd
    call a communication Function's backward even when its other inputs are constants."""
    return torch.empty(0, requires_grad=torch.is_grad_enabled())


def halo_exchange(cp: CPTransport, tensors: Sequence[torch.Tensor], *, send: bool, recv: bool,
                  recv_like: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Functional wrapper of :class:`HaloExchange` (one tag per call). Returns the received
    tensors and a scalar token: the caller MUST ``Attach`` the token to its output, so that this
    rank's backward also runs when the received tensors are unused (it owes rank r-1 a gradient
    message and waits for rank r+1's)."""
    *out, token = HaloExchange.apply(cp, cp.next_tag(), send, recv, list(recv_like), anchor(), *tensors)
    return out, token


# ----------------------------------------------------------------------------- state passing
class FromPrev(torch.autograd.Function):
    """The state received from rank r-1 (already waited for) as tensors of the graph; backward
    sends their gradient back to rank r-1 (non-blocking). ``anchor`` is an empty tensor that
    requires grad so that autograd calls this backward at all."""

    @staticmethod
    def forward(ctx, cp, tag, buf, like, anchor):
        ctx.cp, ctx.tag, ctx.like = cp, tag, like
        return tuple(unpack(buf, like))

    @staticmethod
    def backward(ctx, *grads):
        full = [torch.zeros(s, dtype=d) if g is None else g.to(d) for g, (s, d) in zip(grads, ctx.like)]
        _isend(ctx.cp, pack(full), ctx.cp.group.prev, ctx.tag + 1)
        return None, None, None, None, None


class ToNext(torch.autograd.Function):
    """Send ``tensors`` to rank r+1 (non-blocking) and return a scalar token to attach to the
    layer output (``Attach``); backward waits for rank r+1's gradient of those tensors (timed as
    ``stats.wait_s``) and hands it to the tensors' producers."""

    @staticmethod
    def forward(ctx, cp, tag, anchor, *tensors):
        ctx.cp, ctx.tag = cp, tag
        ctx.like = [(tuple(t.shape), t.dtype) for t in tensors]
        _isend(cp, pack(tensors), cp.group.next, tag)
        return torch.zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        cp = ctx.cp
        buf = PostedRecv(cp, ctx.like, cp.group.next, ctx.tag + 1).wait("wait_s")
        return (None, None, None, *unpack(buf, ctx.like))


class Attach(torch.autograd.Function):
    """``y`` unchanged, with ``token`` made part of the graph: backward passes ``y``'s gradient
    through and gives ``token`` a zero gradient, so the token's producer's backward runs on every
    rank (needed for collectives and for the state-gradient exchange)."""

    @staticmethod
    def forward(ctx, y, token):
        ctx.like = (tuple(token.shape), token.dtype)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g, torch.zeros(ctx.like[0], dtype=ctx.like[1])


# ----------------------------------------------------------------------------- all-gather
class AllGather(torch.autograd.Function):
    """[n] -> [cp_size, n] over the CP group; backward sums the gradient over the group and keeps
    this rank's row (an all-reduce: gloo has no reduce-scatter; on NCCL a reduce-scatter would
    move 1/cp_size of it). Pass ``anchor()``: every rank must run this backward (a collective),
    also a rank whose own contribution is a constant."""

    @staticmethod
    def forward(ctx, cp, flat, anchor):
        ctx.cp = cp
        grp = cp.group
        if grp.size == 1:
            return flat.detach().clone()[None]
        t0 = time.perf_counter()
        out = [torch.empty_like(flat) for _ in range(grp.size)]
        dist.all_gather(out, flat.contiguous(), group=grp.group)
        cp.stats.comm_s += time.perf_counter() - t0
        cp.stats.bytes_sent += flat.numel() * flat.element_size() * (grp.size - 1)
        cp.stats.messages += 1
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        cp = ctx.cp
        if cp.group.size == 1:
            return None, g[0], None
        t0 = time.perf_counter()
        g = g.contiguous().clone()
        dist.all_reduce(g, group=cp.group.group)
        cp.stats.comm_s += time.perf_counter() - t0
        return None, g[cp.group.rank], None
