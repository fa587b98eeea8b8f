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
    scale: dict[str, torch.Tensor] | None = None,
) -> Factors:
    """Outer-product factors of grad_W l(W; k_i, v_i) at frozen weights, for n tokens at once.

    Args:
        weights: materialised weights, ``"W"`` ``[B, H, dv, dk]`` or ``"W1"`` ``[B, H, d, e*d]``
            and ``"W2"`` ``[B, H, e*d, d]`` shared by the n tokens, or one block per token
            ``[B, H, n, rows, cols]`` (``step_at="retained"`` with ``kl``, see :func:`retained_weights`).
        k: ``[B, H, n, dk]``; v: ``[B, H, n, dv]``; delta: ``[B, H, n]`` or None.
        scale: optional per-token factor of shared weights: token i's gradient is taken at
            ``scale_i * W`` (``[B, H, n]``, or ``[B, H, n, cols]`` scaling the columns of a linear
            memory); None means 1.

    Returns:
        name -> (a ``[B, H, n, rows]``, b ``[B, H, n, cols]``) with g_i = a_i b_iᵀ.
    """
    def lam(name: str) -> torch.Tensor | None:
        return None if scale is None else scale[name]

    def forward(name: str, x: torch.Tensor) -> torch.Tensor:
        # (scale_i * W) x_i for every token, without forming the scaled matrices
        w, s = weights[name], lam(name)
        if w.dim() == 5:
            return matvec(w, x)
        if s is not None and s.dim() == 4:  # per column: W diag(s_i) x_i = W (s_i * x_i)
            return (x * s) @ w.transpose(-1, -2)
        out = x @ w.transpose(-1, -2)
        return out if s is None else out * s.unsqueeze(-1)

    if spec.memory == "linear":
        pred = None if spec.bias == "dot" else forward("W", k)
        return {"W": (output_grad(spec, pred, v, delta), k)}
    z = forward("W2", k)
    h = gelu(z)
    o = forward("W1", h)
    n, rstd = layer_norm(o)
    pred = None if spec.bias == "dot" else k + n
    u = output_grad(spec, pred, v, delta)
    do = layer_norm_backward(n, rstd, u)
    w1, s1 = weights["W1"], lam("W1")
    if w1.dim() == 5:
        back = matvec(w1.transpose(-1, -2), do)
    else:
        back = do @ w1 if s1 is None else (do @ w1) * s1.unsqueeze(-1)
    dz = back * gelu_derivative(z)
    return {"W1": (do, h), "W2": (dz, k)}


def retain(alpha_t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """One token's retention of a free variable: ``alpha_t * x``. alpha ``[B, H]`` (per head) or
    ``[B, H, dk]`` (per key channel: scales the columns of ``x`` ``[B, H, r, c]``); None means
    alpha = 1 (retention ``none``)."""
    if alpha_t is None:
        return x
    if alpha_t.dim() == 3:
        return alpha_t[:, :, None, :] * x
    return alpha_t[:, :, None, None] * x


def retained_weights(
    spec: MirasSpec, X0: dict[str, torch.Tensor], gamma: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Where ``step_at="retained"`` takes the gradient of each token of a mini-batch chunk:
    ``materialize(gamma_i * X0)``, the chunk-start free variable carried to token i by the
    retention alone (``gamma_i = prod_{j <= i} alpha_j`` over the chunk so far).

    Args:
        X0: free variable per weight name, ``[B, H, rows, cols]``.
        gamma: ``[B, H, n]``, or per key channel ``[B, H, n, cols]`` (linear memory).

    Returns:
        ``(weights, scale)`` for :func:`grad_factors`. For ``decay`` and ``lq`` the retained weights
        are a per-token multiple of ``X0`` (``lq``: ``gamma * s(gamma X0)`` with Moneta's scale
        ``s``, whose norm of ``gamma X0`` is ``gamma ||X0||_q``), so ``weights = X0`` and ``scale``
        holds the multiples -- no per-token matrices. ``kl`` (``c * softmax(gamma_i Z0)``) has no
        such form: ``weights`` are per-token blocks ``[B, H, n, rows, cols]`` and ``scale`` is None.
    """
    channel = gamma.dim() == 4
    if spec.retention == "kl":
        g = gamma[:, :, :, None, :] if channel else gamma[..., None, None]
        return {n: spec.materialize(g * x.unsqueeze(2)) for n, x in X0.items()}, None
    if spec.weights_are_state:  # none / decay (and lq with q = 2): W = X
        return dict(X0), {n: gamma for n in X0}
    scale = {}
    for n, x in X0.items():
        if channel:
            # ||X0 diag(g)||_q^q = sum_c g_c^q sum_r |X0_rc|^q: one small matmul per token
            col = x.abs().pow(spec.q).sum(dim=-2)  # [B, H, cols]
            nq = (gamma.pow(spec.q) * col.unsqueeze(2)).sum(-1)
            # clamped so that the gradient of the root stays finite at X0 = 0
            norm = nq.clamp_min(torch.finfo(nq.dtype).tiny).pow(1.0 / spec.q)
            scale[n] = gamma * (norm + spec.lq_eps).pow(2.0 - spec.q).unsqueeze(-1)
        else:
            norm = spec.lq_norm(x).squeeze(-1)  # [B, H, 1]
            scale[n] = gamma * (gamma * norm + spec.lq_eps).pow(2.0 - spec.q)
    return dict(X0), scale


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
