"""Token-recurrent Triton kernel for the MLP memory (decoding; forward only).

One program per (sequence, head) walks its tokens one by one with matrix-vector products (no
``tl.dot``: one token at a time), keeping the state in global fp32 buffers tiled by ``BH`` rows
of the hidden dimension. Same chunk semantics as the training path: every inner gradient is
taken at the weights frozen at the last chunk start (``chunk_size=1`` is the exact per-token rule
of the notes, section 2). To continue mid-chunk (decoding after a prefill whose length is not a
multiple of the chunk size) pass ``position`` (tokens since the state's chunk grid origin) and the
frozen weights as ``initial_state["chunk_start_W1"/"chunk_start_W2"]``; the returned final state
carries them when ``chunk_size > 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import BIAS_CODES, _bias_grad, _gelu, _gelu_d


@triton.jit
def _mlp_recurrent_kernel(
    q, k, v, la, eta, dlt, lmu, y,
    x1, x2, s1, s2, f1, f2,               # live state [N, H, D, E] / [N, H, E, D]; frozen copies f*
    cu, p, pos0,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BH: tl.constexpr, C: tl.constexpr,
    BIAS: tl.constexpr, MOMENTUM: tl.constexpr,
):
    i_nh = tl.program_id(0)
    n = i_nh // H
    h = i_nh % H
    bos = tl.load(cu + n)
    eos = tl.load(cu + n + 1)
    od = tl.arange(0, D)
    oh = tl.arange(0, BH)
    base = i_nh.to(tl.int64) * (D * E)
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
        if C > 1:
            if (pos0 + t - bos) % C == 0:
                # chunk start: freeze the weights the gradients of this chunk are taken at
                for jb in range(0, E, BH):
                    o2 = (jb + oh)[:, None] * D + od[None, :]
                    o1 = od[:, None] * E + (jb + oh)[None, :]
                    tl.store(f2 + base + o2, tl.load(x2 + base + o2))
                    tl.store(f1 + base + o1, tl.load(x1 + base + o1))
                tl.debug_barrier()
        # inner forward at the frozen weights on the key
        o = tl.zeros([D], dtype=tl.float32)
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            z = tl.sum(tl.load(f2 + base + o2) * kv[None, :], axis=1)
            o += tl.sum(tl.load(f1 + base + o1) * _gelu(z)[None, :], axis=1)
        mean = tl.sum(o, axis=0) / D
        oc = o - mean
        rstd = 1.0 / tl.sqrt(tl.sum(oc * oc, axis=0) / D + 1e-5)
        xh = oc * rstd
        e2 = (kv + xh - vv)[None, :]
        u = tl.sum(_bias_grad(e2, vv[None, :], dl + tl.zeros([1], dtype=tl.float32), p, BIAS), axis=0)
        do = rstd * (u - tl.sum(u, axis=0) / D - xh * tl.sum(u * xh, axis=0) / D)
        # gradient outer products and the state update, block by block
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            F1 = tl.load(f1 + base + o1)
            z = tl.sum(tl.load(f2 + base + o2) * kv[None, :], axis=1)
            hb = _gelu(z)
            dz = tl.sum(F1 * do[:, None], axis=0) * _gelu_d(z)
            g2 = dz[:, None] * kv[None, :]
            g1 = do[:, None] * hb[None, :]
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
        tl.debug_barrier()
        # read after write with the updated weights
        oq = tl.zeros([D], dtype=tl.float32)
        for jb in range(0, E, BH):
            o2 = (jb + oh)[:, None] * D + od[None, :]
            o1 = od[:, None] * E + (jb + oh)[None, :]
            zq = tl.sum(tl.load(x2 + base + o2) * qv[None, :], axis=1)
            oq += tl.sum(tl.load(x1 + base + o1) * _gelu(zq)[None, :], axis=1)
        mq = tl.sum(oq, axis=0) / D
        oqc = oq - mq
        rq = 1.0 / tl.sqrt(tl.sum(oqc * oqc, axis=0) / D + 1e-5)
        tl.store(y + xo, (qv + oqc * rq).to(y.dtype.element_ty))
        tl.debug_barrier()


def recurrent_block(d: int, e: int) -> int:
    """Hidden rows per tile of the decoding kernel (two [BH, d] weight tiles live at once). 16 from
    d = 64 up: at d = 64, BH = 32 spilled 16 bytes on sm_90 (Huber; ptxas held it to 128 registers)."""
    return min(d * e, 64 if d <= 32 else 16)


def fused_recurrent_miras_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor | None,
                              eta: torch.Tensor, *, spec, chunk_size: int = 1, delta: torch.Tensor | None = None,
                              mu: torch.Tensor | None = None, initial_state: dict[str, torch.Tensor],
                              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                              position: int = 0):
    """Token-recurrent MLP-memory read/write for decoding (no autograd).

    Args: as :func:`kernels.miras_mlp.chunk_miras_mlp` (q, k, v ``[B, T, H, D]``; gates
        ``[B, T, H]``; ``initial_state`` ``{"W1": [N|1, H, D, E] or [H, D, E], "W2": ...}``), plus
        ``position``: tokens already consumed since the state's chunk grid origin (mid-chunk
        continuation needs ``initial_state["chunk_start_W1"/"chunk_start_W2"]``).
    Returns:
        ``(y [B, T, H, D], final_state | None)``; ``final_state`` also holds ``chunk_start_W1/W2``
        when ``chunk_size > 1``.
    """
    from .api import supports  # local: api imports this module's siblings only

    if spec.memory != "mlp" or spec.retention not in ("none", "decay"):
        ok, why = supports(spec, q, chunk_size=16, initial_state=initial_state)
        if ok:  # covered by the chunk (training) kernels, not by this decoding kernel
            why = (f"retention={spec.retention!r} has no MLP decoding kernel yet (the chunk kernels cover "
                   "it for training); decode with miras_memory(backend='recurrent')")
        raise ValueError(f"fused_recurrent_miras_mlp: {why}")
    if q.dim() != 4 or q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"fused_recurrent_miras_mlp: q must be [B, T, H, D] with D in 16/32/64/128 (got {tuple(q.shape)})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    B, T, H, D = q.shape
    E = D * int(spec.expansion)
    dev = q.device
    if cu_seqlens is None:
        N = B
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (got B={B})")
        cu = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        N = cu.numel() - 1

    def _st(name, shape, required=True):
        if name not in initial_state:
            if required:
                raise ValueError(f"initial_state lacks {name!r} (needed: {spec.state_keys()})")
            return torch.zeros(N, H, *shape, dtype=torch.float32, device=dev)
        x = initial_state[name].detach().float()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if tuple(x.shape[-2:]) != shape or x.shape[1] != H or x.shape[0] not in (1, N):
            raise ValueError(f"initial_state[{name!r}] must be [{N}, {H}, {shape[0]}, {shape[1]}] or [{H}, ...]")
        return x.expand(N, H, *shape).contiguous()

    x1, x2 = _st("W1", (D, E)), _st("W2", (E, D))
    momentum = spec.learner == "momentum"
    s1 = _st("S_W1", (D, E), False) if momentum else x1
    s2 = _st("S_W2", (E, D), False) if momentum else x2
    mid = chunk_size > 1 and position % chunk_size != 0
    if mid and "chunk_start_W1" not in initial_state:
        raise ValueError("position is mid-chunk: pass initial_state['chunk_start_W1'/'chunk_start_W2'] "
                         "(returned in the previous call's final state)")
    if chunk_size == 1:
        f1, f2 = x1, x2  # gradients at the live weights: the exact per-token rule
    else:
        f1 = _st("chunk_start_W1", (D, E)) if mid else x1.clone()
        f2 = _st("chunk_start_W2", (E, D)) if mid else x2.clone()
    la = torch.zeros(B, T, H, device=dev) if spec.retention == "none" else torch.log(alpha.float())
    lmu = torch.log(mu.float()) if momentum else torch.zeros(B, T, H, device=dev)
    dlt = delta.float() if spec.needs_delta else torch.ones(B, T, H, device=dev)
    qf, kf, vf = (x.reshape(B * T, H, D).contiguous() for x in (q, k, v))
    gates = [x.reshape(B * T, H).contiguous() for x in (la, eta.float(), dlt, lmu)]
    y = torch.empty_like(qf)
    _mlp_recurrent_kernel[(N * H,)](
        qf, kf, vf, *gates, y, x1, x2, s1, s2, f1, f2, cu, float(spec.p), int(position),
        H=H, D=D, E=E, BH=recurrent_block(D, int(spec.expansion)), C=int(chunk_size), BIAS=BIAS_CODES[spec.bias],
        MOMENTUM=momentum, num_warps=4, num_stages=1,
    )
    final = None
    if output_final_state:
        final = {"W1": x1, "W2": x2}
        if momentum:
            final.update(S_W1=s1, S_W2=s2)
        if chunk_size > 1:
            final.update(chunk_start_W1=f1, chunk_start_W2=f2)
    return y.view(B, T, H, D), final
