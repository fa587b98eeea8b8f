"""Softmax attention under context parallelism (hybrid models).

* Sliding window (``window = w``): a query sees the ``w - 1`` keys before it, so rank r needs the
  last ``w - 1`` keys and values of rank r-1 -- a halo exchange, forward and backward (requires
  ``w - 1 <= T_local``; ``rules.validate_cp_model`` says so in one line).
* Full causal attention: one all-gather of every rank's keys and values (simple and exact; memory
  O(T) per rank -- a ring schedule would be the next step for very long contexts).

Causality, the window and packed-document boundaries are those of the CP = 1 model: queries and
keys carry their global token indices and the global start of their document (document ids),
and the attention itself is ``miras_pretrain.model.attention.document_causal_attention`` --
FlexAttention on CUDA, query tiles with small masks elsewhere, never a dense
``[T_local, T]`` mask. Its one exchange (halo or all-gather) is a :class:`~.comm.Chain` of one
node started from the keys (device, message order: see comm.py).
"""

from __future__ import annotations

import torch

from .comm import Chain, CPTransport
from .layout import CPSlice


def cp_attention(cp: CPTransport, lay: CPSlice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 window: int | None) -> torch.Tensor:
    """Causal (sliding-window) attention of this rank's queries over the global sequence laid
    out by ``lay``. q, k, v [B, T_local, H, d] (RoPE applied with global document positions) ->
    o [B, T_local, H, d]."""
    # imported here: this package does not import the model at import time
    from miras_pretrain.model.attention import document_causal_attention

    grp = cp.group
    b, t, h, d = q.shape
    chain = Chain(cp, k)
    if window is None:
        wire = torch.promote_types(k.dtype, torch.float32)
        flat = torch.cat([k.to(wire).reshape(-1), v.to(wire).reshape(-1)])
        gathered = chain.all_gather(flat)[: grp.rank + 1]  # ranks up to this one
        kv = gathered.view(grp.rank + 1, 2, b, t, h, d)
        keys = kv[:, 0].permute(1, 0, 2, 3, 4).reshape(b, -1, h, d).to(k.dtype)
        vals = kv[:, 1].permute(1, 0, 2, 3, 4).reshape(b, -1, h, d).to(v.dtype)
        k_start = 0
    else:
        halo = window - 1
        if halo > t:
            raise ValueError(
                f"sliding window {window} needs {halo} keys of the previous CP rank but a rank holds {t} tokens: "
                "use a longer sequence, a smaller CP size or a smaller window"
            )
        keys, vals = k, v
        if halo:
            hk, hv = chain.halo(
                [k[:, t - halo:], v[:, t - halo:]], send=grp.next is not None, recv=grp.prev is not None,
                recv_like=[((b, halo, h, d), k.dtype), ((b, halo, h, d), v.dtype)],
            )
            keys, vals = torch.cat([hk, k], dim=1), torch.cat([hv, v], dim=1)
        k_start = lay.start - halo  # negative on rank 0: those (zero) keys are masked
    doc_q = doc_k = None
    if lay.docs is not None:
        # the global start of each token's document identifies the document
        doc_q = lay.doc_start_of(torch.arange(lay.start, lay.end, device=q.device))
        doc_k = lay.doc_start_of(torch.arange(k_start, lay.end, device=q.device))
    o = document_causal_attention(
        q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), window=window, doc_q=doc_q, doc_k=doc_k,
        q_start=lay.start, k_start=k_start, cache_for=lay,
    )
    return chain.attach(o.transpose(1, 2))
