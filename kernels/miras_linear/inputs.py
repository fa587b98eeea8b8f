"""Validation and normalisation of the operator's inputs, shared by the chunk and the
token-recurrent entry points (same conventions as ``miras_kernels.miras_memory``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miras_kernels.common.varlen import check_cu_seqlens


@dataclass
class LinearInputs:
    """Inputs ready for a kernel launch. Shapes: q, k ``[B, T, H, dk]``; v ``[B, T, H, dv]``;
    gates ``[B, T, H]`` fp32 (``la``/``lmu`` are log alpha / log mu); states ``[N, H, dv, dk]``
    fp32 (``N = B``, or the number of documents with ``cu_seqlens``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    la: torch.Tensor | None
    lmu: torch.Tensor | None
    eta: torch.Tensor
    delta: torch.Tensor | None
    h0: torch.Tensor | None
    s0: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    n_seq: int


def _gate(name: str, x: torch.Tensor | None, shape: tuple[int, int, int]) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} is required for this spec: pass a [B, T, H] tensor")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape [B, T, H] = {list(shape)} (got {list(x.shape)})")
    return x.float().contiguous()


def _state(name: str, x: torch.Tensor, n_seq: int, H: int, dv: int, dk: int) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0).expand(n_seq, H, dv, dk)  # broadcast [H, dv, dk]; autograd sums back
    if tuple(x.shape) != (n_seq, H, dv, dk):
        raise ValueError(
            f"initial_state[{name!r}] must be [{n_seq}, {H}, {dv}, {dk}] or [{H}, {dv}, {dk}] (got {list(x.shape)})"
        )
    return x.float().contiguous()


def prepare(spec, q, k, v, alpha, eta, delta, mu, initial_state, cu_seqlens) -> LinearInputs:
    """Check shapes/keys and return contiguous tensors; gates become fp32 log-gates so the
    kernels work with cumulative sums (autograd differentiates the ``log`` here)."""
    if spec.memory != "linear":
        raise ValueError(f"kernels.miras_linear handles memory='linear' only (got {spec.memory!r})")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be [B, T, H, dk] and v [B, T, H, dv] (got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)})"
        )
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    gshape = (B, T, H)
    la = torch.log(_gate("alpha", alpha, gshape)) if spec.needs_alpha else None
    lmu = torch.log(_gate("mu", mu, gshape)) if spec.needs_mu else None
    eta_ = _gate("eta", eta, gshape)
    delta_ = _gate("delta", delta, gshape) if spec.needs_delta else None
    cu = None
    n_seq = B
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, B, T)
        n_seq = cu.numel() - 1
    h0 = s0 = None
    if initial_state is not None:
        missing = [key for key in spec.state_keys() if key not in initial_state]
        if missing:
            raise ValueError(f"initial_state is missing {missing}: pass every key of spec.state_keys() = {list(spec.state_keys())}")
        h0 = _state("W", initial_state["W"], n_seq, H, dv, dk)
        if spec.needs_mu:
            s0 = _state("S_W", initial_state["S_W"], n_seq, H, dv, dk)
    return LinearInputs(
        q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), la=la, lmu=lmu, eta=eta_, delta=delta_,
        h0=h0, s0=s0, cu_seqlens=cu, n_seq=n_seq,
    )
