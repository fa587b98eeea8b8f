"""Chunk-parallel form of the Miras memory: the semantics of ``recurrent`` at the same chunk
size, with every token of a chunk handled by a few batched matmuls.

Inside a chunk (tokens t0 < t <= t0 + C, state X0 = X_{t0} and S0 = S_{t0} before it) the
inner gradients are all taken at the frozen weights W0 = materialize(X0), so each is an outer
product g_i = a_i b_iᵀ known up front (``rules.grad_factors``). The free variable is then affine
in those outer products:

    X_t = cX_t * X0 + cS_t * S0 - sum_{i <= t} G_ti * a_i b_iᵀ

with, in log space (L = cumsum log alpha, Mu = cumsum log mu, both restarted at the chunk
start; D_ts = exp(L_t - L_s) and E_si = exp(Mu_s - Mu_i), masked to i <= s <= t):

    gd:        G = D * eta_i,            cX_t = exp(L_t),  cS = 0
    momentum:  G = (D @ E) * eta_i,      cX_t = exp(L_t),  cS_t = sum_s D_ts exp(Mu_s)
               S_end = exp(Mu_end) S0 - sum_i E_end,i eta_i a_i b_iᵀ

A per-channel alpha (linear memory) gives D, G, cX, cS an extra trailing key-channel dim.

Reads: for retentions whose materialize is the identity (``none``, ``decay``) W_t x_t is the
GLA-like masked product ``cX_t W0 x_t + cS_t S0 x_t - ((x bᵀ) * G) a``, applied layer by layer
for the MLP memory. ``lq`` weights are ``X_t * s_t`` with one scalar ``s_t`` per token and
matrix, so reads are the affine product times ``s_t``; only the q-norms need X_t itself. ``kl``
weights ``c * softmax(X_t)`` are read per token. For both, the chunk loop only records the
chunk-start states and gradient factors (the chunk-end state is affine, so the loop needs no
per-token block); afterwards ``per_token_scan`` runs the in-chunk recurrences of groups of
chunks in lock-step (C Python steps per group) inside a custom autograd Function with an
analytic reverse scan, so memory stays O(T * D) plus the per-chunk states and one group's transient blocks. The
loop over chunks is sequential Python; everything inside a chunk is batched over B and H.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..inputs import State, prepare_inputs, run_documents
from .per_token_scan import ChunkScanInputs, lq_scales, softmax_reads
from ..rules import grad_factors, read_memory
from ..spec import MirasSpec


@dataclass
class _Coefs:
    """Coefficients of one chunk (see module docstring). Shapes with c = chunk length and K the
    optional per-channel dim: G [B, H, c, c(, K)], cX [B, H, c(, K)] or None (= 1), cS like cX
    or None (no momentum), sG [B, H, c] and sX [B, H] (momentum state at chunk end)."""

    channel: bool
    G: torch.Tensor
    cX: torch.Tensor | None
    cS: torch.Tensor | None
    sG: torch.Tensor | None
    sX: torch.Tensor | None


def _masked_decay(L: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_i) for i <= t, else 0; L: [B, H, c] -> [B, H, c, c] or [B, H, c, K] ->
    [B, H, c, c, K]. The mask is applied before exp so no entry can overflow."""
    if L.dim() == 4:
        diff = L.unsqueeze(3) - L.unsqueeze(2)
        return torch.exp(torch.where(mask.unsqueeze(-1), diff, float("-inf")))
    diff = L.unsqueeze(-1) - L.unsqueeze(-2)
    return torch.exp(torch.where(mask, diff, float("-inf")))


def _coefficients(
    la: torch.Tensor | None, eta: torch.Tensor, lmu: torch.Tensor | None, mask: torch.Tensor
) -> _Coefs:
    channel = la is not None and la.dim() == 4
    if la is None:  # retention 'none': alpha = 1
        D = mask.to(eta.dtype)
        cX = None
    else:
        L = la.cumsum(dim=2)
        D = _masked_decay(L, mask)
        cX = torch.exp(L)
    eta_i = eta[:, :, None, :, None] if channel else eta[:, :, None, :]
    if lmu is None:
        return _Coefs(channel, D * eta_i, cX, None, None, None)
    Mu = lmu.cumsum(dim=2)
    E = _masked_decay(Mu, mask)
    eM = torch.exp(Mu)
    if channel:
        G = torch.einsum("bhtsk,bhsi->bhtik", D, E)
        cS = torch.einsum("bhtsk,bhs->bhtk", D, eM)
    else:
        G = D @ E
        cS = (D @ eM.unsqueeze(-1)).squeeze(-1)
    return _Coefs(channel, G * eta_i, cX, cS, E[..., -1, :] * eta, eM[..., -1])


def _apply_affine(x: torch.Tensor, X0: torch.Tensor, S0: torch.Tensor | None, co: _Coefs,
                  a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W_t x_t for every token of the chunk when W = X: x [B, H, c, cols] -> [B, H, c, rows]."""
    if co.channel:
        out = (x * co.cX) @ X0.transpose(-1, -2)
        if S0 is not None:
            out = out + (x * co.cS) @ S0.transpose(-1, -2)
        scores = torch.einsum("bhtik,bhik,bhtk->bhti", co.G, b, x)
        return out - scores @ a
    out = x @ X0.transpose(-1, -2)
    if co.cX is not None:
        out = out * co.cX.unsqueeze(-1)
    if S0 is not None:
        out = out + co.cS.unsqueeze(-1) * (x @ S0.transpose(-1, -2))
    return out - ((x @ b.transpose(-1, -2)) * co.G) @ a


def _state_end(X0: torch.Tensor, S0: torch.Tensor | None, co: _Coefs, a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    """X at the last token of the chunk: [B, H, rows, cols]."""
    if co.channel:
        out = X0 * co.cX[:, :, -1, None, :]
        if S0 is not None:
            out = out + S0 * co.cS[:, :, -1, None, :]
        return out - a.transpose(-1, -2) @ (co.G[:, :, -1] * b)
    out = X0 if co.cX is None else X0 * co.cX[:, :, -1, None, None]
    if S0 is not None:
        out = out + S0 * co.cS[:, :, -1, None, None]
    return out - (a * co.G[:, :, -1, :, None]).transpose(-1, -2) @ b


def _momentum_end(S0: torch.Tensor, co: _Coefs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return S0 * co.sX[:, :, None, None] - (a * co.sG.unsqueeze(-1)).transpose(-1, -2) @ b


def chunked_core(
    spec: MirasSpec,
    chunk_size: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    delta: torch.Tensor | None,
    mu: torch.Tensor | None,
    state: State,
) -> tuple[torch.Tensor, State]:
    """Chunk loop over one dense batch (head-major, see ``inputs.Core``)."""
    T = q.shape[2]
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    # W = X exactly for these retentions, so reads need no per-token materialisation.
    affine = spec.retention in ("none", "decay") or (spec.retention == "lq" and spec.q == 2.0)
    la = None if alpha is None else torch.log(alpha)
    lmu = torch.log(mu) if momentum else None
    X = {n: state[n] for n in names}
    S = {n: state["S_" + n] for n in names} if momentum else {}
    masks: dict[int, torch.Tensor] = {}
    ys = []
    n_chunks = -(-T // chunk_size)

    def split(t: torch.Tensor | None) -> list:
        # split (not slicing in the loop): its backward is one concatenation, whereas every
        # slice's backward would allocate and fill a full [B, H, T, ...] gradient
        return [None] * n_chunks if t is None else list(t.split(chunk_size, dim=2))

    pieces = zip(*(split(t) for t in (q, k, v, delta, la, eta, lmu)))
    # lq / kl: what the per-token scan needs, gathered over the chunk loop (see per_token_scan)
    starts: dict[str, list] = {n: [] for n in names}
    mstarts: dict[str, list] = {n: [] for n in names}
    fac: dict[str, list] = {n: [] for n in names}
    chunks = []
    for qc, kc, vc, dc, lac, etac, lmuc in pieces:
        c = qc.shape[2]
        if c not in masks:
            masks[c] = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        frozen = {n: spec.materialize(X[n]) for n in names}
        factors = grad_factors(spec, frozen, kc, vc, dc)
        co = _coefficients(lac, etac, lmuc, masks[c])
        if affine:
            ys.append(read_memory(
                spec, lambda n, x: _apply_affine(x, X[n], S.get(n), co, *factors[n]), qc
            ))
        else:
            for n in names:
                starts[n].append(X[n])
                if momentum:
                    mstarts[n].append(S[n])
                fac[n].append(factors[n])
            if spec.retention == "lq":
                chunks.append((qc, dict(X), dict(S), co, factors))
        newX = {n: _state_end(X[n], S.get(n), co, *factors[n]) for n in names}
        if momentum:
            S = {n: _momentum_end(S[n], co, *factors[n]) for n in names}
        X = newX
    if not affine and T > 0:
        scan = {
            n: ChunkScanInputs(
                X0=torch.stack(starts[n], dim=2),
                S0=torch.stack(mstarts[n], dim=2) if momentum else None,
                a=torch.cat([f[0] for f in fac[n]], dim=2),
                b=torch.cat([f[1] for f in fac[n]], dim=2),
                eta=eta, alpha=alpha, mu=mu,
            )
            for n in names
        }
        if spec.retention == "kl":
            # Memora: per-token reads c * softmax(X_t) x_t, every chunk at once
            ys.append(read_memory(spec, lambda n, x: softmax_reads(spec, scan[n], x, chunk_size), q))
        else:
            # lq: W_t = X_t * s_t with a scalar s_t per token, so W_t x = s_t * (X_t x) reuses the
            # affine read; only the scales need the per-token X_t (computed for every chunk at once)
            scales = {n: lq_scales(spec, scan[n], chunk_size).split(chunk_size, dim=2) for n in names}
            for i, (qc, X0, S0, co, factors) in enumerate(chunks):
                ys.append(read_memory(
                    spec,
                    lambda n, x: scales[n][i].unsqueeze(-1) * _apply_affine(x, X0[n], S0.get(n), co, *factors[n]),
                    qc,
                ))
    y = torch.cat(ys, dim=2) if ys else v.new_zeros(v.shape)
    final = dict(X)
    final.update({"S_" + n: t for n, t in S.items()})
    return y, final


def miras_memory_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    *,
    spec: MirasSpec,
    chunk_size: int = 64,
    delta: torch.Tensor | None = None,
    mu: torch.Tensor | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunk-parallel backend; same arguments and returns as :func:`miras_kernels.miras_memory`."""
    inp = prepare_inputs(
        q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    return run_documents(inp, chunked_core)
