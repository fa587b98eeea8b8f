"""Triton MLP-memory kernels (kernels/miras_mlp) against an independent token loop.

Numerics run in the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py). The reference
below is a plain token loop in float64 that takes every inner gradient with torch.autograd at the
chunk-start weights (``create_graph=True`` so the outer gradients are exact) -- it shares no code
with the kernels' hand-written second-order backward.

Tolerances (written down here, see ``_close``): fp32 kernel vs float64 loop: max abs error
<= 2e-4 * (max |reference| + 1) for outputs, states and every gradient (observed ~1e-6 relative);
Huber (Yaad) 1e-3: its l1 branch has curvature delta*eps/(e^2+eps)^1.5 ~ 1e3*delta near e_j = 0,
which amplifies fp32 rounding of e in the second-order gradient terms (observed ~4e-4);
bf16 inputs: 3e-2 * (max |ref| + 1) (bf16 output rounding is ~4e-3 relative).
On a GPU (MIRAS_TEST_DEVICE=cuda, miras_pretrain/testing/devices.py) the kernels run compiled on
the test device and the float64 reference stays on the CPU. The GPU run sets MIRAS_EXACT_FP32=1
(exact fp32 dots), so the bounds are the same there; with TF32 dots (fp32_dots_exact() False) every
bound is raised to TF32_TOL = 3e-2, the bf16 bound: TF32 rounds each dot operand to a 10-bit
mantissa (unit roundoff 4.9e-4), 8x finer than bf16 inputs (3.9e-3), which that bound already
covers -- a factor of 150 over 2e-4 (30 over Huber's 1e-3).
The lq retention (Moneta; lq + momentum; q = 3) uses the same bounds (observed max err / (max|ref|
+ 1): 9e-7 moneta fp32, 2e-6 lq + momentum fp32, 2.8e-3 moneta bf16): its oracle materialises
W = X (||X||_q + eps)^(2-q) per token (``_weights``).
The kl retention (Memora: c * softmax_rows(Z)) uses the same bounds; its oracle materialises the
softmax weights per token (``_weights``) (observed max err / (max|ref| + 1): 2.1e-5 fp32 -- the
exponentials amplify fp32 rounding ~10x over the affine retentions; the PyTorch chunked operator in
fp32 is off by the same 1-3e-5 on these inputs --, 6e-6 at C = 64, 3.7e-3 bf16).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from miras_kernels import supports
from miras_kernels.miras_mlp import chunk_miras_mlp, fused_recurrent_miras_mlp
from miras_kernels import miras_memory
from miras_kernels.spec import MirasSpec
from miras_pretrain.testing.devices import fp32_dots_exact, on_gpu, test_device as device_under_test

pytestmark = pytest.mark.triton

NAMES = ("q", "k", "v", "alpha", "eta", "delta", "mu", "W1", "W2", "S_W1", "S_W2")
# where the kernels run (the CPU interpreter, or a GPU under MIRAS_TEST_DEVICE=cuda)
DEV = device_under_test()
# every bound when fp32 dots are TF32 on a GPU (module docstring)
TF32_TOL = 3e-2
# head dim of the small-shape tests: 16 in the interpreter; on a GPU only the AOT-checked shipped
# configurations run (configs.MLP_SHIPPED, smallest head dim 32), so the same tests use 32 there
HD = 32 if on_gpu() else 16


def dot_tol(tol: float) -> float:
    """``tol`` with exact fp32 dots (the interpreter; a GPU under MIRAS_EXACT_FP32=1), else the
    TF32 bound (module docstring)."""
    return tol if fp32_dots_exact() else max(tol, TF32_TOL)


# ----------------------------------------------------------------------------- reference
def _mem(W1, W2, x):
    """M(x) = x + LN(W1 gelu(W2 x)); W1 [H, D, E], W2 [H, E, D], x [H, D]."""
    o = torch.einsum("hde,he->hd", W1, F.gelu(torch.einsum("hed,hd->he", W2, x)))
    return x + F.layer_norm(o, o.shape[-1:], eps=1e-5)


def _bias_u(spec, e, v, delta):
    if spec.bias == "dot":
        return -v
    if spec.bias == "l2":
        return e
    if spec.bias == "lp":
        return spec.p * e * (e * e + 1e-6).pow((spec.p - 2) / 2)
    big = e.norm(dim=-1, keepdim=True) > delta[:, None]
    return torch.where(big, delta[:, None] * e * (e * e + spec.huber_eps).rsqrt(), e)


def _weights(spec, X):
    """The weights of the free variable X [H, r, c]: identity, Moneta's W = X (||X||_q + eps)^(2-q)
    (q-norm over all entries of each head's matrix) or Memora's W = c exp(X) / sum_row exp(X) (over
    the last dim), written out here independently of MirasSpec."""
    if spec.retention == "kl":
        ex = torch.exp(X - X.amax(dim=-1, keepdim=True))
        return spec.c * ex / ex.sum(dim=-1, keepdim=True)
    if spec.retention != "lq":
        return X
    n = X.abs().pow(spec.q).sum(dim=(-2, -1), keepdim=True).pow(1.0 / spec.q)
    return X * (n + spec.lq_eps).pow(2.0 - spec.q)


def token_loop(spec, C, q, k, v, alpha, eta, delta, mu, st):
    """One sequence, token by token: q, k, v [T, H, D]; gates [T, H]; st {name: [H, r, c]} (the
    free variables). Gradients at the chunk-start weights, read after write. Returns (y [T, H, D],
    final dict)."""
    W1, W2 = st["W1"], st["W2"]
    S1, S2 = st.get("S_W1"), st.get("S_W2")
    ys = []
    for t0 in range(0, q.shape[0], C):
        W10, W20 = _weights(spec, W1), _weights(spec, W2)
        for i in range(t0, min(t0 + C, q.shape[0])):
            m = _mem(W10, W20, k[i])
            u = _bias_u(spec, m - v[i], v[i], delta[i])
            g1, g2 = torch.autograd.grad(m, (W10, W20), grad_outputs=u, create_graph=True)
            a = alpha[i][:, None, None] if spec.retention != "none" else 1.0
            et = eta[i][:, None, None]
            if spec.learner == "momentum":
                S1 = mu[i][:, None, None] * S1 - et * g1
                S2 = mu[i][:, None, None] * S2 - et * g2
                W1, W2 = a * W1 + S1, a * W2 + S2
            else:
                W1, W2 = a * W1 - et * g1, a * W2 - et * g2
            ys.append(_mem(_weights(spec, W1), _weights(spec, W2), q[i]))
    fin = {"W1": W1, "W2": W2}
    if spec.learner == "momentum":
        fin.update(S_W1=S1, S_W2=S2)
    return torch.stack(ys), fin


# ----------------------------------------------------------------------------- helpers
def _inputs(B, T, H, D, e, state_batch=None, dtype=torch.float64):
    E = D * e
    g = {
        "q": F.normalize(torch.randn(B, T, H, D, dtype=dtype), dim=-1),
        "k": F.normalize(torch.randn(B, T, H, D, dtype=dtype), dim=-1),
        "v": torch.randn(B, T, H, D, dtype=dtype),
        "alpha": torch.sigmoid(torch.randn(B, T, H, dtype=dtype) + 3.0),
        "eta": torch.sigmoid(torch.randn(B, T, H, dtype=dtype)) * 0.5,
        "delta": F.softplus(torch.randn(B, T, H, dtype=dtype)) + 0.5,
        "mu": torch.sigmoid(torch.randn(B, T, H, dtype=dtype) + 1.0),
    }
    lead = () if state_batch is None else (state_batch,)
    g["W1"] = torch.randn(*lead, H, D, E, dtype=dtype) / E**0.5
    g["W2"] = torch.randn(*lead, H, E, D, dtype=dtype) / D**0.5
    g["S_W1"] = torch.randn(*lead, H, D, E, dtype=dtype) * 0.01
    g["S_W2"] = torch.randn(*lead, H, E, D, dtype=dtype) * 0.01
    return g


def _state(spec, g):
    return {n: g[n] for n in spec.state_keys()}


def _reference(spec, C, g, cu=None):
    """Token loop over every sequence (or document of the packed batch)."""
    leaves = {n: x.detach().double().requires_grad_() for n, x in g.items()}
    B, T = leaves["q"].shape[:2]
    bounds = [(b, 0, T) for b in range(B)] if cu is None else [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]
    ys, fins = [], []
    for n_doc, (b, s, t) in enumerate(bounds):
        sl = {n: leaves[n][b, s:t] for n in ("q", "k", "v", "alpha", "eta", "delta", "mu")}
        st = {}
        for name in spec.state_keys():
            x = leaves[name]
            st[name] = x if x.dim() == 3 else x[n_doc if cu is not None else b]
        y, fin = token_loop(spec, C, sl["q"], sl["k"], sl["v"], sl["alpha"], sl["eta"], sl["delta"], sl["mu"], st)
        ys.append(y)
        fins.append(fin)
    y = torch.cat(ys, 0).unsqueeze(0) if cu is not None else torch.stack(ys)
    fin = {n: torch.stack([f[n] for f in fins]) for n in spec.state_keys()}
    return leaves, y, fin


def _kernel(spec, C, g, dtype, cu=None):
    if on_gpu():
        # a configuration the GPU does not ship is refused by chunk_miras_mlp: say so, not pass
        ok, why = supports(spec, g["q"].to(DEV, dtype), chunk_size=C, initial_state=_state(spec, g))
        if not ok:
            pytest.skip(f"not run on the GPU: {why}")
    leaves = {}
    for n, x in g.items():
        t = x.detach().to(device=DEV, dtype=dtype if n in ("q", "k", "v") else torch.float32)
        leaves[n] = t.requires_grad_()
    y, fin = chunk_miras_mlp(
        leaves["q"], leaves["k"], leaves["v"], leaves["alpha"] if spec.needs_alpha else None, leaves["eta"],
        spec=spec, chunk_size=C, delta=leaves["delta"] if spec.needs_delta else None,
        mu=leaves["mu"] if spec.needs_mu else None, initial_state=_state(spec, leaves),
        output_final_state=True, cu_seqlens=None if cu is None else cu.to(DEV),
    )
    return leaves, y, fin


def _used(spec):
    used = ["q", "k", "v", "eta", *spec.state_keys()]
    if spec.needs_alpha:
        used.append("alpha")
    if spec.needs_delta:
        used.append("delta")
    if spec.needs_mu:
        used.append("mu")
    return used


def _close(name, got, ref, tol):
    """max |got - ref| <= dot_tol(tol) * (max |ref| + 1), compared on the CPU in float64."""
    ref = ref.detach().double().cpu()
    err = (got.detach().double().cpu() - ref).abs().max().item()
    bound = dot_tol(tol) * (ref.abs().max().item() + 1.0)
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def _check(spec, C, g, dtype=torch.float32, cu=None, tol=2e-4):
    """Forward, final state and every gradient (random cotangents on y and the final state)."""
    if dtype != torch.float32:
        # the reference sees exactly the rounded inputs the kernel sees
        g = {n: (x.to(dtype).double() if n in ("q", "k", "v") else x) for n, x in g.items()}
    rl, ry, rfin = _reference(spec, C, g, cu)
    kl, ky, kfin = _kernel(spec, C, g, dtype, cu)
    assert ky.dtype == dtype and ky.shape == ry.shape
    _close("y", ky, ry, tol)
    for n in spec.state_keys():
        assert kfin[n].shape == rfin[n].shape, (n, kfin[n].shape, rfin[n].shape)
        _close(f"final {n}", kfin[n], rfin[n], tol)
    cot_y = torch.randn_like(ry)
    cot = {n: torch.randn_like(rfin[n]) for n in spec.state_keys()}
    used = _used(spec)
    rloss = (ry * cot_y).sum() + sum((rfin[n] * cot[n]).sum() for n in cot)
    rgrads = torch.autograd.grad(rloss, [rl[n] for n in used])
    kloss = (ky.float() * cot_y.float().to(DEV)).sum() + sum((kfin[n] * cot[n].float().to(DEV)).sum() for n in cot)
    kgrads = torch.autograd.grad(kloss, [kl[n] for n in used])
    for n, a, b in zip(used, kgrads, rgrads):
        assert a.shape == b.shape, (n, a.shape, b.shape)
        _close(f"d{n}", a, b, tol)


def _tol(spec):
    return 1e-3 if spec.bias == "huber" else 2e-4


SPECS = {
    "ttt_mlp": MirasSpec.preset("ttt_mlp", expansion=2),
    "yaad": MirasSpec.preset("yaad", expansion=2),
    # the Huber smooth-sign constant reaches the kernels (the old 1e-6 vs the default 1e-2)
    "yaad_eps1e-6": MirasSpec.preset("yaad", expansion=2, huber_eps=1e-6),
    "titans": MirasSpec.preset("titans", expansion=2),
    "lp_decay": MirasSpec(memory="mlp", bias="lp", retention="decay", p=3.0, expansion=2),
    "dot_none_momentum": MirasSpec(memory="mlp", bias="dot", retention="none", learner="momentum", expansion=2),
    # Moneta (lp p=3 + lq q=4 with decay): W_t = s_t X_t (kernels/miras_mlp/chunk_lq_kernels.py)
    "moneta": MirasSpec.preset("moneta", expansion=2),
    # lq with q = 3 and l2: the kernels' generic-q branch (|x|^(q-2) by exp2/log2)
    "lq_q3_l2": MirasSpec(memory="mlp", bias="l2", retention="lq", q=3.0, expansion=2),
    # lq with the momentum learner (Titans' rule on the accumulator): S_t tiles in the norm scan
    "lq_momentum": MirasSpec(memory="mlp", bias="l2", retention="lq", learner="momentum", expansion=2),
    # Memora (l2 + kl, gd): W_t = c softmax_rows(Z_t), per-token sweeps (kernels/miras_mlp/chunk_kl_kernels.py);
    # c != 1 exercises the scale
    "memora": MirasSpec.preset("memora", expansion=2, c=1.5),
}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(SPECS))
def test_fp32_matches_token_loop(name):
    """Odd T (last chunk partial), B = 2 with per-sequence initial states, C = 16, e = 2."""
    _check(SPECS[name], 16, _inputs(2, 37, 2, HD, 2, state_batch=2), tol=_tol(SPECS[name]))


@pytest.mark.parametrize("name", ["titans", "moneta", "memora"])
def test_chunk64_expansion4_broadcast_state(name):
    """C = 64 (one partial and one full chunk), e = 4 (hidden 64), [H, ..] initial state."""
    _check(MirasSpec.preset(name), 64, _inputs(1, 70, 1, HD, 4))


@pytest.mark.parametrize("name,dtype", [("yaad", torch.bfloat16), ("yaad", torch.float16), ("titans", torch.bfloat16),
                                        ("moneta", torch.bfloat16), ("memora", torch.bfloat16)])
def test_half_inputs(name, dtype):
    _check(SPECS[name], 16, _inputs(1, 33, 2, HD, 2), dtype=dtype, tol=3e-2)


@pytest.mark.parametrize("name", ["yaad", "titans", "moneta", "memora"])
def test_varlen_documents(name):
    """Packed documents: the state and the chunk grid restart at every document start."""
    cu = torch.tensor([0, 5, 26, 40], dtype=torch.int32)
    g = _inputs(1, 40, 2, HD, 2, state_batch=3 if name in ("titans", "moneta", "memora") else None)
    _check(SPECS[name], 16, g, cu=cu, tol=_tol(SPECS[name]))


@pytest.mark.parametrize("name", ["yaad", "moneta", "lq_momentum", "memora"])
def test_matches_ops_chunked_backend(name):
    """Same answer as the team's PyTorch chunked operator (forward, state and gradients); for
    the lq retention that operator reads through per_token_scan's lq scales."""
    spec = dataclasses.replace(SPECS[name], expansion=4)
    g = _inputs(1, 21, 2, HD, 4)
    kl, ky, kfin = _kernel(spec, 16, g, torch.float32)
    ol = {n: x.detach().float().requires_grad_() for n, x in g.items()}
    oy, ofin = miras_memory(ol["q"], ol["k"], ol["v"], ol["alpha"], ol["eta"], spec=spec, chunk_size=16,
                            delta=ol["delta"] if spec.needs_delta else None, mu=ol["mu"] if spec.needs_mu else None,
                            initial_state=_state(spec, ol), output_final_state=True, backend="chunked")
    _close("y", ky, oy, 1e-4)
    for n in spec.state_keys():
        _close(n, kfin[n], ofin[n], 1e-4)
    cot = torch.randn_like(oy)
    used = _used(spec)
    ga = torch.autograd.grad((ky * cot.to(DEV)).sum() + kfin["W1"].sum(), [kl[n] for n in used])
    gb = torch.autograd.grad((oy * cot).sum() + ofin["W1"].sum(), [ol[n] for n in used])
    for n, a, b in zip(used, ga, gb):
        _close(f"d{n}", a, b, _tol(spec))  # both fp32: Huber's conditioning (see top) dominates


@pytest.mark.parametrize("name", ["yaad", "yaad_eps1e-6", "titans"])
def test_fused_recurrent_matches_token_loop(name):
    """Decoding kernel: chunk size 1 (the exact per-token rule) and chunk size 4, resumed from a
    mid-chunk split, equal the token loop."""
    spec = SPECS[name]
    g = _inputs(2, 11, 2, HD, 2)
    for C in (1, 4):
        _, ry, rfin = _reference(spec, C, g)
        args = {n: x.detach().float().to(DEV) for n, x in g.items()}
        st = _state(spec, args)
        y1, s1 = fused_recurrent_miras_mlp(
            args["q"][:, :6], args["k"][:, :6], args["v"][:, :6], args["alpha"][:, :6], args["eta"][:, :6],
            spec=spec, chunk_size=C, delta=args["delta"][:, :6], mu=args["mu"][:, :6], initial_state=st,
            output_final_state=True)
        y2, s2 = fused_recurrent_miras_mlp(
            args["q"][:, 6:], args["k"][:, 6:], args["v"][:, 6:], args["alpha"][:, 6:], args["eta"][:, 6:],
            spec=spec, chunk_size=C, delta=args["delta"][:, 6:], mu=args["mu"][:, 6:], initial_state=s1,
            output_final_state=True, position=6)
        _close(f"y C={C}", torch.cat([y1, y2], 1), ry, 2e-4)
        for n in spec.state_keys():
            _close(f"{n} C={C}", s2[n], rfin[n], 2e-4)


@pytest.mark.parametrize("name", ["lq_momentum", "memora"])
def test_nan_filled_fresh_buffers(name, monkeypatch):
    """With MIRAS_NAN_EMPTY=1 every buffer the hosts allocate empty (boundary states and momentum,
    scratch, lq norms and d W_0, kl's W_0, y) starts as NaN (kernels/common/fresh.py): the results
    stay equal to the token loop, so no kernel reads a slot before writing it. lq + momentum
    allocates every buffer of the affine/lq path, memora the kl one; the decoding kernel's y too."""
    monkeypatch.setenv("MIRAS_NAN_EMPTY", "1")
    spec = SPECS[name]
    g = _inputs(1, 21, 1, HD, 2)
    _check(spec, 16, g, tol=_tol(spec))
    _, ry, _ = _reference(spec, 4, g)
    a = {n: x.detach().float().to(DEV) for n, x in g.items()}
    y, _ = fused_recurrent_miras_mlp(a["q"], a["k"], a["v"], a["alpha"] if spec.needs_alpha else None, a["eta"],
                                     spec=spec, chunk_size=4, mu=a["mu"] if spec.needs_mu else None,
                                     initial_state=_state(spec, a))
    _close("decode y", y, ry, 2e-4)


@pytest.mark.skipif(on_gpu(), reason="checks coverage of CPU tensors in the interpreter (the GPU's, "
                    "mlp_config_shipped, is asserted here too, on CPU)")
def test_supports_and_errors():
    q = torch.zeros(1, 8, 2, 16)
    st = {"W1": torch.zeros(2, 16, 32), "W2": torch.zeros(2, 32, 16)}
    assert supports(SPECS["yaad"], q, chunk_size=16, initial_state=st) == (True, "")
    # Moneta (lq) and Memora (kl, gd) run on the kernels, so does kl + momentum (tests/test_kernels_mlp_kl.py)
    assert supports(MirasSpec.preset("moneta", expansion=2), q, chunk_size=16, initial_state=st) == (True, "")
    assert supports(MirasSpec.preset("memora", expansion=2), q, chunk_size=16, initial_state=st) == (True, "")
    kl_mom = MirasSpec(memory="mlp", bias="l2", retention="kl", learner="momentum", expansion=2)
    assert supports(kl_mom, q, chunk_size=16, initial_state=st) == (True, "")
    # a linear spec is the other family's: the one supports() takes it, the MLP kernel refuses it
    for bad, word in ((MirasSpec.preset("gated_delta"), "mlp"),):
        with pytest.raises(ValueError, match=word):
            g = torch.rand(1, 8, 2)
            chunk_miras_mlp(q, q, q, g, g, spec=bad, chunk_size=16, initial_state=st)
    assert not supports(SPECS["yaad"], torch.zeros(1, 8, 2, 24), chunk_size=16, initial_state=st)[0]
    assert "chunk_size" in supports(SPECS["yaad"], q, chunk_size=8, initial_state=st)[1]
    assert "initial_state" in supports(SPECS["yaad"], q, chunk_size=16, initial_state=None)[1]
    # on a GPU only AOT-checked configurations run (the interpreter takes every supported shape)
    from miras_kernels.configs import MLP_SHIPPED as SHIPPED, mlp_config_shipped as gpu_config_supported

    assert (64, 4, 64) in SHIPPED and gpu_config_supported(64, 4, 64, 80) == (True, "")
    assert all(gpu_config_supported(d, e, c, a)[0] for d, e, c in SHIPPED for a in (80, 90))
    assert "not a shipped" in gpu_config_supported(16, 2, 16, 90)[1]
    assert not gpu_config_supported(128, 4, 64, 90)[0]   # spills under Triton 3.7.1 (configs.MLP_NOT_SHIPPED)
    assert "sm_86" in gpu_config_supported(64, 4, 64, 86)[1]
    # the lq phases are compiled per exponent q (constexpr): only the AOT-checked q = 4 runs on a GPU
    assert gpu_config_supported(64, 4, 64, 90, lq_q=4.0) == (True, "")
    assert "q=3" in gpu_config_supported(64, 4, 64, 90, lq_q=3.0)[1]
    # the kl phases (gd and momentum) are AOT-checked for every shipped config but
    # configs.MLP_KL_NOT_SHIPPED -- empty since d = 128 with C = 64 compiles spill-free too (kl_adj1h) --
    # so kl runs on a GPU exactly where the shared phases do (configs.MLP_SHIPPED_KL)
    from miras_kernels.configs import MLP_KL_NOT_SHIPPED as KL_NOT_SHIPPED, MLP_SHIPPED_KL as SHIPPED_KL

    assert KL_NOT_SHIPPED == {} and set(SHIPPED_KL) == set(SHIPPED) and (64, 4, 16) in SHIPPED_KL
    assert gpu_config_supported(64, 4, 64, 80, kl=True) == (True, "")
    assert all(gpu_config_supported(d, e, c, a, kl=True)[0] for d, e, c in SHIPPED_KL for a in (80, 90))
    assert all(gpu_config_supported(128, e, 64, a, kl=True) == gpu_config_supported(128, e, 64, a)
               for e in (2, 4) for a in (80, 90))
    gates = torch.rand(1, 8, 2)
    with pytest.raises(ValueError, match="delta"):
        chunk_miras_mlp(q, q, q, gates, gates, spec=SPECS["yaad"], chunk_size=16, initial_state=st)
    with pytest.raises(ValueError, match="W2"):
        chunk_miras_mlp(q, q, q, gates, gates, spec=SPECS["ttt_mlp"], chunk_size=16, initial_state={"W1": st["W1"]})
    # the decoding kernel runs every retention (tests/test_kernels_mlp_decode.py); mid-chunk it needs
    # the frozen weights of the previous call
    with pytest.raises(ValueError, match="mid-chunk"):
        fused_recurrent_miras_mlp(q, q, q, gates, gates, spec=MirasSpec.preset("moneta", expansion=2), chunk_size=4,
                                  initial_state=st, position=2)
    with pytest.raises(ValueError, match="B == 1"):
        q2 = torch.zeros(2, 8, 2, 16)
        chunk_miras_mlp(q2, q2, q2, None, torch.rand(2, 8, 2), spec=SPECS["ttt_mlp"], chunk_size=16,
                        initial_state=st, cu_seqlens=torch.tensor([0, 8]))


def test_aot_list_covers_every_phase():
    """aot_specs lists every phase kernel the host launches, for every shipped configuration and
    learner (bias-independent phases once), plus the decoding kernel."""
    from miras_kernels.configs import MLP_SHIPPED as SHIPPED
    from miras_kernels.miras_mlp.aot import aot_specs
    from miras_kernels.miras_mlp.chunk_kernels import BWD_KERNELS, FWD_KERNELS, MOMENTUM_ONLY
    from miras_kernels.configs import MLP_SHIPPED_KL as SHIPPED_KL
    from miras_kernels.miras_mlp.chunk_kl_kernels import BWD_KL_KERNELS, FWD_KL_KERNELS
    from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS

    entries = aot_specs()
    names = [e[3] for e in entries]
    assert len(names) == len(set(names))
    for d, e, c in SHIPPED:
        for mom in (False, True):
            for kname, _ in FWD_KERNELS + BWD_KERNELS:
                if kname in MOMENTUM_ONLY and not mom:
                    continue
                tag = f",{'momentum' if mom else 'gd'} D{d} E{d * e} C{c} "
                assert any(n.startswith(kname + "[") and tag in n for n in names), (kname, tag)
        # the lq path (Moneta; lq + momentum): every phase it launches, compiled with LQ=True
        for mom in (False, True):
            for kname, _ in FWD_LQ_KERNELS + BWD_LQ_KERNELS:
                if kname in MOMENTUM_ONLY and not mom:
                    continue
                tag = f",{'momentum' if mom else 'gd'},lq D{d} E{d * e} C{c} "
                hits = [x for x in entries if x[3].startswith(kname + "[") and tag in x[3]]
                assert len(hits) == 1 and hits[0][2]["LQ"] is True and hits[0][2]["MOMENTUM"] is mom, (kname, tag)
        # the kl path (Memora, gd): every phase it launches, where it is shipped (LQ = REV)
        tag = f",gd,kl D{d} E{d * e} C{c} "
        for kname, _ in FWD_KL_KERNELS + BWD_KL_KERNELS:
            hits = [x for x in entries if x[3].startswith(kname + "[") and tag in x[3]]
            want = 1 if (d, e, c) in SHIPPED_KL else 0
            assert len(hits) == want and all(h[2]["LQ"] is h[2]["REV"] and h[2]["MOMENTUM"] is False for h in hits), (kname, tag)


def test_aot_specialises_as_launches():
    """The AOT harness compiles what a launch compiles (miras_kernels.common.launch_spec): every
    pointer 16-byte aligned, the per-launch counters (chunk ``step``, decoding ``pos0``) in each
    kernel's do_not_specialize, and integers a kernel does specialise turned into the constant 1
    or a divisibility-16 hint from the launch value -- the same rule as Triton's own launch
    (checked against triton's native specialize_impl) -- and the compiled TTIR carries the hints."""
    import json
    import subprocess
    import sys

    from miras_kernels.common.launch_spec import launch_specialization
    from miras_kernels.miras_mlp.aot import LAUNCH_INTS, aot_specs
    from miras_kernels.miras_mlp.chunk_kernels import BWD_KERNELS, FWD_KERNELS
    from miras_kernels.miras_mlp.chunk_kl_kernels import BWD_KL_MOM_KERNELS, FWD_KL_KERNELS
    from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS
    from miras_kernels.miras_mlp.fused_recurrent import mlp_recurrent_kernel

    def unspecialised(fn):
        return set(getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ())

    for _, kern in FWD_KERNELS + BWD_KERNELS + FWD_LQ_KERNELS + BWD_LQ_KERNELS + FWD_KL_KERNELS + BWD_KL_MOM_KERNELS:
        assert "step" in unspecialised(kern), kern
    assert "pos0" in unspecialised(mlp_recurrent_kernel)
    kern, sig, cx, name = aot_specs([("l2", False)], [(32, 2, 16)], lq=[], kl=[])[0]
    sig2, ones, attrs = launch_specialization(kern, sig, LAUNCH_INTS)
    pointers = {i for i, n in enumerate(kern.arg_names) if sig[n].startswith("*")}
    assert {i for (i,) in attrs} == pointers and len(pointers) >= 20 and sig2 == sig and ones == {}
    assert cx["DOT_PRECISION"] == "tf32"
    # a kernel that specialises its integers: values 1 -> constant, 4096 -> divisibility 16, 17 -> none
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["step"])
    def probe(x, n, m, big, f, step, B: tl.constexpr):
        tl.store(x + n + m + big + step, f)

    psig = {"x": "*fp32", "n": "i32", "m": "i32", "big": "i64", "f": "fp32", "step": "i32", "B": "constexpr"}
    sig3, ones, attrs = launch_specialization(probe, psig, {"n": 1, "m": 17, "big": 4096})
    assert sig3["n"] == "constexpr" and ones == {"n": 1} and sig3["m"] == "i32"
    assert set(attrs) == {(0,), (3,)}     # the pointer and the multiple of 16; not the float or step
    with pytest.raises(ValueError, match="'big'.*do_not_specialize"):
        launch_specialization(probe, psig, {"n": 1, "m": 17})
    try:   # the rule is Triton's: its launch-time specialisation of the same values
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        assert native_specialize_impl(BaseBackend, 1, False, True, True)[0] == "constexpr"
        assert native_specialize_impl(BaseBackend, 4096, False, True, True) == ("i32", "D")
        assert native_specialize_impl(BaseBackend, 17, False, True, True) == ("i32", "")
        assert native_specialize_impl(BaseBackend, 4096, False, False, True)[1] is None   # do_not_specialize
        assert native_specialize_impl(BaseBackend, torch.empty(4), False, True, True) == ("*fp32", "D")
    # the compiled module carries one divisibility hint per pointer argument
    code = ("import json, sys; sys.path.insert(0, %r)\n"
            "from miras_kernels.miras_mlp.aot import aot_specs, compile_entry\n"
            "print(json.dumps(compile_entry(aot_specs([('l2', False)], [(32, 2, 16)], lq=[], kl=[])[0], 90)))\n") % os.getcwd()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["ttir_divisibility"] == len(pointers) == len(rep["aligned_args"]) and rep["spill_bytes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_340m_config(arch, tmp_path):
    """The 340M configuration (D = 64, e = 4, C = 64, bf16 inputs; Yaad's Huber GD, Titans' l2
    momentum, Moneta's lp + lq and Memora's l2 + kl: every forward/backward phase kernel, and the decoding kernel at
    C = 1) compiles for
    sm_80/sm_90 without a GPU with ZERO register spills and shared memory within the card's limit
    (A100 164 KiB, H100 227 KiB). The full matrix (every shipped config and bias) is
    tools/kernel_report.py --family mlp's job; its results are in docs/kernels_mlp.md."""
    import json
    import subprocess
    import sys

    code = (
        "import json,sys; sys.path.insert(0, %r)\n"
        "from miras_kernels.miras_mlp.aot import aot_specs, compile_entry\n"
        "print(json.dumps([compile_entry(e, %d) for e in aot_specs([('huber', False), ('l2', True)], [(64, 4, 64)])\n"
        "                  if not e[3].startswith('mlp_recurrent') or ' C1 ' in e[3]]))\n"
    ) % (os.getcwd(), arch)
    # a fresh cache so the compile really runs (and the timing is CI's)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    from miras_kernels.miras_mlp.chunk_kernels import BWD_KERNELS, FWD_KERNELS

    limit = 164 * 1024 if arch == 80 else 227 * 1024
    reports = json.loads(out.stdout.strip().splitlines()[-1])
    from miras_kernels.miras_mlp.chunk_kl_kernels import BWD_KL_KERNELS, FWD_KL_KERNELS
    from miras_kernels.miras_mlp.chunk_lq_kernels import BWD_LQ_KERNELS, FWD_LQ_KERNELS

    phases = {r["config"].split("[")[0] for r in reports}
    assert phases == {n for n, _ in FWD_KERNELS + BWD_KERNELS + FWD_LQ_KERNELS + BWD_LQ_KERNELS + FWD_KL_KERNELS
                      + BWD_KL_KERNELS} | {"mlp_recurrent"}, phases
    assert any(",gd,lq " in r["config"] for r in reports) and any(",momentum,lq " in r["config"] for r in reports)
    assert sum(",gd,kl " in r["config"] for r in reports) == len(FWD_KL_KERNELS + BWD_KL_KERNELS)
    for rep in reports:
        assert rep["registers"] <= 255, rep
        assert rep["shared_bytes"] <= limit, rep
        assert rep["spill_bytes"] == 0, rep


@pytest.mark.skipif(on_gpu(), reason="--quick is the Triton-interpreter check of the tool (CPU); "
                    "tools/gpu_check.sh runs the GPU benchmark itself")
def test_bench_quick_mode(tmp_path):
    """tools/bench_kernels_mlp.py --quick runs its GPU code path in the interpreter and writes JSON."""
    import importlib.util
    import json

    spec_ = importlib.util.spec_from_file_location("bench_kernels_mlp", os.path.join(os.getcwd(), "tools", "bench_kernels_mlp.py"))
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    assert mod.main(["--quick", "--presets", "yaad,moneta,memora", "--out", str(out)]) == 0
    rows = {r["preset"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("yaad", "moneta", "memora"):
        assert rows[name]["triton_status"] == "ok" and rows[name]["triton_ms"] > 0, rows[name]
        assert rows[name]["chunked_ms"] > 0, rows[name]
    with pytest.raises(ValueError, match="--presets"):
        mod.main(["--quick", "--presets", "gla", "--out", str(out)])
