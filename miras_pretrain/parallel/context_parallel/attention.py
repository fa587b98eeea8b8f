"""Softmax attention under context parallelism (hybrid models).

* Sliding window (``window = w``): a query sees the ``w - 1`` keys before it, so rank r needs the
  last ``w - 1`` keys and values of rank r-1 -- a halo exchange, forward and backward (requires
  ``w - 1 <= T_local``; ``rules.validate_cp_model`` says so in one line).
* Full causal attention: one all-gather of every rank's keys and values (simple and exact; memory
  O(T) per rank -- a ring schedule would be the next step for very long contexts).

The mask is built from global token indices and global document starts, so causality, the
window and packed-document boundaries are exactly those of the CP=1 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .comm import AllGather, Attach, CPTransport, anchor, halo_exchange
from .layout import CPSlice


def cp_attention(cp: CPTransport, lay: CPSlice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 window: int | None) -> torch.Tensor:
    """Causal (sliding-window) attention of this rank's queries over the global sequence laid
    out by ``lay``. q, k, v [B, T_local, H, d] (RoPE applied with global document positions) ->
    o [B, T_local, H, d]."""
    grp = cp.group
    b, t, h, d = q.shape
    tokens = []
    if window is None:
        wire = torch.promote_types(k.dtype, torch.float32)
        flat = torch.cat([k.to(wire).reshape(-1), v.to(wire).reshape(-1)])
        gathered = AllGather.apply(cp, flat, anchor())[: grp.rank + 1]  # ranks up to this one
        tokens.append(gathered)
        kv = gathered.view(grp.rank + 1, 2, b, t, h, d)
        keys = kv[:, 0].permute(1, 0, 2, 3, 4).reshape(b, -1, h, d).to(k.dtype)
        vals = kv[:, 1].permute(1, 0, 2, 3, 4).reshape(b, -1, h, d).to(v.dtype)
        key_idx = torch.arange(0, lay.end, device=q.device)
    else:
        halo = window - 1
        if halo > t:
            raise ValueError(
                f"sliding window {window} needs {halo} keys of the previous CP rank but a rank holds {t} tokens: "
                "use a longer sequence, a smaller CP size or a smaller window"
            )
        keys, vals = k, v
        if halo:
            (hk, hv), token = halo_exchange(
                cp, [k[:, t - halo:], v[:, t - halo:]], send=grp.next is not None, recv=grp.prev is not None,
                recv_like=[((b, halo, h, d), k.dtype), ((b, halo, h, d), v.dtype)],
            )
            tokens.append(token)
            keys, vals = torch.cat([hk, k], dim=1), torch.cat([hv, v], dim=1)
        key_idx = torch.arange(lay.start - halo, lay.end, device=q.device)
    q_idx = torch.arange(lay.start, lay.end, device=q.device)
    mask = (key_idx[None, :] <= q_idx[:, None]) & (key_idx[None, :] >= 0)
    if window is not None:
        mask &= (q_idx[:, None] - key_idx[None, :]) < window
    if lay.docs is not None:
        mask &= lay.doc_start_of(q_idx)[:, None] == lay.doc_start_of(key_idx)[None, :]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask)
    o = o.transpose(1, 2)
    for token in tokens:
        o = Attach.apply(o, token)
    return o
