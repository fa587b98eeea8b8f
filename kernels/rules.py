"""Closed forms of the Miras inner loop shared by every backend.

Everything here is written with plain differentiable torch ops (no ``torch.autograd.grad``),
so the memory operator as a whole stays differentiable by ordinary autograd with respect to
q, k, v, all gates and the initial state: second-order terms (the inner gradient depends on
k, v and the weights) flow through ``u``, ``do``, ``dz`` like any other activation.

Per-token gradients of the inner loss are returned as outer-product factors: for every weight
matrix ``W`` of shape ``[r, c]`` the gradient of token ``i`` is ``g_i = a_i b_iᵀ`` with
``a_i`` of size ``r`` and ``b_i`` of size ``c``. Both backends consume these factors: the
token loop forms ``g_i`` explicitly, the chunked form never does for affine retentions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .spec import MEMORY_LN_EPS, SMOOTH_ABS_EPS, MirasSpec

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Apply = Callable[[str, torch.Tensor], torch.Tensor]


def gelu(z: torch.Tensor) -> torch.Tensor:
    """Exact (erf) gelu, the MLP memory's activation (``docs/semantics.md``)."""
    return F.gelu(z)


def gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    """d gelu / dz = Phi(z) + z * phi(z) (exact erf form)."""
    cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf


def layer_norm(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain layer norm over the last dim (eps 1e-5, no affine). Returns (normalised, 1/std)."""
    centred = o - o.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + MEMORY_LN_EPS)
    return centred * rstd, rstd


def layer_norm_backward(n: torch.Tensor, rstd: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """dL/do for n = LN(o), given dL/dn = u, the normalised output n and rstd = 1/std."""
    return rstd * (u - u.mean(dim=-1, keepdim=True) - n * (u * n).mean(dim=-1, keepdim=True))


def output_grad(
    spec: MirasSpec, pred: torch.Tensor | None, v: torch.Tensor, delta: torch.Tensor | None
) -> torch.Tensor:
    """u = dl/dM at the memory output for each token.

    Args:
        pred: ``[..., n, dv]`` memory output M(W_{t0}, k_i) (unused, may be None, for ``dot``).
        v: ``[..., n, dv]`` targets.
        delta: ``[..., n]`` Huber thresholds (only ``bias="huber"``).
    """
    if spec.bias == "dot":
        return -v
    e = pred - v
    if spec.bias == "l2":
        return e
    if spec.bias == "lp":
        # smooth |x| ~ sqrt(x^2 + eps) also smooths sign (``docs/semantics.md``, per-bias rules)
        return spec.p * e * (e * e + SMOOTH_ABS_EPS).pow((spec.p - 2.0) / 2.0)
    # Huber (Yaad): l2 branch inside the ball ||e||_2 <= delta, delta-scaled smooth l1 outside.
    d = delta.unsqueeze(-1)
    inside = torch.linalg.vector_norm(e.detach(), dim=-1, keepdim=True) <= d
    return torch.where(inside, e, d * e * torch.rsqrt(e * e + spec.huber_eps))


def grad_factors(
    spec: MirasSpec,
    weights: dict[str, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor | None,
) -> Factors:
    """Outer-product factors of grad_W l(W; k_i, v_i) at frozen weights, for n tokens at once.

    Args:
        weights: materialised weights, ``"W"`` ``[B, H, dv, dk]`` or ``"W1"`` ``[B, H, d, e*d]``
            and ``"W2"`` ``[B, H, e*d, d]``.
        k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]``; delta: ``[B, H, n]`` or None.

    Returns:
        name -> (a ``[B, H, n, rows]``, b ``[B, H, n, cols]``) with g_i = a_i b_iᵀ.
    """
    if spec.memory == "linear":
        w = weights["W"]
        pred = None if spec.bias == "dot" else k @ w.transpose(-1, -2)
        return {"W": (output_grad(spec, pred, v, delta), k)}
    w1, w2 = weights["W1"], weights["W2"]
    z = k @ w2.transpose(-1, -2)
    h = gelu(z)
    o = h @ w1.transpose(-1, -2)
    n, rstd = layer_norm(o)
    pred = None if spec.bias == "dot" else k + n
    u = output_grad(spec, pred, v, delta)
    do = layer_norm_backward(n, rstd, u)
    dz = (do @ w1) * gelu_derivative(z)
    return {"W1": (do, h), "W2": (dz, k)}


def read_memory(spec: MirasSpec, apply: Apply, x: torch.Tensor) -> torch.Tensor:
    """y = M(W_t, x_t) for a block of tokens, given ``apply(name, inp)`` = W_t inp_t per token.

    ``x``: ``[B, H, n, dk]``; returns ``[B, H, n, dv]``.
    """
    if spec.memory == "linear":
        return apply("W", x)
    h = gelu(apply("W2", x))
    o = apply("W1", h)
    return x + F.layer_norm(o, (o.shape[-1],), eps=MEMORY_LN_EPS)


def matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token matrix-vector product: w ``[..., n, r, c]`` and x ``[..., n, c]`` -> ``[..., n, r]``."""
    return (w @ x.unsqueeze(-1)).squeeze(-1)
