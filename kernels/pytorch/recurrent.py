"""The plain token loop: THE definition of the Miras memory semantics for any chunk size C.

For each document the tokens are split into chunks of C starting at the document start (the last
chunk may be partial). Token i of a chunk starting after token t0 (state X_{t0}) takes its inner
gradient ``g_i = grad l(P_i; k_i, v_i)`` at a point that depends on two spec fields:

* ``chunk_rule="minibatch"`` (mini-batch GD, the chunk semantics of ``docs/semantics.md``):
  ``step_at="previous"``: ``P_i = materialize(X_{t0})`` (the weights frozen at the chunk start);
  ``step_at="retained"``: ``P_i = materialize(gamma_i * X_{t0})`` with ``gamma_i = prod_{j=t0+1..i}
  alpha_j`` (the chunk-start state carried to token i by the retention alone).
* ``chunk_rule="exact"`` ignores C: every token is its own chunk (the per-token rule), so
  ``P_i = materialize(X_{i-1})`` resp. ``materialize(alpha_i * X_{i-1})``.

At C = 1 both rules are the per-token rule; retention ``none`` has alpha = 1, so there the two
orders agree. Then the retention's free variable is updated:

    gd:        X_i = alpha_i * X_{i-1} - eta_i * g_i
    momentum:  S_i = mu_i * S_{i-1} - eta_i * g_i ;   X_i = alpha_i * X_{i-1} + S_i

(alpha = 1 for retention ``none``; a per-channel alpha ``[dk]`` scales the key/column dim of a
linear memory, in ``gamma_i`` too), and the memory reads after the write: ``y_i =
M(materialize(X_i), q_i)``. With ``step_at="retained"`` and the linear l2 memory this is Gated
DeltaNet, ``S_i = alpha_i S_{i-1} (I - eta_i k_i k_iᵀ) + eta_i v_i k_iᵀ``. Slow (one Python step per
token): use it as the reference and for tiny inputs; ``chunked`` computes the same thing
chunk-parallel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..inputs import State, prepare_inputs, run_documents
from ..rules import grad_factors, matvec, read_memory, retain
from ..spec import MirasSpec


def recurrent_core(
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
    """Token loop over one dense batch (head-major, see ``inputs.Core``)."""
    if spec.retention_chunking == "boundary":
        # the paper's chunk semantics for lq / kl live in their own module (kernels/pytorch/boundary.py)
        from .boundary import boundary_recurrent_core
        return boundary_recurrent_core(spec, chunk_size, q, k, v, alpha, eta, delta, mu, state)
    T = q.shape[2]
    if spec.chunk_rule == "exact":
        chunk_size = 1  # the exact rule is the per-token rule at every chunk size
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    retained = spec.steps_on_retained
    X = {n: state[n] for n in names}
    S = {n: state["S_" + n] for n in names} if momentum else {}
    ys = []
    frozen: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}

    def tokens(t: torch.Tensor | None) -> list:
        # unbind (not t[:, :, i]): its backward is one stack, a slice's would fill a full tensor
        return [None] * T if t is None else list(t.unbind(dim=2))

    steps = zip(*(tokens(x) for x in (q, k, v, alpha, eta, delta, mu)))
    for t, (q_t, k_t, v_t, alpha_t, eta_t, delta_t, mu_t) in enumerate(steps):
        if retained:
            # gamma_i * X_{t0}: the chunk-start state carried by the retention alone
            carried = {n: retain(alpha_t, X[n] if t % chunk_size == 0 else carried[n]) for n in names}
            frozen = {n: spec.materialize(carried[n]) for n in names}
        elif t % chunk_size == 0:
            frozen = {n: spec.materialize(X[n]) for n in names}
        factors = grad_factors(
            spec, frozen, k_t.unsqueeze(2), v_t.unsqueeze(2), None if delta_t is None else delta_t.unsqueeze(2)
        )
        eta_t = eta_t[:, :, None, None]
        for n, (a, b) in factors.items():
            g = a.transpose(-1, -2) @ b  # [B, H, r, c] outer product of this token
            kept = retain(alpha_t, X[n])
            if momentum:
                S[n] = mu_t[:, :, None, None] * S[n] - eta_t * g
                X[n] = kept + S[n]
            else:
                X[n] = kept - eta_t * g
        weights = {n: spec.materialize(X[n]).unsqueeze(2) for n in names}
        ys.append(read_memory(spec, lambda n, x: matvec(weights[n], x), q_t.unsqueeze(2)))
    y = torch.cat(ys, dim=2) if ys else v.new_zeros(v.shape)
    final = dict(X)
    final.update({"S_" + n: s for n, s in S.items()})
    return y, final


def miras_memory_recurrent(
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
    """Reference backend; same arguments and returns as :func:`miras_kernels.miras_memory`."""
    inp = prepare_inputs(
        q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    return run_documents(inp, recurrent_core)
