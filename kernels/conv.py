"""Causal depthwise convolution over packed documents (the short conv in front of every Miras
memory's q, k, v). It lives with the operator because both the model and the context-parallel
memory (which adds the previous rank's last inputs as a halo) call it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise conv1d that never mixes documents.

    x [B, T, C], weight [C, K] (``weight[:, K-1]`` multiplies the current token, as
    ``nn.Conv1d`` with K-1 left padding), pos [T] position of each token in its document (None:
    one document) -> [B, T, C]. Written as K shifted multiply-adds so the document mask is a
    plain ``pos >= shift`` test.
    """
    t, k = x.shape[1], weight.shape[1]
    out = x * weight[:, k - 1]
    for shift in range(1, min(k, t)):
        prev = F.pad(x[:, : t - shift], (0, 0, shift, 0))
        if pos is not None:
            prev = prev * (pos >= shift).to(x.dtype)[None, :, None]
        out = out + prev * weight[:, k - 1 - shift]
    return out
