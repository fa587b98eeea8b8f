"""Chunk-parallel form of the Miras memory: the semantics of ``recurrent`` at the same chunk
size, with every token of a chunk handled by a few batched matmuls.

Inside a chunk (tokens t0 < t <= t0 + C, state X0 = X_{t0} and S0 = S_{t0} before it) the
inner gradients are all taken at the frozen weights W0 = materialize(X0) -- with
``step_at="retained"`` at materialize(gamma_i X0), gamma_i the in-chunk product of alpha
(``rules.retained_weights``: a per-token multiple of X0 for decay/lq, per-token softmax blocks
for kl) -- so each is an outer product g_i = a_i b_iᵀ known up front (``rules.grad_factors``).
``chunk_rule="exact"`` (the delta rule) is routed to ``delta_exact``. The free variable is then affine
in those outer products (the functions of this algebra are in ``miras_kernels.chunk_step``):

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

import torch

from ..chunk_step import apply_affine, chunk_coefficients, end_momentum, end_state
from ..inputs import State, prepare_inputs, run_documents
from .per_token_scan import ChunkScanInputs, lq_scales, softmax_reads
from ..rules import grad_factors, read_memory, retained_weights
from .delta_exact import delta_exact_core
from ..spec import MirasSpec


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
    if spec.retention_chunking == "boundary":
        # the paper's chunk semantics for lq / kl live in their own module (kernels/pytorch/boundary.py)
        from .boundary import boundary_chunked_core
        return boundary_chunked_core(spec, chunk_size, q, k, v, alpha, eta, delta, mu, state)
    if spec.chunk_rule == "exact":
        # the delta rule's exact chunk form (WY / UT transform) lives in its own module
        return delta_exact_core(spec, chunk_size, q, k, v, alpha, eta, state)
    T = q.shape[2]
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    retained = spec.steps_on_retained
    # W = X exactly for these retentions, so reads need no per-token materialisation.
    affine = spec.weights_are_state
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
        co = chunk_coefficients(lac, etac, lmuc, masks[c])
        if retained:  # token i's gradient at materialize(gamma_i * X0), gamma_i = cX_i
            weights, scale = retained_weights(spec, X, co.cX)
            factors = grad_factors(spec, weights, kc, vc, dc, scale)
        else:
            factors = grad_factors(spec, {n: spec.materialize(X[n]) for n in names}, kc, vc, dc)
        if affine:
            ys.append(read_memory(
                spec, lambda n, x: apply_affine(x, X[n], S.get(n), co, *factors[n]), qc
            ))
        else:
            for n in names:
                starts[n].append(X[n])
                if momentum:
                    mstarts[n].append(S[n])
                fac[n].append(factors[n])
            if spec.retention == "lq":
                chunks.append((qc, dict(X), dict(S), co, factors))
        newX = {n: end_state(X[n], S.get(n), co, *factors[n]) for n in names}
        if momentum:
            S = {n: end_momentum(S[n], co, *factors[n]) for n in names}
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
                    lambda n, x: scales[n][i].unsqueeze(-1) * apply_affine(x, X0[n], S0.get(n), co, *factors[n]),
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
