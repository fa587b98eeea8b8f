"""Per-token weights inside chunks for the non-affine retentions (``lq``, ``kl``), every chunk at
once, with a hand-written backward.

Why this module exists: for ``lq`` (Moneta) and ``kl`` (Memora) the weights of token t are a
nonlinear function of the free variable X_t (``X_t * s(X_t)`` resp. ``c * softmax(X_t)``), so
each token needs its own ``[r, c]`` block X_t (``chunked.py`` handles everything else with
chunk-level matmuls). Within a chunk starting at X0 (and momentum S0) the blocks follow

    gd:        X_j = alpha_j * X_{j-1} + u_j b_jᵀ
    momentum:  S_j = mu_j * S_{j-1} + u_j b_jᵀ ;   X_j = alpha_j * X_{j-1} + S_j

with ``u_j = -eta_j a_j`` and ``(a_j, b_j)`` the inner-gradient factors at the chunk-start
weights (``rules.grad_factors``), all known once the chunk-level recurrence has run. Hence:

* the chunks' in-chunk scans run in lock-step: step j advances token j of every chunk of a
  group (``[n, M, r, c]`` per op, M = B * H), so there are C Python steps per group of n
  chunks, T / n in all instead of T; ``GROUP_ELEMENTS`` sizes the groups (~1 MiB blocks);
* a custom ``torch.autograd.Function`` replaces autograd through the scan. Its forward keeps
  only the running X (and S) of a group, in place, and returns the per-token outputs (the l_q
  scale ``s_t``, or Memora's read ``c * softmax(X_t) x_t``). Its backward recomputes the
  blocks segment by segment from checkpoints (transient, ~C / seg + seg blocks per group) and
  runs the reverse scan with adjoints ``Lam_j = dL/dX_j`` and ``Sig_j = dL/dS_j``:

      Lam_j = alpha_{j+1} * Lam_{j+1} + Gam_j          (Gam_j: the direct dL/dX_j of token j)
      Sig_j = mu_{j+1} * Sig_{j+1} + Lam_j              (momentum; else Sig = Lam)
      du_j = Sig_j b_j,  db_j = Sig_jᵀ u_j,  dalpha_j = <Lam_j, X_{j-1}>,  dmu_j = <Sig_j, S_{j-1}>
      dX0 = alpha_0 * Lam_0,  dS0 = mu_0 * Sig_0

  No division by decay products anywhere (alpha may be ~0). Memory: the chunk-start states and
  the O(T * D) factors the caller holds anyway, O(T * D) per-token numbers, plus one group's
  transient blocks. Every step is a handful of in-place / ``out=`` torch ops on cache-sized
  blocks (measured on the 2-core CPU: ~8 us per simple op on 64K fp32 elements).

Layout inside this module is chunk-step-major: ``[C, N, M, ...]`` (step j of every chunk is one
contiguous block); :class:`ChunkLayout` converts from the backends' head-major ``[B, H, T, ...]``.
The semantics are exactly ``recurrent.py``'s (the tests compare forward and every gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..spec import MirasSpec

# Target size (elements) of one op's block in the scan (a group of chunks is processed together).
# Measured on the 2-core CPU (d = 64 MLP weights, 4 heads, i.e. 64K entries per chunk and
# weight): 256K-entry blocks (1 MiB fp32) were ~15 % faster than 64K ones (per-op Python and
# dispatcher overhead, ~3 us, amortised) and no slower than 128K ones.
GROUP_ELEMENTS = 1 << 18
# Target size (elements) of the backward's segment of recomputed blocks (see
# _PerTokenScan.backward); with the default groups this gives 3-step segments.
SEGMENT_ELEMENTS = 1 << 20
# Memora's fast groups (see _SoftmaxRead): exp2 without the row-max shift when every logit (in
# log2 units) provably lies in [-EXP2_RANGE, EXP2_RANGE]; 2^+-64 and sums of up to 2^60 of them
# stay normal fp32 numbers. Measured 5-9 % off Memora's chunked forward + backward (T 2048,
# D 64, one thread, 8 interleaved runs each; the safe path is unchanged).
EXP2_RANGE = 64.0


def _segment_length(C: int, block: int) -> int:
    """Steps per recomputed segment in the backward. Cache-sized when blocks are small; else
    ~sqrt(C), which minimises the transient memory (C / seg checkpoints + seg blocks)."""
    seg = SEGMENT_ELEMENTS // max(block, 1) - 1
    if seg < 2:
        seg = math.isqrt(C)
    return min(max(seg, 1), C)


@dataclass(frozen=True)
class ChunkLayout:
    """Conversion between head-major tensors ``[B, H, T, ...]`` and the scan layout
    ``[C, N, B * H, ...]`` (token j of chunk n at ``[j, n]``), the last chunk padded to C."""

    B: int
    H: int
    T: int
    C: int

    @property
    def N(self) -> int:
        return -(-self.T // self.C)

    def to_scan(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[B, H, T, *rest]`` -> contiguous ``[C, N, B*H, *rest]``; padding tokens get ``fill``
        (a neutral value: alpha = mu = 1 and u = b = x = 0 leave X unchanged, and their outputs
        are dropped by :meth:`from_scan`)."""
        rest = t.shape[3:]
        pad = self.N * self.C - self.T
        if pad:
            t = torch.cat([t, t.new_full((self.B, self.H, pad, *rest), fill)], dim=2)
        t = t.reshape(self.B * self.H, self.N, self.C, *rest)
        return t.movedim(2, 0).movedim(2, 1).contiguous()

    def from_scan(self, t: torch.Tensor) -> torch.Tensor:
        """``[C, N, B*H, *rest]`` -> ``[B, H, T, *rest]``."""
        rest = t.shape[3:]
        t = t.movedim(0, 2).movedim(0, 1)  # [M, N, C, *rest]
        return t.reshape(self.B, self.H, self.N * self.C, *rest)[:, :, : self.T]

    def states_to_scan(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk-start states ``[B, H, N, r, c]`` -> contiguous ``[N, B*H, r, c]``."""
        return x.flatten(0, 1).movedim(1, 0).contiguous()


# ----- the in-chunk recurrence (in place, no autograd) ------------------------------------------
#
# Inside the Function every group of n chunks is handled as m = n * M independent blocks:
# states [m, r, c] and per-step tensors stored step-major, ``[C, m, 1, k]`` (row vectors), so
# that step j is one contiguous slice and every per-token product is a batched matmul in the
# "row vector times matrix" form (``bmm([m, 1, r], [m, r, c])``, or with a transposed view of
# the matrix): the "matrix times column vector" form runs through a ~8x slower gemv path on CPU.


class _Group:
    """One group's inputs in the step-major layout (see the comment above), as per-step lists of
    views (one ``unbind`` per tensor instead of ~10 indexing ops per step). X0 / S0 ``[m, r, c]``;
    per step j: u_row ``[m, 1, r]`` and its column view, b_row ``[m, 1, c]``, alpha ``[m, 1, 1]``
    or ``[m, 1, c]`` (per key channel), mu ``[m, 1, 1]``, x_row ``[m, 1, c]``."""

    def __init__(self, sl: slice, X0, S0, u, b, alpha, mu, x) -> None:
        C = u.shape[0]
        r, c = X0.shape[-2:]

        def group(t, k):  # [C, N, M(, k)] -> [C, m, 1, k] (copies only the group's slice)
            return None if t is None else t[:, sl].reshape(C, -1, 1, k)

        def steps(t):  # -> C views [m, 1, k]
            return None if t is None else t.unbind(0)

        self.sl = sl
        self.C = C
        self.X0 = X0[sl].reshape(-1, r, c)
        self.S0 = None if S0 is None else S0[sl].reshape(-1, r, c)
        self.m = self.X0.shape[0]
        self.u_all, self.b_all = group(u, r), group(b, c)
        self.alpha_all = None if alpha is None else group(alpha, c if alpha.dim() == 4 else 1)
        self.mu_all = group(mu, 1)
        self.u_row, self.b_row = steps(self.u_all), steps(self.b_all)
        self.u_col = [t.transpose(1, 2) for t in self.u_row]
        self.alpha = steps(self.alpha_all)
        self.mu = steps(self.mu_all)
        xs = group(x, c)
        self.x_row = steps(xs)
        # kl: rows (x_jᵀ, 1ᵀ), so one bmm gives both the numerator and the softmax denominator
        self.x1_row = None
        if x is not None:
            self.x1_row = torch.cat([xs, torch.ones_like(xs)], dim=2).unbind(0)

    def abs_bound(self) -> float:
        """An upper bound of ``|X_j|`` over every entry, step and block of the group. Entrywise,
        by the triangle inequality on the recurrence with every gate replaced by ``max(1, gate)``:
        gd ``|X_j| <= a^C (|X0| + sum_i |u_i| |b_i|ᵀ)``; momentum ``|S_j| <= m^C (|S0| + sum_i
        |u_i| |b_i|ᵀ)`` and ``|X_j| <= a^C (|X0| + C max|S|)`` (``a``, ``m`` the largest alpha,
        mu). A few block passes per group (not per step) and one host sync; NaN inputs give NaN,
        which compares false (the safe path)."""
        ua = self.u_all.squeeze(2).abs().permute(1, 2, 0)  # [m, r, C]
        ba = self.b_all.squeeze(2).abs().transpose(0, 1)  # [m, C, c]
        steps = torch.baddbmm(self.X0.abs() if self.S0 is None else self.S0.abs(), ua, ba)
        bound = steps.amax(dim=(-2, -1))  # [m]
        if self.S0 is not None:
            bound = self.mu_all.max().clamp_min(1.0).pow(self.C) * bound
            bound = self.X0.abs().amax(dim=(-2, -1)) + self.C * bound
        if self.alpha_all is not None:
            bound = self.alpha_all.max().clamp_min(1.0).pow(self.C) * bound
        return float(bound.max())

    def advance(self, j: int, X_prev, S_prev, X_out, S_out) -> None:
        """Token j of every block: X_out = X_j (and S_out = S_j); X_out may be X_prev (in place).
        The rank-1 update u_j b_jᵀ is fused into addcmul_ by broadcasting, never materialised."""
        if S_prev is not None:
            torch.mul(S_prev, self.mu[j], out=S_out)
            S_out.addcmul_(self.u_col[j], self.b_row[j])
        if self.alpha is not None:
            torch.mul(X_prev, self.alpha[j], out=X_out)
        elif X_out is not X_prev:
            X_out.copy_(X_prev)
        if S_prev is not None:
            X_out.add_(S_out)
        else:
            X_out.addcmul_(self.u_col[j], self.b_row[j])


def _dot_into(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """<x, y> per block, [m, r, c] x2 -> out [m, 1, 1] (a row-times-column bmm: the fastest
    batched dot on CPU, ~1.5x faster than ``linalg.vecdot``)."""
    m = x.shape[0]
    return torch.bmm(x.reshape(m, 1, -1), y.reshape(m, 1, -1).transpose(1, 2), out=out)


# ----- per-token outputs -------------------------------------------------------------------------

class _LqNorm:
    """Moneta: output ``s_t = (||X_t||_q + eps)^(2-q)`` per token and matrix (``spec.lq_scale``:
    same function, same gradient convention at X = 0). The scan stores one number per token
    (``sum X^4`` for q = 4, else the norm); everything scalar is done for all tokens at once."""

    def __init__(self, spec: MirasSpec) -> None:
        self.q = float(spec.q)
        self.eps = float(spec.lq_eps)

    def fast_group(self, g: _Group) -> bool:
        """No range-dependent fast path for the norms."""
        return False

    def buffers(self, C: int, m: int, r: int, like: torch.Tensor, fast: bool) -> tuple[torch.Tensor, ...]:
        """Per-token numbers of one group, step-major."""
        return (like.new_empty((C, m, 1, 1)),)

    def group_data(self, data: tuple, sl: slice, C: int, m: int, fast: bool) -> tuple:
        """The backward's per-token data of one group, as per-step views."""
        return tuple(t[:, sl].reshape(C, m, *t.shape[3:]).unbind(0) for t in data)

    def token(self, X, tmp, g: _Group, j: int, bufs, fast: bool) -> None:
        out_j = bufs[0][j]
        if self.q == 4.0:
            torch.mul(X, X, out=tmp)
            _dot_into(tmp, tmp, out_j)  # sum X^4
        else:
            out_j.copy_(torch.linalg.vector_norm(X, ord=self.q, dim=(-2, -1)).view(-1, 1, 1))

    def _norm(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(||X||_q, and for q = 4 n2 = ||X*X||_2) from the stored per-token numbers."""
        if self.q != 4.0:
            return raw, None
        # ||X||_4 = sqrt(||X*X||_2), clamped like spec.lq_scale (finite gradient at X = 0)
        n2 = raw.sqrt()
        return n2.clamp_min(torch.finfo(n2.dtype).tiny).sqrt(), n2

    def finish(self, raw: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[C, N, M, 1, 1] per-token numbers -> (scales [C, N, M], saved for backward)."""
        return (self._norm(raw)[0] + self.eps).pow(2.0 - self.q).flatten(2), (raw,)

    def backward_data(self, dout: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gam_t = coef_t * X_t |X_t|^(q-2) with coef = ds * ds/dnorm / norm^(q-1) (for q = 4
        norm = sqrt(n2): dnorm/dX = X^3 / (norm * n2)); 0 where the norm (q = 4: n2 below the
        clamp) is 0, torch's subgradient there as in ``spec.lq_scale``. [C, N, M, 1, 1]."""
        q = self.q
        norm, n2 = self._norm(raw)
        dnorm = dout.view(raw.shape) * (2.0 - q) * (norm + self.eps).pow(1.0 - q)
        if q == 4.0:
            live = n2 >= torch.finfo(n2.dtype).tiny
            return (torch.where(live, dnorm / torch.where(live, norm * n2, 1.0), 0.0),)
        live = norm > 0
        return (torch.where(live, dnorm / torch.where(live, norm, 1.0).pow(q - 1.0), 0.0),)

    def accumulate(self, Lam, X, tmp, tmp2, j: int, gd: tuple, dx_j) -> None:
        """Lam += coef_j * X |X|^(q-2)."""
        coef_j = gd[0][j]
        if self.q == 4.0:
            torch.mul(X, coef_j, out=tmp).mul_(X)
        else:
            torch.abs(X, out=tmp).pow_(self.q - 2.0).mul_(coef_j)
        Lam.addcmul_(tmp, X)


_LOG2E = 1.4426950408889634  # exp(z) = exp2(z * log2(e)); exp2 is ~2.5x faster than exp on CPU


class _SoftmaxRead:
    """Memora: output ``y_t = c * softmax(X_t) x_t`` (softmax over the input dim c).

    The scan runs on ``Xl = X * log2(e)`` (the caller scales X0 and u: the recurrence is linear),
    so ``softmax(X) = softmax2(Xl)`` with ``exp2``, ~2.5x faster than ``exp`` here. Per token:
    E = exp2(Xl - rowmax) (the softmax numerator, overflow-safe), then ONE bmm with the rows
    (xᵀ, 1ᵀ) gives E x and the row sums Z = E 1, so y = c (E x) / Z. The per-row shift
    ``rowmax + log2 Z`` (log2 of the softmax denominator) is saved per token, so the backward
    rebuilds P = exp2(Xl - shift) in two ops, without reductions.

    Fast groups: the softmax is shift-invariant, so the row maximum is only needed against
    overflow. When a group's entries provably stay within ``|Xl| <= EXP2_RANGE``
    (:meth:`_Group.abs_bound`, one check per group) the forward takes E = exp2(Xl) itself (no
    amax, no subtraction: two of the step's six block passes) and saves ``shift = log2 Z``; the
    backward then uses E = exp2(Xl) too and folds ``P = diag(2^-shift) E`` into its two per-row
    operands (c dy and the rank-2 factor). Same function, rounding-level differences only; every
    value stays a normal float (2^-64 <= E <= 2^64), so no overflow and no denormals."""

    def __init__(self, c: float) -> None:
        self.c = float(c)

    def fast_group(self, g: _Group) -> bool:
        """True when every entry of the group's blocks stays within +-EXP2_RANGE (log2 units)."""
        return g.abs_bound() <= EXP2_RANGE

    def buffers(self, C: int, m: int, r: int, like: torch.Tensor, fast: bool) -> tuple[torch.Tensor, ...]:
        """(E x, Z) rows ``[C, m, 2, r]`` and the row shifts ``[C, m, r, 1]`` of one group (the row
        maxima; zero in a fast group)."""
        return like.new_empty((C, m, 2, r)), (like.new_zeros if fast else like.new_empty)((C, m, r, 1))

    def token(self, X, tmp, g: _Group, j: int, bufs, fast: bool) -> None:
        nz, mx = bufs
        if fast:
            torch.exp2(X, out=tmp)
        else:
            top = torch.amax(X, dim=-1, keepdim=True, out=mx[j])
            torch.sub(X, top, out=tmp).exp2_()
        torch.bmm(g.x1_row[j], tmp.transpose(1, 2), out=nz[j])  # (E [x, 1])ᵀ

    def finish(self, nz: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[C, N, M, 2, r] and [C, N, M, r, 1] -> (y [C, N, M, r], saved (y, shift))."""
        num, Z = nz.unbind(-2)
        y = num.div(Z).mul_(self.c)
        return y, (y, torch.log2(Z).add_(mx.squeeze(-1)))

    def backward_data(self, dout: torch.Tensor, y: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per token: the rank-2 factor columns ``[C, N, M, r, 2]`` of dL/dXl (see accumulate),
        (c dy)ᵀ rows ``[C, N, M, 1, r]`` and the shifts ``[C, N, M, r, 1]``."""
        cdy = dout * self.c
        A2 = torch.stack([cdy, -(dout * y)], dim=-1).mul_(1.0 / _LOG2E)  # d/dXl = d/dX / log2(e)
        return A2, cdy.unsqueeze(-2), shift.unsqueeze(-1)

    def group_data(self, data: tuple, sl: slice, C: int, m: int, fast: bool) -> tuple:
        """The backward's per-token data of one group, as per-step views: (A2, (c dy)ᵀ, shift);
        in a fast group the row scales 2^-shift are folded into A2 and (c dy)ᵀ and shift is None."""
        A2, cdy_row, shift = (t[:, sl].reshape(C, m, *t.shape[3:]) for t in data)
        if not fast:
            return A2.unbind(0), cdy_row.unbind(0), shift.unbind(0)
        inv = torch.exp2(-shift)  # [C, m, r, 1]; shift is within about +-(EXP2_RANGE + log2 c)
        return (A2 * inv).unbind(0), (cdy_row * inv.transpose(-1, -2)).unbind(0), None

    def accumulate(self, Lam, X, tmp, tmp2, j: int, gd: tuple, dx_j) -> None:
        """Lam += dL/dXl_j of the read and dx_j = c Pᵀ dy. With P = softmax(X_j), row by row
        (softmax backward): dL/dX = P * (c dy_r x_k - dy_r y_r), i.e. P times the rank-2 matrix
        [c dy, -w] @ [xᵀ; 1ᵀ] (one k=2 bmm with the forward's (xᵀ, 1ᵀ) rows). In a fast group
        P = diag(2^-shift) exp2(X_j), the diagonal already folded into A2 and c dy."""
        A2, cdy_row = gd[0][j], gd[1][j]
        if gd[2] is None:
            P = torch.exp2(X, out=tmp)
        else:
            P = torch.sub(X, gd[2][j], out=tmp).exp2_()
        torch.bmm(cdy_row, P, out=dx_j)
        Lam.addcmul_(P, torch.bmm(A2, gd[3][j], out=tmp2))


# ----- the autograd Function ---------------------------------------------------------------------

def _groups(N: int, block: int, group_elements: int) -> list[slice]:
    n = max(1, group_elements // max(block, 1))
    return [slice(g, min(g + n, N)) for g in range(0, N, n)]


class _PerTokenScan(torch.autograd.Function):
    """Inputs in scan layout (see module docstring): X0, S0 ``[N, M, r, c]`` (S0 None without
    momentum), u ``[C, N, M, r]``, b ``[C, N, M, c]``, alpha ``[C, N, M]`` / ``[C, N, M, c]`` /
    None, mu ``[C, N, M]`` / None, x ``[C, N, M, c]`` (read input, ``kl`` only, else None).
    Output: lq ``[C, N, M]`` scales; kl ``[C, N, M, r]`` reads."""

    @staticmethod
    def forward(ctx, op, group_elements, X0, S0, u, b, alpha, mu, x):
        C, N, M = u.shape[:3]
        r = X0.shape[-2]
        groups = _groups(N, X0[0].numel(), group_elements)
        full = None  # the op's per-token buffers for all chunks, [C, N, M, ...]
        work = X0.new_empty((2, (groups[0].stop - groups[0].start) * M, *X0.shape[2:]))  # X, tmp
        Swork = None if S0 is None else torch.empty_like(work[0])
        fast = []  # per group: op.fast_group (the backward takes the same path)
        for sl in groups:
            g = _Group(sl, X0, S0, u, b, alpha, mu, x)
            n = sl.stop - sl.start
            fast.append(op.fast_group(g))
            X, tmp = (w[: g.m] for w in work)
            X.copy_(g.X0)
            S = None if S0 is None else Swork[: g.m].copy_(g.S0)
            bufs = op.buffers(C, g.m, r, X0, fast[-1])
            steps = [t.unbind(0) for t in bufs]
            for j in range(C):
                g.advance(j, X, S, X, S)
                op.token(X, tmp, g, j, steps, fast[-1])
            if full is None:
                full = [t.new_empty((C, N, M, *t.shape[2:])) for t in bufs]
            for dst, src in zip(full, bufs):
                dst[:, sl] = src.view(C, n, M, *src.shape[2:])
        out, saved = op.finish(*full)
        ctx.op, ctx.group_elements, ctx.fast = op, group_elements, fast
        ctx.save_for_backward(X0, S0, u, b, alpha, mu, x, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        X0, S0, u, b, alpha, mu, x, *saved = ctx.saved_tensors
        op = ctx.op
        C, N, M = u.shape[:3]
        r, c = X0.shape[-2:]
        need = ctx.needs_input_grad
        dX0 = torch.empty_like(X0)
        dS0 = None if S0 is None else torch.empty_like(S0)
        du, db = torch.empty_like(u), torch.empty_like(b)
        dalpha = None if alpha is None else torch.empty_like(alpha)
        dmu = None if mu is None else torch.empty_like(mu)
        dx = None if x is None else torch.empty_like(x)
        data = op.backward_data(dout.contiguous(), *saved)  # per-token tensors [C, N, M, ...]
        groups = _groups(N, X0[0].numel(), ctx.group_elements)
        mmax = (groups[0].stop - groups[0].start) * M
        # Recompute X_j in segments of `seg` steps, newest first: one forward sweep stores the
        # state before every segment (ckpt), then each segment is re-run into a small buffer
        # just before its reverse steps. Storing all C blocks instead streams a C-block buffer
        # through memory (measured no faster); this keeps the working set (segment + adjoints)
        # cache-sized and the transient memory at C / seg + seg blocks per group.
        seg = _segment_length(C, mmax * r * c)
        K = -(-C // seg)
        # buffers sized for the largest group, allocated once: fresh multi-MiB allocations per
        # group would be new mmaps, page-faulted (zeroed by the kernel) on every first touch
        ck_buf = X0.new_empty((K, mmax, r, c))
        seg_buf = X0.new_empty((seg, mmax, r, c))
        cs_buf = None if S0 is None else torch.empty_like(ck_buf)
        ss_buf = None if S0 is None else torch.empty_like(seg_buf)
        work = X0.new_empty((4, mmax, r, c))  # Lam, Sig, tmp, tmp2
        for sl, fast in zip(groups, ctx.fast):
            g = _Group(sl, X0, S0, u, b, alpha, mu, x)
            m, n = g.m, sl.stop - sl.start
            ck = ck_buf[:, :m].unbind(0)
            cs = None if S0 is None else cs_buf[:, :m].unbind(0)
            X, Sig, tmp, tmp2 = (w[:m] for w in work)  # X: sweep state, reused as Lam below
            S = None if S0 is None else Sig
            X.copy_(g.X0)
            if S is not None:
                S.copy_(g.S0)
            for j in range((K - 1) * seg):
                if j % seg == 0:
                    ck[j // seg].copy_(X)
                    if S is not None:
                        cs[j // seg].copy_(S)
                g.advance(j, X, S, X, S)
            ck[K - 1].copy_(X)
            if S is not None:
                cs[K - 1].copy_(S)
            gd = op.group_data(data, sl, C, m, fast)
            if x is not None:
                gd = gd + (g.x1_row,)
            du_g, db_g = X0.new_empty((C, m, 1, r)), X0.new_empty((C, m, 1, c))
            dal_g = None if alpha is None else X0.new_empty((C, m, 1, c if alpha.dim() == 4 else 1))
            dmu_g = None if mu is None else X0.new_empty((C, m, 1, 1))
            dx_g = None if x is None else X0.new_empty((C, m, 1, c))
            Lam = X.zero_()
            if S0 is None:
                Sig = None
            else:
                Sig.zero_()
            G = Lam if Sig is None else Sig  # dL/d(u_j b_jᵀ)
            GT = G.transpose(1, 2)
            # views made once (not per step): flat rows for the <., .> dots, the next step's gates
            lam_row = Lam.reshape(m, 1, -1)
            sig_row = None if Sig is None else Sig.reshape(m, 1, -1)
            per_head = alpha is not None and alpha.dim() == 3
            decay = [None] * C if alpha is None else [*g.alpha[1:], None]
            mdecay = [None] * C if mu is None else [*g.mu[1:], None]
            dxs = [None] * C if dx_g is None else dx_g.unbind(0)
            du_s, db_s = du_g.unbind(0), db_g.unbind(0)
            dal_s = None if dal_g is None else dal_g.unbind(0)
            dmu_s = None if dmu_g is None else dmu_g.unbind(0)
            for k in range(K - 1, -1, -1):
                j0, j1 = k * seg, min(C, (k + 1) * seg)
                # Xs[i] = X_{j0 + i - 1}: Xs[0] the checkpoint, then the segment's own blocks
                Xs = [ck[k], *seg_buf[: j1 - j0, :m].unbind(0)]
                Ss = None if S0 is None else [cs[k], *ss_buf[: j1 - j0, :m].unbind(0)]
                for j in range(j0, j1):
                    i = j - j0
                    g.advance(j, Xs[i], None if Ss is None else Ss[i], Xs[i + 1], None if Ss is None else Ss[i + 1])
                Xcols = [t.reshape(m, 1, -1).transpose(1, 2) for t in Xs[:-1]] if per_head else None
                Scols = None if Ss is None else [t.reshape(m, 1, -1).transpose(1, 2) for t in Ss[:-1]]
                for j in range(j1 - 1, j0 - 1, -1):
                    i = j - j0
                    if decay[j] is not None:
                        Lam.mul_(decay[j])
                    op.accumulate(Lam, Xs[i + 1], tmp, tmp2, j, gd, dxs[j])
                    if Sig is not None:
                        if mdecay[j] is not None:
                            Sig.mul_(mdecay[j])
                        Sig.add_(Lam)
                    torch.bmm(g.b_row[j], GT, out=du_s[j])  # (G b)ᵀ = bᵀ Gᵀ
                    torch.bmm(g.u_row[j], G, out=db_s[j])
                    if per_head:
                        torch.bmm(lam_row, Xcols[i], out=dal_s[j])  # <Lam_j, X_{j-1}>
                    elif dal_s is not None:  # per key channel: sum over rows
                        torch.sum(torch.mul(Lam, Xs[i], out=tmp), -2, keepdim=True, out=dal_s[j])
                    if Sig is not None:
                        torch.bmm(sig_row, Scols[i], out=dmu_s[j])  # <Sig_j, S_{j-1}>
            dX0[sl] = (Lam if alpha is None else Lam * g.alpha[0]).view(n, M, r, c)
            if dS0 is not None:
                dS0[sl] = (Sig * g.mu[0]).view(n, M, r, c)
            du[:, sl] = du_g.view(C, n, M, r)
            db[:, sl] = db_g.view(C, n, M, c)
            if dalpha is not None:
                dalpha[:, sl] = dal_g.view(dalpha[:, sl].shape)
            if dmu is not None:
                dmu[:, sl] = dmu_g.view(C, n, M)
            if dx is not None:
                dx[:, sl] = dx_g.view(C, n, M, c)
        grads = (dX0, dS0, du, db, dalpha, dmu, dx)
        return (None, None, *(t if ok else None for t, ok in zip(grads, need[2:])))


# ----- public entry points (head-major in, head-major out) --------------------------------------

@dataclass
class ChunkScanInputs:
    """Everything the in-chunk scan needs, head-major as in ``chunked.py``.

    X0, S0: chunk-start free variable / momentum ``[B, H, N, r, c]`` (S0 None without momentum);
    a ``[B, H, T, r]``, b ``[B, H, T, c]``: inner-gradient factors (g_t = a_t b_tᵀ at the
    chunk-start weights); eta ``[B, H, T]``; alpha ``[B, H, T]`` or ``[B, H, T, c]`` (per key
    channel, linear memory) or None (retention ``none``); mu ``[B, H, T]`` or None.
    """

    X0: torch.Tensor
    S0: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    eta: torch.Tensor
    alpha: torch.Tensor | None
    mu: torch.Tensor | None


def _scan(op, inp: ChunkScanInputs, chunk_size: int, x: torch.Tensor | None, group_elements: int | None):
    B, H, T = inp.a.shape[:3]
    lay = ChunkLayout(B, H, T, chunk_size)
    u = -(inp.eta.unsqueeze(-1) * inp.a)  # autograd carries eta and a from here
    out = _PerTokenScan.apply(
        op, GROUP_ELEMENTS if group_elements is None else group_elements,
        lay.states_to_scan(inp.X0), None if inp.S0 is None else lay.states_to_scan(inp.S0),
        lay.to_scan(u), lay.to_scan(inp.b),
        None if inp.alpha is None else lay.to_scan(inp.alpha, 1.0),
        None if inp.mu is None else lay.to_scan(inp.mu, 1.0),
        None if x is None else lay.to_scan(x),
    )
    return lay.from_scan(out)


def lq_scales(spec: MirasSpec, inp: ChunkScanInputs, chunk_size: int,
              group_elements: int | None = None) -> torch.Tensor:
    """Moneta's per-token factor ``s_t = (||X_t||_q + eps)^(2-q)`` (so that the weights are
    ``X_t * s_t``) for every token: ``[B, H, T]``. Differentiable w.r.t. every tensor of ``inp``."""
    return _scan(_LqNorm(spec), inp, chunk_size, None, group_elements)


def softmax_reads(spec: MirasSpec, inp: ChunkScanInputs, x: torch.Tensor, chunk_size: int,
                  group_elements: int | None = None) -> torch.Tensor:
    """Memora's read ``c * softmax(X_t) x_t`` for every token: x ``[B, H, T, c]`` -> ``[B, H, T, r]``.
    Differentiable w.r.t. x and every tensor of ``inp``."""
    # the scan runs in log2 units (see _SoftmaxRead): X0 and u scaled, the recurrence is linear
    scaled = ChunkScanInputs(inp.X0 * _LOG2E, None if inp.S0 is None else inp.S0 * _LOG2E,
                             inp.a * _LOG2E, inp.b, inp.eta, inp.alpha, inp.mu)
    return _scan(_SoftmaxRead(spec.c), scaled, chunk_size, x, group_elements)
