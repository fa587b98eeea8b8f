"""The Miras mixer under context parallelism: conv halo and the two exact memory schemes.

A rank's slice is cut into document fragments (:meth:`CPSlice.segments`). The first fragment may
continue a document from rank r-1, the last may continue on rank r+1; everything else is local.

**Chunk grid across a boundary.** The memory's chunk grid restarts at every document start, so
a packed document crossing a rank boundary generally crosses it *inside* a chunk (the slice
length is a multiple of the chunk size C, document starts are arbitrary). Every inner gradient of
a chunk is taken at the chunk-start weights, so the state at the boundary is not what rank r
needs. Instead the *carry* from rank r-1 is (a) the state at the last chunk-grid point of the
open document and (b) the inputs (q, k, v, gates) of the ``L = (boundary - doc_start) % C``
tokens after it. Rank r prepends those L tokens to its first fragment, runs from the state and
drops their outputs (rank r-1 already produced them exactly: a token's output depends only on
the chunk-start state and the tokens up to itself). Without packing, L = 0. The same carry serves
``step_at="retained"`` (the retained point ``gamma_i X_{t0}`` is built from the grid-point state
and the tail's gates) and ``chunk_rule="exact"`` (no grid at all: re-running the L tail tokens
from the grid-point state reproduces the boundary state exactly).

**State passing** (every memory): wait for the carry of rank r-1 (``stats.wait_s``), run, send
the carry to rank r+1 with a non-blocking send, go on to the next layer. Backward mirrors it.

**All-gather** (affine memories, ``spec.is_affine``): the update over an aligned stretch is
``Z_end = Z_0 @ A + B`` per row of the state, with ``Z = [W | S_W]`` (``S_W`` only with
momentum, so ``A`` is ``[dk, dk]`` or ``[2dk, 2dk]`` per head). Each rank computes ``B`` by
running its last fragment from a zero state and ``A`` by running it with ``v = 0`` from the
identity state (for dot and l2 the update is then exactly ``Z_0 @ A``, under either ``step_at``
and ``chunk_rule``, the exact delta rule included: it is derived from the
op itself, backend included, and autograd flows through it), one all-gather collects every
rank's (A, B), each rank folds the prefix in fp32 and re-runs its slice from the true incoming
state. Cost: about 3 runs of the memory op per rank (zero-state, probe, final) but no rank waits
for another; a document starting on rank j makes ``A_j = 0`` (the fold restarts there).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from miras_kernels import causal_depthwise_conv, miras_memory

from .comm import Chain, CPTransport, PostedRecv
from .layout import CPSlice, Segment

TOKEN_INPUTS = ("q", "k", "v", "alpha", "eta", "delta", "mu")
Tok = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def _cut(tok: Tok, lo: int, hi: int) -> Tok:
    return {n: t[:, lo:hi] for n, t in tok.items()}


def _cat(a: Tok | None, b: Tok) -> Tok:
    return b if not a else {n: torch.cat([a[n], b[n]], dim=1) for n in b}


def _length(tok: Tok) -> int:
    return tok["q"].shape[1]


class MirasLayerCP:
    """CP helper of one Miras mixer forward (see module docstring). Created by
    ``CPContext.miras_layer`` with the layer's resolved ``scheme`` (``"state_passing"`` or
    ``"all_gather"``). Its messages form one :class:`Chain` (comm.py: fixed order per neighbour
    pair, no tags): the conv halos (q, k, v), then the state (or the tail halo and the
    all-gather). The receive of rank r-1's state is posted when the memory runs, after the conv
    halos' receives, because NCCL matches a pair's messages in posting order. ``heads`` are this
    rank's (TP-local) heads. Every tensor it creates lives on the inputs' device."""

    def __init__(self, transport: CPTransport, layout: CPSlice, scheme: str, spec, *, batch: int, heads: int,
                 head_dim: int, chunk_size: int, dtype: torch.dtype = torch.float32) -> None:
        self.cp, self.layout, self.spec = transport, layout, spec
        self.dtype = dtype  # of q, k, v; gates are fp32; the state at least fp32 (as in the op)
        self.sdt = torch.promote_types(dtype, torch.float32)
        self.batch, self.heads, self.dk = batch, heads, head_dim
        self.chunk = chunk_size
        self.scheme = scheme
        self.segs: list[Segment] = self.layout.segments()
        first, last = self.segs[0], self.segs[-1]
        C = chunk_size
        self.l_in = (self.layout.start - first.doc_start) % C if first.continues_in else 0
        self.l_out = (self.layout.end - last.doc_start) % C if last.continues_out else 0
        self.shapes = spec.weight_shapes(head_dim, head_dim)
        self.keys = spec.state_keys()
        self.names = [n for n in TOKEN_INPUTS if n in ("q", "k", "v", "eta")
                      or (n == "alpha" and spec.needs_alpha) or (n == "delta" and spec.needs_delta)
                      or (n == "mu" and spec.needs_mu)]
        self.chain: Chain | None = None  # started by the first exchange, from its input

    def _chain(self, start: torch.Tensor) -> Chain:
        if self.chain is None:
            self.chain = Chain(self.cp, start)
        return self.chain

    def _carry_like(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of the carry rank r-1 sends: the state, then the tail tokens' inputs
        (q, k, v in the activation dtype, gates [B, L, H] in fp32, as the mixer makes them)."""
        b, h, d = self.batch, self.heads, self.dk
        like = [((b, h, *self.shapes[k.removeprefix("S_")]), self.sdt) for k in self.keys]
        if self.l_in:
            like += [((b, self.l_in, h, d), self.dtype) if n in ("q", "k", "v") else ((b, self.l_in, h), torch.float32)
                     for n in self.names]
        return like

    # ------------------------------------------------------------------ conv with halo
    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv across the rank boundary. x [B, T_local, C], weight [C, K] ->
        [B, T_local, C]; the previous rank's last K-1 inputs arrive by a halo exchange and are
        masked by the document positions (nothing crosses a document start)."""
        pos = self.layout.positions(x.device)
        h = weight.shape[1] - 1
        if h == 0:
            return causal_depthwise_conv(x, weight, pos)
        if h > x.shape[1]:
            raise ValueError(f"conv halo of {h} tokens is longer than the {x.shape[1]} tokens per CP rank: lower the CP size")
        grp = self.cp.group
        chain = self._chain(x)
        (halo,) = chain.halo(
            [x[:, -h:]], send=grp.next is not None, recv=grp.prev is not None,
            recv_like=[((x.shape[0], h, x.shape[2]), x.dtype)],
        )
        ext = torch.cat([halo, x], dim=1)
        pos_ext = torch.cat([pos.new_zeros(h), pos])  # halo rows' own outputs are dropped
        return chain.attach(causal_depthwise_conv(ext, weight, pos_ext)[:, h:])

    # ------------------------------------------------------------------ memory
    def memory(
        self, q, k, v, alpha, eta, *, spec, chunk_size: int = 64, delta=None, mu=None,
        initial_state: Mapping[str, torch.Tensor] | None = None, output_final_state: bool = False,
        cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
    ) -> tuple[torch.Tensor, None]:
        """``miras_memory`` over the global sequence for this rank's tokens (same arguments; the
        documents come from the CP layout, ``cu_seqlens`` must be its local offsets). Returns
        (y [B, T_local, H, dv], None)."""
        if spec != self.spec or chunk_size != self.chunk:
            raise ValueError("MirasLayerCP.memory: spec/chunk_size differ from the ones the layer was created with")
        if output_final_state:
            raise ValueError("output_final_state=True is not supported under context parallelism")
        want = None if cu_seqlens is None else self.layout.local_cu_seqlens(cu_seqlens.device)
        # The memory runs on the layout's documents; cu_seqlens is only checked for consistency.
        # Comparing values reads them back, a host sync on CUDA: there only the count is checked.
        if (self.layout.docs is None) != (cu_seqlens is None) or (want is not None and (
                want.numel() != cu_seqlens.numel()
                or (cu_seqlens.device.type == "cpu" and not torch.equal(want.long(), cu_seqlens.long())))):
            raise ValueError(
                "cu_seqlens passed to the model do not match the CP layout: pass the 'cu_seqlens' returned by "
                "slice_batch_for_cp together with its 'cp_slice'"
            )
        given = dict(q=q, k=k, v=v, alpha=alpha, eta=eta, delta=delta, mu=mu)
        tok = {n: given[n] for n in self.names}
        self.backend, self.init = backend, initial_state
        self.device = q.device  # of every tensor this helper creates (NCCL needs CUDA buffers)
        self.cp.stats.tokens += q.shape[0] * q.shape[1]
        if self.scheme == "state_passing":
            return self._state_passing(tok), None
        return self._all_gather(tok), None

    # ------------------------------------------------------------------ pieces
    def _op(self, tok: Tok, init: Mapping[str, torch.Tensor] | None, want_state: bool):
        return miras_memory(
            tok["q"], tok["k"], tok["v"], tok.get("alpha"), tok["eta"], spec=self.spec, chunk_size=self.chunk,
            delta=tok.get("delta"), mu=tok.get("mu"), initial_state=init, output_final_state=want_state,
            backend=self.backend,
        )

    def _full_state(self, init: Mapping[str, torch.Tensor] | None, rows: int) -> State:
        """A complete state dict [rows, H, r, c] (fp32): ``init`` broadcast, zeros where absent."""
        out = {}
        for key in self.keys:
            r, c = self.shapes[key.removeprefix("S_")]
            t = None if init is None else init.get(key)
            if t is None:
                out[key] = torch.zeros(rows, self.heads, r, c, dtype=self.sdt, device=self.device)
            else:
                out[key] = (t.unsqueeze(0) if t.dim() == 3 else t).to(self.sdt).expand(rows, self.heads, r, c)
        return out

    def _touch_init(self, state_in: State | None) -> State | None:
        """``state_in`` plus 0 x the model's learned initial state (exactly ``state_in``).

        Why: a rank whose slice continues a document never uses the initial state, so its
        parameters would get no gradient there while rank 0's do. Data-parallel engines
        (DeepSpeed ZeRO, reducing over DP x CP) need every rank to produce the same gradients
        in the same order; the zero term gives the initial state its (zero) gradient at the
        same point of the backward pass as on the rank that uses it."""
        if state_in is None or not self.init:
            return state_in
        out = dict(state_in)
        for key, t in self.init.items():
            if key in out:
                out[key] = out[key] + 0.0 * t.to(out[key].dtype)
        return out

    def _tail_like(self, tok: Tok, length: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((t.shape[0], length, *t.shape[2:]), t.dtype) for t in tok.values()]

    def _run_local(self, tok: Tok, state_in: State | None, tail_in: Tok | None, split_out: bool):
        """Run every fragment; returns y [B, T_local, H, dv] and, with ``split_out``, the carry
        (state at the last grid point of the open document, the inputs of the tokens after it)."""
        ys, carry = [], None
        for seg in self.segs:
            part, drop, init = _cut(tok, seg.start, seg.end), 0, self.init
            if seg.continues_in:
                if tail_in:
                    part, drop = _cat(tail_in, part), self.l_in
                init = self._touch_init(state_in)
            if split_out and seg.continues_out:
                n = _length(part)
                n_al = n // self.chunk * self.chunk
                y_parts = []
                if n_al:
                    y1, state = self._op(_cut(part, 0, n_al), init, True)
                    y_parts.append(y1)
                else:
                    state = self._full_state(init, part["q"].shape[0])
                tail = _cut(part, n_al, n)
                if n > n_al:
                    y_parts.append(self._op(tail, state, False)[0])
                y = torch.cat(y_parts, dim=1)
                carry = (state, tail if n > n_al else None)
            else:
                y = self._op(part, init, False)[0]
            ys.append(y[:, drop:])
        return torch.cat(ys, dim=1), carry

    def _state_passing(self, tok: Tok) -> torch.Tensor:
        first, last = self.segs[0], self.segs[-1]
        state_in = tail_in = None
        chain = self._chain(tok["q"])
        if first.continues_in:
            like = self._carry_like()
            if self.l_in and like[len(self.keys):] != self._tail_like(tok, self.l_in):
                raise ValueError("MirasLayerCP: the memory inputs' shapes/dtypes differ from the carry layout "
                                 "(q, k, v [B, T, H, d] in the activation dtype, gates [B, T, H] fp32)")
            # posted here, after this layer's conv halos: the pair's messages match in order
            posted = PostedRecv(self.cp, like, self.cp.group.prev, self.device)
            got = chain.from_prev(posted, like)
            state_in = dict(zip(self.keys, got[: len(self.keys)]))
            tail_in = dict(zip(tok, got[len(self.keys):])) if self.l_in else None
        y, carry = self._run_local(tok, state_in, tail_in, split_out=last.continues_out)
        if last.continues_out:
            state, tail = carry
            sent = [state[key].to(self.sdt).expand(self.batch, *state[key].shape[1:]) for key in self.keys]
            sent += list(tail.values()) if tail else []
            chain.to_next(sent)
        return chain.attach(y)

    # ------------------------------------------------------------------ all-gather scheme
    def _cat_state(self, st: State) -> torch.Tensor:
        """State dict -> Z = [W | S_W] ([rows, H, dv, m]) in fp32."""
        return torch.cat([st[key].to(self.sdt) for key in self.keys], dim=-1)

    def _transition(self, part: Tok) -> torch.Tensor:
        """A [B, H, m, m] with ``Z_end = Z_0 @ A + B`` over ``part`` (aligned to the chunk grid):
        the op run with v = 0 from the identity state (one probe row per state column)."""
        b, _, h, dk = part["k"].shape
        m = dk * len(self.keys)
        eye = torch.eye(m, dtype=self.sdt, device=self.device).expand(b, h, m, m)
        init = {key: eye[..., i * dk:(i + 1) * dk] for i, key in enumerate(self.keys)}
        probe = dict(part)
        probe["v"] = part["v"].new_zeros(b, part["v"].shape[1], h, m)
        _, st = self._op(probe, init, True)
        return self._cat_state(st)

    def _all_gather(self, tok: Tok) -> torch.Tensor:
        first, last = self.segs[0], self.segs[-1]
        grp, T = self.cp.group, _length(tok)
        # 1. the open document's tail tokens go to rank r+1 (all ranks at once, no chain)
        sent_tail = [t[:, T - self.l_out:] for t in tok.values()] if self.l_out else []
        chain = self._chain(tok["q"])
        got = chain.halo(
            sent_tail, send=bool(self.l_out), recv=bool(self.l_in),
            recv_like=self._tail_like(tok, self.l_in) if self.l_in else [],
        )
        tail_in = dict(zip(tok, got)) if self.l_in else None
        # 2. this rank's affine map over the aligned part of its last fragment
        b, h, dk = tok["k"].shape[0], self.heads, self.dk
        m = dk * len(self.keys)
        dv = tok["v"].shape[-1]
        A = torch.zeros(b, h, m, m, dtype=self.sdt, device=self.device)
        Bz = torch.zeros(b, h, dv, m, dtype=self.sdt, device=self.device)
        if last.continues_out:
            frag = _cut(tok, last.start, last.end)
            if last.continues_in and tail_in:
                frag = _cat(tail_in, frag)
            n_al = _length(frag) // self.chunk * self.chunk
            aligned = _cut(frag, 0, n_al)
            if last.continues_in:  # the map from the incoming state
                if n_al:
                    A = self._transition(aligned)
                    Bz = self._cat_state(self._op(aligned, None, True)[1])
                else:
                    A = torch.eye(m, dtype=self.sdt, device=self.device).expand(b, h, m, m)
            else:  # the document starts here: a constant (A = 0)
                Bz = self._cat_state(self._op(aligned, self.init, True)[1] if n_al else self._full_state(self.init, b))
        # 3. one all-gather of every rank's (A, B); fold the prefix in fp32
        sizes = (A.numel(), Bz.numel())
        gathered = chain.all_gather(torch.cat([A.reshape(-1), Bz.reshape(-1)]))
        state_in = None
        if first.continues_in:
            z = torch.zeros(b, h, dv, m, dtype=self.sdt, device=self.device)
            for j in range(grp.rank):
                a_j = gathered[j, : sizes[0]].view(b, h, m, m)
                b_j = gathered[j, sizes[0]:].view(b, h, dv, m)
                z = z @ a_j + b_j
            state_in = {key: z[..., i * dk:(i + 1) * dk] for i, key in enumerate(self.keys)}
        # 4. the slice from the true incoming state
        y, _ = self._run_local(tok, state_in, tail_in, split_out=False)
        return chain.attach(y)
