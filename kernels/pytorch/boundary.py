"""Boundary chunking (``MirasSpec.retention_chunking="boundary"``): the paper's chunk semantics
for the non-affine retentions ``lq`` (Moneta) and ``kl`` (Memora).

The default (``"per_token"``) evaluates the retention's nonlinearity ``materialize`` (Moneta's
l_q normalisation, Memora's softmax) for every token. The paper evaluates it only at chunk
boundaries and keeps everything inside a chunk linear, so a chunk is a few matmuls with no
per-token weight blocks. Precisely (``docs/semantics.md``, "Boundary chunking"):

Chunk grid, state, gradients -- exactly as the default. Chunks of C tokens from the document
start (the last may be partial). The state is the retention's free variable ``X`` (l_q: the
accumulator ``A``; kl: the logits ``Z``) and, with momentum, ``S``; every token i of a chunk
that starts after token b takes its inner gradient ``g_i`` at ``W_b = materialize(X_b)``
(``step_at="previous"``) or at ``materialize(gamma_i * X_b)`` (``step_at="retained"``,
``gamma_i`` the product of the chunk's alphas up to i), and

    gd:        X_i = alpha_i * X_{i-1} - eta_i * g_i
    momentum:  S_i = mu_i * S_{i-1} - eta_i * g_i ;   X_i = alpha_i * X_{i-1} + S_i

Boundaries: the document start and the position after every *full* chunk (t = b + C). Only the
weights a token READS with differ from the default: token t of the chunk after b reads with

* ``R_t = materialize(X_t)`` if t ends a full chunk (t = b + C is itself a boundary: the weights
  it reads are exactly the next chunk's gradient point ``W_{b+C}``);
* otherwise the linear continuation from the boundary weights ``W_b``:
    lq:  ``R_t = s_b * A_t`` with ``s_b = (||A_b||_q + eps)^(2-q)``, the normaliser frozen at
         the boundary (the accumulator moves linearly; reads use the chunk-start normaliser);
    kl:  ``R_t = alpha_t * R_{t-1} - eta_t * g_t`` (gd) or ``alpha_t * R_{t-1} + S_t``
         (momentum), ``R_b = W_b``: the weights take the same linear step as the logits -- the
         Euclidean step Memora's update ``c * softmax(alpha log(W / c) - eta g)`` becomes
         without its softmax/log mirror map. In closed form ``R_t = X_t + cX_t * (W_b - Z_b)``.

So the exact softmax (resp. normalisation) is applied once per chunk, to the chunk's whole
mini-batch step, where the chunk lands on the next boundary; the next chunk's first token starts
from those exact weights. The logits Z stay the state (R_t may leave the simplex inside a chunk,
but no log of a weight is ever taken), so the state is well defined across chunks and chaining
calls at multiples of C equals one call. At C = 1 every token ends a full chunk, so every read is
``materialize(X_t)``: the per-token rule (tested). A partial last chunk has no boundary at its
end: its tokens all read the linear continuation, so a token's output never depends on how many
tokens follow it.

Two forms, tested equal (forward, final state, every gradient):

* :func:`boundary_recurrent_core` -- the token loop (one Python step per token), the definition;
* :func:`boundary_chunked_core` -- chunk-parallel: per chunk the gradient factors at the frozen
  weights, then affine reads ``chunk_step.apply_affine`` (lq: anchored at ``A_b`` and scaled by
  ``s_b``; kl: anchored at ``W_b``), the last token of a full chunk read with the boundary
  weights ``materialize(X_end)`` that the next chunk needs anyway. No per-token scan.

Both take and return what ``inputs.Core`` specifies (head-major tensors). Triton does not
compute this form: ``miras_kernels.dispatch`` falls back to the chunked path with the reason.
"""

from __future__ import annotations

import torch

from ..chunk_step import apply_affine, causal_mask, chunk_coefficients, end_momentum, end_state
from ..inputs import State
from ..rules import grad_factors, matvec, read_memory, retain, retained_weights
from ..spec import MirasSpec


def boundary_recurrent_core(
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
    """Token loop of the boundary semantics (module docstring) over one dense batch.

    Args (head-major, see ``inputs.Core``): q, k ``[B, H, T, dk]``; v ``[B, H, T, dv]``; alpha
    ``[B, H, T]`` or ``[B, H, T, dk]`` or None; eta ``[B, H, T]``; delta, mu ``[B, H, T]`` or None;
    state: name -> ``[B, H, r, c]`` (free variables, and ``S_<name>`` with momentum).

    Returns:
        y ``[B, H, T, dv]`` and the final state (same keys and shapes as ``state``).
    """
    T = q.shape[2]
    C = chunk_size
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    retained = spec.steps_on_retained
    lq = spec.retention == "lq"
    X = {n: state[n] for n in names}
    S = {n: state["S_" + n] for n in names} if momentum else {}
    ys = []
    frozen: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    scale: dict[str, torch.Tensor] = {}  # lq: the boundary normaliser s_b [B, H, 1, 1]
    R: dict[str, torch.Tensor] = {}  # kl: the linearly continued read weights

    def tokens(t: torch.Tensor | None) -> list:
        # unbind (not t[:, :, i]): its backward is one stack, a slice's would fill a full tensor
        return [None] * T if t is None else list(t.unbind(dim=2))

    steps = zip(*(tokens(x) for x in (q, k, v, alpha, eta, delta, mu)))
    for t, (q_t, k_t, v_t, alpha_t, eta_t, delta_t, mu_t) in enumerate(steps):
        start = t % C == 0
        if start:  # a boundary: the only place materialize runs (besides the chunk's end)
            if lq:
                scale = {n: spec.lq_scale(X[n]) for n in names}
                boundary = {n: X[n] * scale[n] for n in names}
            else:
                boundary = {n: spec.materialize(X[n]) for n in names}
                R = dict(boundary)
            frozen = boundary
        if retained:
            # gamma_i * X_b: the chunk-start state carried by the retention alone
            carried = {n: retain(alpha_t, X[n] if start else carried[n]) for n in names}
            frozen = {n: spec.materialize(carried[n]) for n in names}
        factors = grad_factors(
            spec, frozen, k_t.unsqueeze(2), v_t.unsqueeze(2), None if delta_t is None else delta_t.unsqueeze(2)
        )
        eta_t = eta_t[:, :, None, None]
        for n, (a, b) in factors.items():
            g = a.transpose(-1, -2) @ b  # [B, H, r, c] outer product of this token
            if momentum:
                S[n] = mu_t[:, :, None, None] * S[n] - eta_t * g
                step = S[n]
            else:
                step = -eta_t * g
            X[n] = retain(alpha_t, X[n]) + step
            if not lq:
                R[n] = retain(alpha_t, R[n]) + step  # the same linear step on the weights
        if (t + 1) % C == 0:  # this token ends a full chunk: it reads the boundary weights
            weights = {n: spec.materialize(X[n]) for n in names}
        elif lq:
            weights = {n: X[n] * scale[n] for n in names}
        else:
            weights = R
        w3 = {n: w.unsqueeze(2) for n, w in weights.items()}
        ys.append(read_memory(spec, lambda n, x: matvec(w3[n], x), q_t.unsqueeze(2)))
    y = torch.cat(ys, dim=2) if ys else v.new_zeros(v.shape)
    final = dict(X)
    final.update({"S_" + n: s for n, s in S.items()})
    return y, final


def boundary_chunked_core(
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
    """Chunk-parallel form of :func:`boundary_recurrent_core` (same arguments and returns).

    Per chunk: gradient factors at the frozen weights (``rules.grad_factors``), the decay
    coefficients (``chunk_step.chunk_coefficients``), affine reads of every token from the
    boundary anchor, the end state, and ``materialize`` once on it (the next boundary).
    """
    T = q.shape[2]
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    retained = spec.steps_on_retained
    lq = spec.retention == "lq"
    X = {n: state[n] for n in names}
    S = {n: state["S_" + n] for n in names} if momentum else {}
    if T == 0:
        return v.new_zeros(v.shape), {**X, **{"S_" + n: s for n, s in S.items()}}
    la = None if alpha is None else torch.log(alpha)
    lmu = torch.log(mu) if momentum else None
    n_chunks = -(-T // chunk_size)

    def split(t: torch.Tensor | None) -> list:
        # split (not slicing in the loop): its backward is one concatenation
        return [None] * n_chunks if t is None else list(t.split(chunk_size, dim=2))

    # the boundary weights W_b (lq: also the normaliser s_b [B, H, 1, 1], W_b = X_b * s_b)
    if lq:
        scale = {n: spec.lq_scale(X[n]) for n in names}
        Wb = {n: X[n] * scale[n] for n in names}
    else:
        scale = {}
        Wb = {n: spec.materialize(X[n]) for n in names}
    masks: dict[int, torch.Tensor] = {}
    ys = []
    for qc, kc, vc, dc, lac, etac, lmuc in zip(*(split(t) for t in (q, k, v, delta, la, eta, lmu))):
        c = qc.shape[2]
        if c not in masks:
            masks[c] = causal_mask(c, q.device)
        co = chunk_coefficients(lac, etac, lmuc, masks[c])
        if retained:  # token i's gradient at materialize(gamma_i * X_b), gamma_i = cX_i
            weights, gscale = retained_weights(spec, X, co.cX)
            factors = grad_factors(spec, weights, kc, vc, dc, gscale)
        else:
            factors = grad_factors(spec, Wb, kc, vc, dc)
        Xend = {n: end_state(X[n], S.get(n), co, *factors[n]) for n in names}
        closes = c == chunk_size  # the chunk ends on a boundary: its last token reads W_end
        # only a full chunk has a next boundary (a partial chunk is the last one)
        if lq:
            s_end = {n: spec.lq_scale(Xend[n]) for n in names} if closes else {}
            Wend = {n: Xend[n] * s_end[n] for n in s_end}
            # per-token normaliser [B, H, c]: s_b, and s_end for the last token of a full chunk
            tok_scale = {}
            for n in names:
                sb = scale[n].flatten(-2).expand(-1, -1, c - 1 if closes else c)
                tok_scale[n] = torch.cat([sb, s_end[n].flatten(-2)], dim=2) if closes else sb

            def apply(n: str, x: torch.Tensor, X0=X, S0=S, co=co, f=factors, s=tok_scale) -> torch.Tensor:
                # R_t x = s_t * (A_t x): the affine read of the accumulator, scaled per token
                return s[n].unsqueeze(-1) * apply_affine(x, X0[n], S0.get(n), co, *f[n])
        else:
            s_end = {}
            Wend = {n: spec.materialize(Xend[n]) for n in names} if closes else {}

            def apply(n: str, x: torch.Tensor, W0=Wb, W1=Wend, S0=S, co=co, f=factors,
                      closes=closes) -> torch.Tensor:
                # R_t = cX_t W_b + cS_t S_b - sum_i G_ti g_i: the affine read anchored at W_b
                out = apply_affine(x, W0[n], S0.get(n), co, *f[n])
                if not closes:
                    return out
                last = x[:, :, -1:] @ W1[n].transpose(-1, -2)  # c softmax(Z_end) x_last
                return torch.cat([out[:, :, :-1], last], dim=2)
        ys.append(read_memory(spec, apply, qc))
        if momentum:
            S = {n: end_momentum(S[n], co, *factors[n]) for n in names}
        X, Wb, scale = Xend, Wend, s_end
    y = torch.cat(ys, dim=2)
    final = dict(X)
    final.update({"S_" + n: t for n, t in S.items()})
    return y, final
