"""The exact delta rule, chunk-parallel: ``chunk_rule="exact"`` on the torch path.

DeltaNet (``step_at="previous"``, retention ``none``) and Gated DeltaNet (``step_at="retained"``,
retention ``decay``) are published with exact chunking: the output is the per-token rule

    previous:  W_t = W_{t-1} (alpha_t I - eta_t k_t k_tᵀ) + eta_t v_t k_tᵀ
    retained:  W_t = alpha_t W_{t-1} (I - eta_t k_t k_tᵀ) + eta_t v_t k_tᵀ

at every chunk size (``recurrent.py`` with C = 1 is the definition). Per chunk of C tokens the
state-independent part -- a unit-lower-triangular solve (the WY / UT transform) and the decays, in
log space -- is computed for every chunk of the batch at once (``chunk_step.delta_chunk``, one
batched ``solve_triangular``); then one sequential pass over the chunks carries the state with
two small matmuls per chunk, and all reads are again one batched product. Autograd differentiates
all of it (the triangular solve included), so the backward needs no code of its own. A per-channel
alpha ``[B, H, T, dk]`` is supported with ``[C, C, dk]`` pairwise decays per chunk.

The last chunk is padded to C with neutral tokens (``k = v = q = 0``, ``eta = 0``, ``alpha = 1``:
they leave the state unchanged and their outputs are dropped).
"""

from __future__ import annotations

import torch

from ..chunk_step import DeltaChunk, delta_chunk, delta_chunk_end, delta_chunk_errors, delta_chunk_read
from ..inputs import State
from ..spec import MirasSpec


def _chunks(t: torch.Tensor, n: int, C: int, pad: int) -> torch.Tensor:
    """``[B, H, T, *rest]`` -> ``[B, H, n, C, *rest]``, zero-padded at the end."""
    if pad:
        t = torch.cat([t, t.new_zeros(*t.shape[:2], pad, *t.shape[3:])], dim=2)
    return t.reshape(*t.shape[:2], n, C, *t.shape[3:])


def delta_exact_core(
    spec: MirasSpec,
    chunk_size: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    eta: torch.Tensor,
    state: State,
) -> tuple[torch.Tensor, State]:
    """The exact delta rule over one dense batch (head-major, see ``inputs.Core``).

    Args:
        spec: a spec with ``chunk_rule="exact"`` (linear memory, l2 bias, none/decay, gd).
        chunk_size: C, the size of the triangular solves (the result does not depend on it).
        q, k: ``[B, H, T, dk]``; v: ``[B, H, T, dv]``; eta: ``[B, H, T]``.
        alpha: ``[B, H, T]`` or per key channel ``[B, H, T, dk]``; None for retention ``none``.
        state: ``{"W": [B, H, dv, dk]}``, the state before the first token.

    Returns:
        ``y`` ``[B, H, T, dv]`` and ``{"W": [B, H, dv, dk]}`` after the last token.
    """
    if not spec.exact_chunking_exists or spec.chunk_rule != "exact":
        raise ValueError(
            f"delta_exact_core needs chunk_rule='exact' on the delta rule (got chunk_rule={spec.chunk_rule!r}, "
            f"memory={spec.memory!r}, bias={spec.bias!r}, retention={spec.retention!r}, learner={spec.learner!r})"
        )
    T = q.shape[2]
    W = state["W"]
    if T == 0:
        return v.new_zeros(v.shape), {"W": W}
    C = min(chunk_size, T)  # a chunk longer than the sequence would only add padding
    n = -(-T // C)
    pad = n * C - T
    la = None if alpha is None else _chunks(torch.log(alpha), n, C, pad)  # padding: log 1 = 0
    dc = delta_chunk(_chunks(q, n, C, pad), _chunks(k, n, C, pad), _chunks(v, n, C, pad), la,
                     _chunks(eta, n, C, pad), spec.steps_on_retained)
    # the only sequential part: the chunk-start states, two small matmuls per chunk (unbind /
    # stack rather than indexing, so the backward is one stack per tensor)
    starts, errors = [], []
    Wk, Uv, kd = dc.Wk.unbind(2), dc.Uv.unbind(2), dc.kd.unbind(2)
    gend = [None] * n if dc.gend is None else dc.gend.unbind(2)
    for i in range(n):
        one = DeltaChunk(Wk[i], Uv[i], P=None, qd=None, kd=kd[i], gend=gend[i])  # what the state pass needs
        U = delta_chunk_errors(one, W)
        starts.append(W)
        errors.append(U)
        W = delta_chunk_end(one, W, U)
    y = delta_chunk_read(dc, torch.stack(starts, dim=2), torch.stack(errors, dim=2))
    y = y.reshape(*y.shape[:2], n * C, y.shape[-1])[:, :, :T]
    return y, {"W": W}
