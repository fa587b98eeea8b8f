"""Token-recurrent Triton kernel for the MLP memory (decoding; forward only).

One program per (sequence, head) walks its tokens one by one with matrix-vector products (no
``tl.dot``: one token at a time), keeping the state in global fp32 buffers tiled by ``BH`` rows
of the hidden dimension. Same chunk semantics as the training path and the token loop
(``miras_kernels/pytorch/recurrent.py``, ``docs/semantics.md``): every inner gradient is taken at the weights frozen at the
last chunk start, ``W_{t0} = materialize(X_{t0})``; the state's free variable ``X`` follows the
affine update (``alpha`` decay, momentum ``S``); the read after the write uses
``materialize(X_t)``. ``chunk_size=1`` is the exact per-token rule.

Every retention of the grid (constexpr ``RET``):

* 0 ``none``/``decay``: ``W = X``.
* 1 ``lq`` (Moneta): ``W = s X`` with one scalar per matrix and head, ``s = (||X||_q + eps)^(2-q)``
  (q-norm over both dims; ``LQQ`` = q, constexpr). The norm of ``X_t`` is accumulated while the
  update pass stores the new tiles (no extra pass); the read scales ``W2 q`` by ``s2`` and the
  ``W1`` product by ``s1``. The sum ``sum |X|^q`` is kept as ``m^q * sum |X/m|^q`` with the running
  max-abs ``m`` (online, like the online softmax): in fp32 ``|X|^4`` leaves the normal range below
  ``|X| ~ 3e-10`` and is 0 below ``~1e-11`` (denormals flush to zero on the GPU), which would give
  ``s = eps^(2-q)`` instead of ``(||X||_q + eps)^(2-q)`` for tiny states when ``lq_eps`` is small.
* 2 ``kl`` (Memora): ``W = c softmax(X)`` over the last (input) dim. ``W2`` ``[E, D]``: its rows lie
  in one ``[BH, D]`` tile. ``W1`` ``[D, E]``: its rows span all hidden blocks, so the read keeps a
  running row max, row sum and numerator (length ``D``) across the blocks (flash-attention style);
  the row max/sum of ``X_t`` are also what the next chunk start needs.

Frozen weights: with ``chunk_size > 1`` a chunk start stores ``materialize(X)`` to the ``f``
buffers (the returned ``chunk_start_W1/W2`` are these materialised weights, for any retention);
with ``chunk_size == 1`` the frozen weights are those of the live state and are materialised on the
fly from ``X`` and the norms / row statistics kept from the previous token's read (no copy).
To continue mid-chunk (decoding after a prefill whose length is not a multiple of the chunk size)
pass ``position`` (tokens since the state's chunk grid origin) and the frozen (materialised)
weights as ``initial_state["chunk_start_W1"/"chunk_start_W2"]``; the returned final state carries
them when ``chunk_size > 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miras_kernels.common.codes import BIAS_CODES, RETENTION_CODES, bias_scalar
from miras_kernels.common.fresh import fresh_empty_like
from miras_kernels.common.mlp_tiles import (absq2, bias_grad, gelu, gelu_d, lq_scale, qroot, row_stats,
    softmax_read_step)
from miras_kernels.configs import mlp_recurrent_block
from miras_kernels.inputs import validate_inputs


@triton.jit
def _qacc(m, ssum, X, LQQ: tl.constexpr):
    """Online max-abs-scaled q-power sum over the tiles seen so far: ``sum |X|^q = m^q * ssum``
    with ``m`` the running max |X|; returns the updated ``(m, ssum)`` (scalars)."""
    mn = tl.maximum(m, tl.max(tl.max(tl.abs(X), axis=1), axis=0))
    inv = 1.0 / tl.where(mn > 0, mn, 1.0)   # all-zero so far: X = 0, any scale
    r = m * inv
    y = X * inv
    return mn, ssum * r * r * absq2(r, LQQ) + tl.sum(tl.sum(y * y * absq2(y, LQQ), axis=1), axis=0)


@triton.jit
def _mat2(X, sc, kc, RET: tl.constexpr):
    """A [BH, D] tile of W2 from its free variable (whole rows): identity, lq (times the scalar
    ``sc``) or kl (``c`` softmax over the row)."""
    if RET == 1:
        X = X * sc
    elif RET == 2:
        P = tl.exp(X - tl.max(X, axis=1)[:, None])
        X = P * (kc / tl.sum(P, axis=1))[:, None]
    return X


@triton.jit
def _mat1(X, sc, rm, rc, RET: tl.constexpr):
    """A [D, BH] tile of W1 from its free variable: identity, lq (times ``sc``) or kl with the
    rows' max ``rm`` [D] and ``c / sum exp(X - rm)`` ``rc`` [D] over the whole row."""
    if RET == 1:
        X = X * sc
    elif RET == 2:
        X = tl.exp(X - rm[:, None]) * rc[:, None]
    return X


# pos0 (tokens already consumed) changes with every decoding call: unspecialised, one compile
@triton.jit(do_not_specialize=["pos0"])
def mlp_recurrent_kernel(
    q, k, v, la, eta, dlt, lmu, y,
    x1, x2, s1, s2, f1, f2,               # live state [N, H, D, E] / [N, H, E, D]; frozen copies f*
    cu, p, pos0, lqe, kc,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BH: tl.constexpr, C: tl.constexpr,
    BIAS: tl.constexpr, MOMENTUM: tl.constexpr, RET: tl.constexpr, LQQ: tl.constexpr,
):
    """Grid ``(N * H,)``. q, k, v, y ``[T_total, H, D]``; gates ``[T_total, H]`` (log alpha, eta,
    Huber delta, log mu); state and frozen buffers fp32 as above (``f* = x*`` when C == 1); ``cu``
    ``[N + 1]`` token offsets; ``p`` the l_p exponent, ``lqe`` lq's eps, ``kc`` kl's c."""
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    od = tl.arange(0, D)
    oh = tl.arange(0, BH)
    base = i_nh.to(tl.int64) * (D * E)
    # what materialize needs of the current X (carried token to token): lq the q-norms n1, n2;
    # kl the row max rm1 and row sum rl1 of X1 (X2's rows are whole in a tile)
    n1 = lqe * 0.0
    n2 = lqe * 0.0
    rm1 = tl.full([D], -1e30, dtype=tl.float32)
    rl1 = tl.zeros([D], dtype=tl.float32)
    if RET != 0:
        if pos0 % C == 0:   # skipped mid-chunk: the first freeze then follows a read, which refreshes them
            m1 = lqe * 0.0
            m2 = lqe * 0.0
            a1 = lqe * 0.0
            a2 = lqe * 0.0
            for jb in range(0, E, BH):
                X1 = tl.load(x1 + base + od[:, None] * E + (jb + oh)[None, :])
                if RET == 1:
                    m1, a1 = _qacc(m1, a1, X1, LQQ)
                    m2, a2 = _qacc(m2, a2, tl.load(x2 + base + (jb + oh)[:, None] * D + od[None, :]), LQQ)
                else:
                    rm1, rl1 = row_stats(rm1, rl1, X1)
            if RET == 1:
                n1 = m1 * qroot(a1, LQQ)
                n2 = m2 * qroot(a2, LQQ)
    for t in range(bos, eos):
        ti = tl.cast(t, tl.int64)
        xo = ti * (H * D) + h * D + od
        go = ti * H + h
        qv = tl.load(q + xo).to(tl.float32)
        kv = tl.load(k + xo).to(tl.float32)
        vv = tl.load(v + xo).to(tl.float32)
        a = tl.exp(tl.load(la + go))
        et = tl.load(eta + go)
        dl = tl.load(dlt + go)
        m = tl.exp(tl.load(lmu + go))
        # materialisation of the current X (used at a chunk start, or on the fly when C == 1)
        fs1 = lq_scale(n1, lqe, LQQ)
        fs2 = lq_scale(n2, lqe, LQQ)
        fc1 = kc / tl.where(rl1 > 0, rl1, 1.0)   # rl1 = 0 only where kl's stats are unused
        if C > 1:
            if (pos0 + t - bos) % C == 0:
                # chunk start: freeze the weights the gradients of this chunk are taken at
                for jb in range(0, E, BH):
                    o2 = (jb + oh)[:, None] * D + od[None, :]
                    o1 = od[:, None] * E + (jb + oh)[None, :]
                    tl.store(f2 + base + o2, _mat2(tl.load(x2 + base + o2), fs2, kc, RET))
                    tl.store(f1 + base + o1, _mat1(tl.load(x1 + base + o1), fs1, rm1, fc1, RET))
                tl.debug_barrier()
        # inner forward at the frozen weights on the key
        o = tl.zeros([D], dtype=tl.float32)
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            F2 = tl.load(f2 + base + o2)
            F1 = tl.load(f1 + base + o1)
            if C == 1:   # f* = x*: the live state's weights
                F2 = _mat2(F2, fs2, kc, RET)
                F1 = _mat1(F1, fs1, rm1, fc1, RET)
            z = tl.sum(F2 * kv[None, :], axis=1)
            o += tl.sum(F1 * gelu(z)[None, :], axis=1)
        mean = tl.sum(o, axis=0) / D
        oc = o - mean
        rstd = 1.0 / tl.sqrt(tl.sum(oc * oc, axis=0) / D + 1e-5)
        xh = oc * rstd
        e2 = (kv + xh - vv)[None, :]
        u = tl.sum(bias_grad(e2, vv[None, :], dl + tl.zeros([1], dtype=tl.float32), p, BIAS), axis=0)
        do = rstd * (u - tl.sum(u, axis=0) / D - xh * tl.sum(u * xh, axis=0) / D)
        # gradient outer products and the state update, block by block (lq: q-norms of the new X)
        m1 = lqe * 0.0
        m2 = lqe * 0.0
        a1 = lqe * 0.0
        a2 = lqe * 0.0
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            if C == 1:   # f* = x*: one load gives the state and (materialised) its weights
                X2 = tl.load(x2 + base + o2)
                X1 = tl.load(x1 + base + o1)
                F2 = _mat2(X2, fs2, kc, RET)
                F1 = _mat1(X1, fs1, rm1, fc1, RET)
            else:
                F2 = tl.load(f2 + base + o2)
                F1 = tl.load(f1 + base + o1)
            z = tl.sum(F2 * kv[None, :], axis=1)
            hb = gelu(z)
            dz = tl.sum(F1 * do[:, None], axis=0) * gelu_d(z)
            g2 = dz[:, None] * kv[None, :]
            g1 = do[:, None] * hb[None, :]
            if C > 1:
                # loaded after the gradient: loading X with F made ptxas spill 8 bytes at d = 128 on sm_80
                X2 = tl.load(x2 + base + o2)
                X1 = tl.load(x1 + base + o1)
            if MOMENTUM:
                S2 = m * tl.load(s2 + base + o2) - et * g2
                S1 = m * tl.load(s1 + base + o1) - et * g1
                tl.store(s2 + base + o2, S2)
                tl.store(s1 + base + o1, S1)
                X2 = a * X2 + S2
                X1 = a * X1 + S1
            else:
                X2 = a * X2 - et * g2
                X1 = a * X1 - et * g1
            tl.store(x2 + base + o2, X2)
            tl.store(x1 + base + o1, X1)
            if RET == 1:
                m2, a2 = _qacc(m2, a2, X2, LQQ)
                m1, a1 = _qacc(m1, a1, X1, LQQ)
        tl.debug_barrier()
        if RET == 1:
            n1 = m1 * qroot(a1, LQQ)
            n2 = m2 * qroot(a2, LQQ)
        # read after write with the updated weights (kl: online softmax of W1's rows)
        rs2 = lq_scale(n2, lqe, LQQ)
        oq = tl.zeros([D], dtype=tl.float32)
        rm = tl.full([D], -1e30, dtype=tl.float32)
        rl = tl.zeros([D], dtype=tl.float32)
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            zq = tl.sum(_mat2(tl.load(x2 + base + o2), rs2, kc, RET) * qv[None, :], axis=1)
            hq = gelu(zq)
            X1 = tl.load(x1 + base + o1)
            if RET == 2:
                rm, rl, oq = softmax_read_step(rm, rl, oq, X1, hq)
            else:
                oq += tl.sum(X1 * hq[None, :], axis=1)
        if RET == 1:
            oq = oq * lq_scale(n1, lqe, LQQ)
        elif RET == 2:
            oq = oq * (kc / rl)
            rm1 = rm
            rl1 = rl
        mq = tl.sum(oq, axis=0) / D
        oqc = oq - mq
        rq = 1.0 / tl.sqrt(tl.sum(oqc * oqc, axis=0) / D + 1e-5)
        tl.store(y + xo, (qv + oqc * rq).to(y.dtype.element_ty))
        tl.debug_barrier()


def fused_recurrent_miras_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                              eta: torch.Tensor, *, spec, chunk_size: int = 1, delta: torch.Tensor | None = None,
                              mu: torch.Tensor | None = None, initial_state: dict[str, torch.Tensor],
                              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                              position: int = 0):
    """Token-recurrent MLP-memory read/write for decoding (no autograd), every retention (none,
    decay, lq with any q >= 2, kl with any c > 0), bias and learner of the grid.

    Args: as :func:`miras_kernels.miras_mlp.chunk_miras_mlp` (q, k, v ``[B, T, H, D]``; gates
        ``[B, T, H]``; ``initial_state`` ``{"W1": [N, H, D, E] or [H, D, E], "W2": ...}``: the
        retention's free variables ``X``, i.e. lq's accumulators and kl's logits), plus
        ``position``: tokens already consumed since the state's chunk grid origin (mid-chunk
        continuation needs ``initial_state["chunk_start_W1"/"chunk_start_W2"]``, the frozen
        *materialised* weights ``materialize(X_{t0})`` returned by the previous call).
    Returns:
        ``(y [B, T, H, D], final_state | None)``; ``final_state`` holds the free variables (and
        ``S_W1/S_W2`` with momentum) and, when ``chunk_size > 1``, ``chunk_start_W1/W2`` (the
        materialised weights frozen at the last chunk start).
    """
    if spec.memory != "mlp":
        raise ValueError(f"fused_recurrent_miras_mlp: needs memory='mlp' (got {spec.memory!r}); "
                         "use miras_kernels.miras_linear.fused_recurrent_miras_linear")
    if q.dim() != 4 or q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"fused_recurrent_miras_mlp: q must be [B, T, H, D] with D in 16/32/64/128 (got {tuple(q.shape)})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, alpha, eta, delta, mu, *initial_state.values())):
        raise ValueError("fused_recurrent_miras_mlp is forward-only (decoding): call it under torch.no_grad() "
                         "or train with chunk_miras_mlp")
    # the frozen chunk-start weights are this kernel's own state keys; the rest is the operator's contract
    frozen = {key: t for key, t in initial_state.items() if key.startswith("chunk_start_")}
    checked = validate_inputs(q, k, v, alpha, eta, spec=spec, chunk_size=chunk_size, delta=delta, mu=mu,
                              initial_state={key: t for key, t in initial_state.items() if key not in frozen},
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    B, T, H, D = q.shape
    E = D * int(spec.expansion)
    dev = q.device
    N = checked.n_states
    if cu_seqlens is None:
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
    else:
        cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()

    def _st(name: str, shape: tuple[int, int]) -> torch.Tensor:
        """A state buffer ``[N, H, *shape]`` fp32 the kernel may update in place."""
        if name in frozen:
            x = frozen[name].detach().float()
            x = x.unsqueeze(0) if x.dim() == 3 else x
            if tuple(x.shape[-2:]) != shape or x.shape[1] != H or x.shape[0] not in (1, N):
                raise ValueError(f"initial_state[{name!r}] must be [{N}, {H}, {shape[0]}, {shape[1]}] or [{H}, ...]")
            x = x.expand(N, H, *shape).contiguous()
            source = frozen[name]
        else:
            x = checked.state_or_zeros(name).detach().float().contiguous()
            source = checked.initial_state.get(name)
        # the kernel updates the state in place: never the caller's tensor
        return x.clone() if source is not None and x.data_ptr() == source.data_ptr() else x

    x1, x2 = _st("W1", (D, E)), _st("W2", (E, D))
    momentum = spec.learner == "momentum"
    s1 = _st("S_W1", (D, E)) if momentum else x1
    s2 = _st("S_W2", (E, D)) if momentum else x2
    mid = chunk_size > 1 and position % chunk_size != 0
    if mid and "chunk_start_W1" not in initial_state:
        raise ValueError("position is mid-chunk: pass initial_state['chunk_start_W1'/'chunk_start_W2'] "
                         "(returned in the previous call's final state)")
    if chunk_size == 1:
        f1, f2 = x1, x2  # gradients at the live state's weights (materialised on the fly): the exact rule
    else:
        # the kernel freezes materialize(X) at the first chunk start; materialised here as well so a
        # document without tokens still returns weights, not a free variable, as chunk_start_W*
        f1 = _st("chunk_start_W1", (D, E)) if mid else spec.materialize(x1).clone()
        f2 = _st("chunk_start_W2", (E, D)) if mid else spec.materialize(x2).clone()
    la = torch.zeros(B, T, H, device=dev) if checked.alpha is None else torch.log(checked.alpha.float())
    lmu = torch.log(checked.mu.float()) if momentum else torch.zeros(B, T, H, device=dev)
    dlt = checked.delta.float() if spec.needs_delta else torch.ones(B, T, H, device=dev)
    qf, kf, vf = (x.reshape(B * T, H, D).contiguous() for x in (q, k, v))
    gates = [x.reshape(B * T, H).contiguous() for x in (la, eta.float(), dlt, lmu)]
    y = fresh_empty_like(qf)
    ret = RETENTION_CODES[spec.retention]
    mlp_recurrent_kernel[(N * H,)](
        qf, kf, vf, *gates, y, x1, x2, s1, s2, f1, f2, cu, bias_scalar(spec), int(position),
        float(spec.lq_eps), float(spec.c),
        H=H, D=D, E=E, BH=mlp_recurrent_block(D, int(spec.expansion), ret), C=int(chunk_size), BIAS=BIAS_CODES[spec.bias],
        MOMENTUM=momentum, RET=ret, LQQ=float(spec.q) if ret == 1 else 4.0, num_warps=4, num_stages=1,
    )
    final = None
    if output_final_state:
        final = {"W1": x1, "W2": x2}
        if momentum:
            final.update(S_W1=s1, S_W2=s2)
        if chunk_size > 1:
            final.update(chunk_start_W1=f1, chunk_start_W2=f2)
    return y.view(B, T, H, D), final
