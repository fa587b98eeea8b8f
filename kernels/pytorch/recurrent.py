"""The plain token loop: THE definition of the Miras memory semantics for any chunk size C.

For each document the tokens are split into chunks of C starting at the document start (the last
chunk may be partial). At a chunk start the weights are frozen, ``W_{t0} = materialize(X_{t0})``;
every token i of the chunk then takes its inner gradient at ``W_{t0}`` (mini-batch GD, the chunk
semantics of ``docs/semantics.md``) and updates the retention's free variable:

    gd:        X_i = alpha_i * X_{i-1} - eta_i * g_i
    momentum:  S_i = mu_i * S_{i-1} - eta_i * g_i ;   X_i = alpha_i * X_{i-1} + S_i

(alpha = 1 for retention ``none``; a per-channel alpha ``[dk]`` scales the key/column dim of a
linear memory), then reads after the write: ``y_i = M(materialize(X_i), q_i)``. At C = 1 this is
exactly the per-token rule of ``docs/semantics.md`` for every preset. Slow (one Python step per token): use it as the
reference and for tiny inputs; ``chunked`` computes the same thing chunk-parallel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..inputs import State, prepare_inputs, run_documents
from ..rules import grad_factors, matvec, read_memory
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
    names = spec.weight_names()
    momentum = spec.learner == "momentum"
    X = {n: state[n] for n in names}
    S = {n: state["S_" + n] for n in names} if momentum else {}
    ys = []
    frozen: dict[str, torch.Tensor] = {}

    def tokens(t: torch.Tensor | None) -> list:
        # unbind (not t[:, :, i]): its backward is one stack, a slice's would fill a full tensor
        return [None] * T if t is None else list(t.unbind(dim=2))

    steps = zip(*(tokens(x) for x in (q, k, v, alpha, eta, delta, mu)))
    for t, (q_t, k_t, v_t, alpha_t, eta_t, delta_t, mu_t) in enumerate(steps):
        if t % chunk_size == 0:
            frozen = {n: spec.materialize(X[n]) for n in names}
        factors = grad_factors(
            spec, frozen, k_t.unsqueeze(2), v_t.unsqueeze(2), None if delta_t is None else delta_t.unsqueeze(2)
        )
        eta_t = eta_t[:, :, None, None]
        for n, (a, b) in factors.items():
            g = a.transpose(-1, -2) @ b  # [B, H, r, c] outer product of this token
            if alpha_t is None:
                kept = X[n]
            elif alpha_t.dim() == 3:  # per-channel [B, H, dk]: decay along the key (column) dim
                kept = alpha_t[:, :, None, :] * X[n]
            else:
                kept = alpha_t[:, :, None, None] * X[n]
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
