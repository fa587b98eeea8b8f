"""The algebra of one chunk of the chunk-parallel form, and a step of the memory built on it.

Inside a chunk every inner gradient is taken at the weights frozen at the chunk start, so each
gradient is an outer product ``g_i = a_i b_iᵀ`` known up front (``rules.grad_factors``) and the
free variable is affine in them. For tokens ``t`` of a run that starts from the state ``X0``
(and momentum ``S0``) after the previous token:

    X_t = cX_t * X0 + cS_t * S0 - sum_{i <= t} G_ti * a_i b_iᵀ

with, in log space (``L = cumsum log alpha`` and ``Mu = cumsum log mu`` over the run,
``D_ts = exp(L_t - L_s)`` and ``E_si = exp(Mu_s - Mu_i)`` masked to ``i <= s <= t``):

    gd:        G = D * eta_i,            cX_t = exp(L_t),  cS = 0
    momentum:  G = (D @ E) * eta_i,      cX_t = exp(L_t),  cS_t = sum_s D_ts exp(Mu_s)
               S_end = exp(Mu_end) S0 - sum_i E_end,i eta_i a_i b_iᵀ

A per-channel alpha (linear memory, ``[..., dk]``) gives ``D``, ``G``, ``cX``, ``cS`` an extra
trailing key-channel dim ``K``.

With ``step_at="retained"`` token i's gradient is taken at ``materialize(gamma_i * X0)``
(``gamma_i = prod_{j <= i} alpha_j`` over the chunk, i.e. ``cX``), still a known outer product
per token (``rules.retained_weights``), so the same algebra applies.

**The exact delta rule** (``chunk_rule="exact"``: linear memory, l2 bias, none/decay retention,
gd) takes every gradient at the state right before its token, so the factors are not known up
front; the chunk is instead solved in closed form (the WY / UT transform of DeltaNet). With
``L = cumsum log alpha`` over the chunk, ``Lr_t = L_t`` (``step_at="retained"``) or ``L_{t-1}``
(``previous``) and the error terms ``u_t = eta_t (W'_t k_t - v_t)`` at the gradient point ``W'_t``:

    W_t = W0 * exp(L_t) - sum_{i <= t} u_i (k_i * exp(L_t - L_i))ᵀ
    (I + A) U = diag(eta) ((exp(Lr) * K) W0ᵀ - V),   A_ti = eta_t exp(Lr_t - L_i) k_t·k_i  (i < t)

so ``U = Wk W0ᵀ - Uv`` with ``Wk = (I + A)^-1 diag(eta) (exp(Lr) * K)`` and ``Uv = (I + A)^-1
diag(eta) V``: one unit-lower-triangular solve per chunk that does not depend on the state, after
which the state enters only through matmuls (:func:`delta_chunk`, :func:`delta_chunk_errors`,
:func:`delta_chunk_read`, :func:`delta_chunk_end`). Every decay is an ``exp`` of a non-positive
difference of log-sums (no division by decay products); a per-channel alpha makes them
``[c, c, dk]`` pairwise tensors.

``chunked`` (the training path) uses the coefficient, read and end-state functions chunk by
chunk (``pytorch.delta_exact`` the delta-rule ones for all chunks of a batch at once). :func:`memory_chunk_step` combines them into one self-contained step over a run of tokens
inside one chunk, starting anywhere in the chunk: the recurrent cache of an exported model
decodes and prefills with it. This module imports only ``spec`` and ``rules``, so the model
export can copy the three files next to its modeling code (one source of the rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rules import grad_factors, matvec, read_memory, retained_weights
from .spec import MirasSpec


@dataclass
class ChunkCoefficients:
    """Coefficients of one run of ``c`` tokens (see the module docstring).

    Shapes, with ``K`` the optional per-channel dim: ``G`` ``[B, H, c, c(, K)]``; ``cX``
    ``[B, H, c(, K)]`` or None (alpha = 1); ``cS`` like ``cX`` or None (no momentum); ``sG``
    ``[B, H, c]`` and ``sX`` ``[B, H]`` (the momentum state at the run's end) or None.
    """

    channel: bool
    G: torch.Tensor
    cX: torch.Tensor | None
    cS: torch.Tensor | None
    sG: torch.Tensor | None
    sX: torch.Tensor | None


def causal_mask(c: int, device: torch.device) -> torch.Tensor:
    """``[c, c]`` boolean mask of ``i <= t`` (row t, column i)."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril()


def masked_decay(L: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(L_t - L_i)`` for ``i <= t``, else 0.

    ``L``: ``[B, H, c]`` -> ``[B, H, c, c]``, or ``[B, H, c, K]`` -> ``[B, H, c, c, K]``. The mask
    is applied before ``exp`` so that no masked entry can overflow.
    """
    if L.dim() == 4:
        diff = L.unsqueeze(3) - L.unsqueeze(2)
        return torch.exp(torch.where(mask.unsqueeze(-1), diff, float("-inf")))
    diff = L.unsqueeze(-1) - L.unsqueeze(-2)
    return torch.exp(torch.where(mask, diff, float("-inf")))


def chunk_coefficients(
    log_alpha: torch.Tensor | None, eta: torch.Tensor, log_mu: torch.Tensor | None, mask: torch.Tensor
) -> ChunkCoefficients:
    """Coefficients of a run of ``c`` tokens from its gates.

    Args:
        log_alpha: ``[B, H, c]`` or per-channel ``[B, H, c, K]``; None for retention ``none``.
        eta: ``[B, H, c]`` inner learning rates.
        log_mu: ``[B, H, c]`` for the momentum learner, else None.
        mask: :func:`causal_mask` of size ``c``.
    """
    channel = log_alpha is not None and log_alpha.dim() == 4
    if log_alpha is None:  # retention 'none': alpha = 1
        D = mask.to(eta.dtype)
        cX = None
    else:
        L = log_alpha.cumsum(dim=2)
        D = masked_decay(L, mask)
        cX = torch.exp(L)
    eta_i = eta[:, :, None, :, None] if channel else eta[:, :, None, :]
    if log_mu is None:
        return ChunkCoefficients(channel, D * eta_i, cX, None, None, None)
    Mu = log_mu.cumsum(dim=2)
    E = masked_decay(Mu, mask)
    eM = torch.exp(Mu)
    if channel:
        G = torch.einsum("bhtsk,bhsi->bhtik", D, E)
        cS = torch.einsum("bhtsk,bhs->bhtk", D, eM)
    else:
        G = D @ E
        cS = (D @ eM.unsqueeze(-1)).squeeze(-1)
    return ChunkCoefficients(channel, G * eta_i, cX, cS, E[..., -1, :] * eta, eM[..., -1])


def apply_affine(x: torch.Tensor, X0: torch.Tensor, S0: torch.Tensor | None, co: ChunkCoefficients,
                 a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X_t x_t`` for every token of the run, without forming ``X_t``.

    ``x`` ``[B, H, c, cols]``, ``X0``/``S0`` ``[B, H, rows, cols]``, factors ``a`` ``[B, H, c, rows]``
    and ``b`` ``[B, H, c, cols]`` -> ``[B, H, c, rows]``.
    """
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


def token_states(X0: torch.Tensor, S0: torch.Tensor | None, co: ChunkCoefficients, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """``X_t`` for every token of the run: ``[B, H, c, rows, cols]`` (O(c) weight blocks, so
    meant for short runs; the training path scans long ones in ``pytorch.per_token_scan``)."""
    if co.channel:
        out = X0.unsqueeze(2) * co.cX[..., None, :]
        if S0 is not None:
            out = out + S0.unsqueeze(2) * co.cS[..., None, :]
        return out - torch.einsum("bhtik,bhir,bhik->bhtrk", co.G, a, b)
    out = X0.unsqueeze(2) if co.cX is None else X0.unsqueeze(2) * co.cX[..., None, None]
    if S0 is not None:
        out = out + S0.unsqueeze(2) * co.cS[..., None, None]
    return out - torch.einsum("bhti,bhir,bhic->bhtrc", co.G, a, b)


def end_state(X0: torch.Tensor, S0: torch.Tensor | None, co: ChunkCoefficients,
                       a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X`` after the run's last token: ``[B, H, rows, cols]``."""
    if co.channel:
        out = X0 * co.cX[:, :, -1, None, :]
        if S0 is not None:
            out = out + S0 * co.cS[:, :, -1, None, :]
        return out - a.transpose(-1, -2) @ (co.G[:, :, -1] * b)
    out = X0 if co.cX is None else X0 * co.cX[:, :, -1, None, None]
    if S0 is not None:
        out = out + S0 * co.cS[:, :, -1, None, None]
    return out - (a * co.G[:, :, -1, :, None]).transpose(-1, -2) @ b


def end_momentum(S0: torch.Tensor, co: ChunkCoefficients, a: torch.Tensor,
                          b: torch.Tensor) -> torch.Tensor:
    """``S`` after the run's last token: ``[B, H, rows, cols]``."""
    return S0 * co.sX[:, :, None, None] - (a * co.sG.unsqueeze(-1)).transpose(-1, -2) @ b


@dataclass
class DeltaChunk:
    """The state-independent part of exact delta-rule chunks (module docstring), for any leading
    dims ``...`` (``[B, H]`` or ``[B, H, N]``): ``Wk`` ``[..., c, dk]``, ``Uv`` ``[..., c, dv]``,
    ``P`` ``[..., c, c]`` (decayed ``q_t·k_i`` for ``i <= t``), ``qd`` ``[..., c, dk]`` (``exp(L_t) q_t``),
    ``kd`` ``[..., c, dk]`` (``exp(L_end - L_i) k_i``), ``gend`` ``[...]`` or ``[..., dk]``
    (``exp(L_end)``; None without retention)."""

    Wk: torch.Tensor
    Uv: torch.Tensor
    P: torch.Tensor
    qd: torch.Tensor
    kd: torch.Tensor
    gend: torch.Tensor | None


def _pair_decay(Lt: torch.Tensor, Li: torch.Tensor, mask: torch.Tensor, channel: bool) -> torch.Tensor:
    """``exp(Lt_t - Li_i)`` where ``mask[t, i]``, else 0 (masked before ``exp``, so nothing overflows):
    ``[..., c]`` -> ``[..., c, c]``, or per channel ``[..., c, K]`` -> ``[..., c, c, K]``."""
    if channel:
        diff = Lt.unsqueeze(-2) - Li.unsqueeze(-3)
        return torch.exp(torch.where(mask.unsqueeze(-1), diff, float("-inf")))
    diff = Lt.unsqueeze(-1) - Li.unsqueeze(-2)
    return torch.exp(torch.where(mask, diff, float("-inf")))


def delta_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor | None,
                eta: torch.Tensor, retained: bool) -> DeltaChunk:
    """The triangular solve and decays of exact delta-rule chunks (one per leading index).

    Args:
        q, k: ``[..., c, dk]``; v: ``[..., c, dv]``; eta: ``[..., c]``.
        log_alpha: ``[..., c]`` or per key channel ``[..., c, dk]``; None for retention ``none``.
        retained: gradient at the retained state ``alpha_t W_{t-1}`` (Gated DeltaNet) instead
            of at ``W_{t-1}``.
    """
    c = q.shape[-2]
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    incl = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    channel = log_alpha is not None and log_alpha.dim() == k.dim()
    if log_alpha is None:
        A = (k @ k.transpose(-1, -2)) * strict
        P = (q @ k.transpose(-1, -2)) * incl
        rk, qd, kd, gend = k * eta.unsqueeze(-1), q, k, None
    else:
        L = log_alpha.cumsum(dim=-2 if channel else -1)
        Lr = L if retained else L - log_alpha
        if channel:
            A = torch.einsum("...tk,...ik,...tik->...ti", k, k, _pair_decay(Lr, L, strict, True))
            P = torch.einsum("...tk,...ik,...tik->...ti", q, k, _pair_decay(L, L, incl, True))
            rk = k * torch.exp(Lr)
            qd, kd = q * torch.exp(L), k * torch.exp(L[..., -1:, :] - L)
            gend = torch.exp(L[..., -1, :])
        else:
            A = (k @ k.transpose(-1, -2)) * _pair_decay(Lr, L, strict, False)
            P = (q @ k.transpose(-1, -2)) * _pair_decay(L, L, incl, False)
            rk = k * torch.exp(Lr).unsqueeze(-1)
            qd, kd = q * torch.exp(L).unsqueeze(-1), k * torch.exp(L[..., -1:] - L).unsqueeze(-1)
            gend = torch.exp(L[..., -1])
        rk = rk * eta.unsqueeze(-1)
    A = A * eta.unsqueeze(-1)
    # (I + A) X = rhs with A strictly lower: unitriangular=True reads only A's strict lower part
    rhs = torch.cat([rk, v * eta.unsqueeze(-1)], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    Wk, Uv = sol.split([k.shape[-1], v.shape[-1]], dim=-1)
    return DeltaChunk(Wk, Uv, P, qd, kd, gend)


def delta_chunk_errors(dc: DeltaChunk, W0: torch.Tensor) -> torch.Tensor:
    """``U`` ``[..., c, dv]``: the chunk's error terms ``u_t`` from its start state ``W0`` ``[..., dv, dk]``."""
    return dc.Wk @ W0.transpose(-1, -2) - dc.Uv


def delta_chunk_read(dc: DeltaChunk, W0: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``y_t = W_t q_t`` for every token of the chunk: ``[..., c, dv]``."""
    return dc.qd @ W0.transpose(-1, -2) - dc.P @ U


def delta_chunk_end(dc: DeltaChunk, W0: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The state after the chunk's last token: ``[..., dv, dk]``."""
    if dc.gend is None:
        kept = W0
    elif dc.gend.dim() == W0.dim() - 1:  # per channel: decay the key (column) dim
        kept = W0 * dc.gend.unsqueeze(-2)
    else:
        kept = W0 * dc.gend[..., None, None]
    return kept - U.transpose(-1, -2) @ dc.kd


def freeze(spec: MirasSpec, X: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a chunk start fixes for :func:`memory_chunk_step` (its ``frozen`` argument): the
    weights ``materialize(X)`` (``step_at="previous"``), the free variable ``X`` itself
    (``step_at="retained"``, carried by :func:`carry_frozen`), nothing for ``chunk_rule="exact"``."""
    if spec.chunk_rule == "exact":
        return {}
    if spec.steps_on_retained:
        return dict(X)
    return {n: spec.materialize(x) for n, x in X.items()}


def carry_frozen(spec: MirasSpec, frozen: dict[str, torch.Tensor],
                 alpha: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``frozen`` after a run of tokens with gates ``alpha`` ``[B, H, c(, dk)]``: unchanged, except
    with ``step_at="retained"`` where the chunk-start free variable is carried by the run's
    retention (``gamma * X_{t0}``), so the next run of the chunk continues from it."""
    if not spec.steps_on_retained or spec.chunk_rule == "exact" or alpha is None or alpha.shape[2] == 0:
        return frozen
    if alpha.dim() == 4:
        g = torch.exp(torch.log(alpha).sum(dim=2)).unsqueeze(-2)  # [B, H, 1, dk]
    else:
        g = torch.exp(torch.log(alpha).sum(dim=2))[..., None, None]
    return {n: x * g for n, x in frozen.items()}


def memory_chunk_step(
    spec: MirasSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    delta: torch.Tensor | None,
    mu: torch.Tensor | None,
    X: dict[str, torch.Tensor],
    S: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the memory over ``c`` tokens that all lie inside one chunk of the chunk grid.

    The run may start anywhere in its chunk: ``X``/``S`` are the state after the previous token
    and ``frozen`` holds what the chunk's start fixed (:func:`freeze` of the chunk-start state,
    advanced over earlier runs of the chunk by :func:`carry_frozen`): the weights where every
    inner gradient of the chunk is taken, or with ``step_at="retained"`` the chunk-start free
    variable carried to the run start. Chaining runs that split the grid's chunks therefore
    computes what one pass over the whole sequence does. ``chunk_rule="exact"`` ignores
    ``frozen``: it is the per-token rule, so any split gives the same result.

    Args:
        spec: the memory rule.
        q, k: ``[B, H, c, dk]``; v: ``[B, H, c, dv]``.
        alpha: ``[B, H, c]`` or per-channel ``[B, H, c, dk]``; None for retention ``none``.
        eta: ``[B, H, c]``; delta: ``[B, H, c]`` (Huber bias) or None; mu: ``[B, H, c]``
            (momentum learner) or None.
        X: free variable per weight name, ``[B, H, rows, cols]``.
        S: momentum per weight name (empty without momentum).
        frozen: per weight name, ``[B, H, rows, cols]`` (see above).

    Returns:
        ``y`` ``[B, H, c, dv]`` and the state ``(X, S)`` after the run's last token.
    """
    log_alpha = None if alpha is None else torch.log(alpha)
    if spec.chunk_rule == "exact":  # the delta rule in closed form (module docstring)
        dc = delta_chunk(q, k, v, log_alpha, eta, spec.steps_on_retained)
        U = delta_chunk_errors(dc, X["W"])
        return delta_chunk_read(dc, X["W"], U), {"W": delta_chunk_end(dc, X["W"], U)}, {}
    mask = causal_mask(q.shape[2], q.device)
    co = chunk_coefficients(log_alpha, eta, None if mu is None else torch.log(mu), mask)
    if spec.steps_on_retained:  # token i's gradient at materialize(gamma_i * X_{t0})
        weights, scale = retained_weights(spec, frozen, co.cX)
        factors = grad_factors(spec, weights, k, v, delta, scale)
    else:
        factors = grad_factors(spec, frozen, k, v, delta)
    affine = spec.weights_are_state
    if affine:  # W_t = X_t
        y = read_memory(spec, lambda n, x: apply_affine(x, X[n], S.get(n), co, *factors[n]), q)
    elif spec.retention == "kl":  # W_t = c * softmax(X_t), read token by token
        weights = {n: spec.materialize(token_states(X[n], S.get(n), co, *factors[n])) for n in X}
        y = read_memory(spec, lambda n, x: matvec(weights[n], x), q)
    else:  # lq: W_t = s_t * X_t with one scalar s_t per token, so W_t x = s_t * (X_t x)
        scales = {n: spec.lq_scale(token_states(X[n], S.get(n), co, *factors[n])).squeeze(-1) for n in X}
        y = read_memory(spec, lambda n, x: scales[n] * apply_affine(x, X[n], S.get(n), co, *factors[n]), q)
    new_X = {n: end_state(X[n], S.get(n), co, *factors[n]) for n in X}
    new_S = {n: end_momentum(S[n], co, *factors[n]) for n in S} if mu is not None else {}
    return y, new_X, new_S
