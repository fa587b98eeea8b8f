"""Decoding (token-recurrent) MLP-memory kernel ``fused_recurrent_miras_mlp`` for the lq (Moneta)
and kl (Memora) retentions, against float64 token loops.

Oracles: ``tests.test_kernels_mlp.token_loop`` (independent float64 loop: autograd inner gradients,
its own ``_weights`` materialisation) and, for packed documents, the team's reference
``miras_memory(..., backend="recurrent")`` in float64. Numerics run in the Triton interpreter
(TRITON_INTERPRET=1, tests/conftest.py); the kernel is forward-only, so outputs, final states and
the frozen chunk-start weights are compared (no gradients). Under MIRAS_TEST_DEVICE=cuda the
kernel runs on the GPU (inputs moved to ``DEV``; the float64 oracles stay on the CPU).

Tolerance (``_close``): fp32 kernel vs float64 loop, max abs error <= 2e-4 * (max |reference| + 1)
(observed, max err / (max|ref| + 1), seed 0: moneta 9e-7, lq q = 3 + momentum 2.8e-6, lq tiny state
3.3e-6 (of y; the state relative to its own scale), d = 128 1.2e-6; memora 1.6e-5, kl + momentum
1.1e-5, d = 128 1e-6 -- the exponentials amplify fp32 rounding as in the chunk kernels). The Huber bias is left out of the kl cases: its l1 branch
(curvature ~1e3 * delta near e_j = 0) made the fp32 PyTorch token loop itself miss the float64 one
by 7e-2 on one seed, with the kernel matching the fp32 loop. The none/decay retentions are covered
in tests/test_kernels_mlp.py (``test_fused_recurrent_matches_token_loop``).
"""

from __future__ import annotations

import pytest
import torch

from miras_kernels.miras_mlp import fused_recurrent_miras_mlp
from miras_kernels import miras_memory
from miras_kernels.spec import MirasSpec
from tests.test_kernels_mlp import DEV, _close, _inputs, _reference, _state, _weights

pytestmark = pytest.mark.triton

TOL = 2e-4

SPECS = {
    # Moneta: lp (p = 3) + lq (q = 4, the q = 4 branch of the jit helpers) + gd
    "moneta": MirasSpec.preset("moneta", expansion=2),
    # lq with q = 3 (generic-q branch: |x|^(q-2) by exp2/log2) and the momentum learner
    "lq_q3_momentum": MirasSpec(memory="mlp", bias="l2", retention="lq", q=3.0, learner="momentum", expansion=2),
    # Memora: l2 + kl, c != 1 exercises the scale
    "memora": MirasSpec.preset("memora", expansion=2, c=1.5),
    # kl with the momentum learner (the chunk kernels fall back for it; decoding runs it) and dot
    "kl_momentum_dot": MirasSpec(memory="mlp", bias="dot", retention="kl", learner="momentum", c=0.7, expansion=2),
}


def _run(spec, C, a, lo, hi, state, position=0, cu=None):
    """The kernel on tokens [lo, hi) of the fp32 inputs ``a``."""
    sl = {n: a[n][:, lo:hi] for n in ("q", "k", "v", "alpha", "eta", "delta", "mu")}
    return fused_recurrent_miras_mlp(
        sl["q"], sl["k"], sl["v"], sl["alpha"] if spec.needs_alpha else None, sl["eta"], spec=spec, chunk_size=C,
        delta=sl["delta"] if spec.needs_delta else None, mu=sl["mu"] if spec.needs_mu else None,
        initial_state=state, output_final_state=True, position=position, cu_seqlens=cu)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_matches_token_loop(name):
    """B = 2 with per-sequence initial states, T = 11. Chunk 1 (the exact per-token rule, frozen
    weights materialised on the fly) and chunk 4 split at token 6 (mid-chunk: the second call
    resumes with ``position=6`` and the first call's ``chunk_start_W*``). The final state is the
    free variables; ``chunk_start_W*`` must be the materialised weights of the last chunk start
    (token 8: the loop's state after 8 tokens, through ``_weights``)."""
    spec = SPECS[name]
    g = _inputs(2, 11, 2, 16, 2, state_batch=2)
    a = {n: x.detach().float().to(DEV) for n, x in g.items()}
    for C in (1, 4):
        _, ry, rfin = _reference(spec, C, g)
        y1, s1 = _run(spec, C, a, 0, 6, _state(spec, a))
        assert set(s1) == set(spec.state_keys()) | ({"chunk_start_W1", "chunk_start_W2"} if C > 1 else set())
        y2, s2 = _run(spec, C, a, 6, 11, s1, position=6)
        _close(f"y C={C}", torch.cat([y1, y2], 1), ry, TOL)
        for n in spec.state_keys():
            _close(f"{n} C={C}", s2[n], rfin[n], TOL)
        if C > 1:
            toks = ("q", "k", "v", "alpha", "eta", "delta", "mu")
            _, _, r8 = _reference(spec, C, {n: x[:, :8] if n in toks else x for n, x in g.items()})
            for w in ("W1", "W2"):
                _close(f"chunk_start_{w}", s2[f"chunk_start_{w}"], _weights(spec, r8[w].detach()), TOL)


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_decode_varlen_documents(name):
    """Two packed documents (lengths 4 and 7, per-document initial states), chunk 4: the state and
    the chunk grid restart at the second document; oracle: miras_memory(backend="recurrent") in
    float64."""
    spec = SPECS[name]
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    g = _inputs(1, 11, 2, 16, 2, state_batch=2)
    with torch.no_grad():
        ry, rfin = miras_memory(g["q"], g["k"], g["v"], g["alpha"], g["eta"], spec=spec, chunk_size=4,
                                delta=g["delta"] if spec.needs_delta else None, mu=g["mu"] if spec.needs_mu else None,
                                initial_state=_state(spec, g), output_final_state=True, cu_seqlens=cu,
                                backend="recurrent")
    a = {n: x.float().to(DEV) for n, x in g.items()}
    y, fin = _run(spec, 4, a, 0, 11, _state(spec, a), cu=cu.to(DEV))
    _close("y", y, ry, TOL)
    for n in spec.state_keys():
        _close(n, fin[n], rfin[n], TOL)


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_decode_head_dim_128(name):
    """d = 128 (e = 1): the lq/kl tile rule of ``recurrent_block`` (BH = 8, 16 hidden blocks), so
    W1's online softmax and the q-norms run across many blocks; chunk 1 and 2, T = 5."""
    from miras_kernels.common.codes import RETENTION_CODES as RET_CODES
    from miras_kernels.configs import mlp_recurrent_block as recurrent_block

    spec = MirasSpec.preset(name, expansion=1, **({"c": 1.5} if name == "memora" else {}))
    assert recurrent_block(128, 1, RET_CODES[spec.retention]) == 8
    g = _inputs(1, 5, 1, 128, 1)
    a = {n: x.detach().float().to(DEV) for n, x in g.items()}
    for C in (1, 2):
        _, ry, rfin = _reference(spec, C, g)
        y, fin = _run(spec, C, a, 0, 5, _state(spec, a))
        _close(f"y C={C}", y, ry, TOL)
        for n in spec.state_keys():
            _close(f"{n} C={C}", fin[n], rfin[n], TOL)


def test_decode_lq_tiny_state_no_underflow():
    """lq (q = 3) on a state with entries ~1e-16 and updates of the same size (eta ~1e-16): in
    fp32, |X|^3 ~ 1e-48 underflows to 0, so an unscaled q-norm would give n = 0 and
    s = (0 + eps)^(-1) = 1e30 (lq_eps = 1e-30 here, so the norm decides the scale) instead of
    1/||X||_3; the kernel's max-abs-scaled norm keeps W = X / ||X||_3 exact. Chunk 1 and 4 (both
    the on-the-fly and the frozen-copy materialisation)."""
    spec = MirasSpec(memory="mlp", bias="l2", retention="lq", q=3.0, lq_eps=1e-30, expansion=2)
    g = _inputs(2, 11, 2, 16, 2, state_batch=2)
    for n in ("W1", "W2"):
        g[n] = g[n] * 1e-16
    g["eta"] = g["eta"] * 1e-16
    a = {n: x.detach().float().to(DEV) for n, x in g.items()}
    assert float((a["W1"].abs() ** 3).sum()) == 0.0  # the plain fp32 sum of |X|^q underflows
    for C in (1, 4):
        _, ry, rfin = _reference(spec, C, g)
        y, fin = _run(spec, C, a, 0, 11, _state(spec, a))
        _close(f"y C={C}", y, ry, TOL)
        for n in ("W1", "W2"):
            # relative to the state's own scale (the absolute bound would accept anything ~1e-16)
            err = (fin[n].double().cpu() - rfin[n].detach()).abs().max() / rfin[n].abs().max()
            assert err <= TOL, (n, C, float(err))


def test_decode_errors():
    """Forward only; mid-chunk continuation needs the frozen weights; linear memory is not this
    kernel's."""
    spec = SPECS["moneta"]
    q = torch.zeros(1, 3, 2, 16)
    gates = torch.rand(1, 3, 2)
    st = {"W1": torch.zeros(2, 16, 32), "W2": torch.zeros(2, 32, 16)}
    with pytest.raises(ValueError, match="mid-chunk"):
        fused_recurrent_miras_mlp(q, q, q, gates, gates, spec=spec, chunk_size=4, initial_state=st, position=2)
    with pytest.raises(ValueError, match="forward-only"):
        fused_recurrent_miras_mlp(q.requires_grad_(), q, q, gates, gates, spec=spec, initial_state=st)
    with pytest.raises(ValueError, match="memory='mlp'"):
        fused_recurrent_miras_mlp(q, q, q, gates, gates, spec=MirasSpec.preset("gated_delta"), initial_state=st)


def test_decode_aot_list_has_lq_and_kl():
    """aot_specs() lists the decoding kernel with retention codes lq (RET 1, q = 4 constexpr:
    Moneta's lp + gd and l2 + momentum) and kl (RET 2: l2 + gd) for every shipped configuration at
    chunk semantics C = 1 and the config's chunk, with RET a constexpr of the signature."""
    from miras_kernels.configs import MLP_SHIPPED as SHIPPED
    from miras_kernels.miras_mlp.aot import aot_specs
    from miras_kernels.common.codes import BIAS_CODES
    from miras_kernels.common.codes import RETENTION_CODES as RET_CODES
    from miras_kernels.miras_mlp.fused_recurrent import mlp_recurrent_kernel

    dec = [e for e in aot_specs() if e[0] is mlp_recurrent_kernel]
    assert len({e[3] for e in dec}) == len(dec)
    assert all(e[1]["RET"] == "constexpr" and e[1]["LQQ"] == "constexpr" and e[1]["kc"] == "fp32" for e in dec)
    have = {(e[2]["D"], e[2]["E"], e[2]["C"], e[2]["RET"], e[2]["BIAS"], e[2]["MOMENTUM"], e[2]["LQQ"]) for e in dec}
    lq, kl = RET_CODES["lq"], RET_CODES["kl"]
    for d, e, c in SHIPPED:
        for C in (1, c):
            assert (d, d * e, C, lq, BIAS_CODES["lp"], False, 4.0) in have, (d, e, C, "moneta")
            assert (d, d * e, C, lq, BIAS_CODES["l2"], True, 4.0) in have, (d, e, C, "lq momentum")
            assert (d, d * e, C, kl, BIAS_CODES["l2"], False, 4.0) in have, (d, e, C, "memora")
            assert (d, d * e, C, 0, BIAS_CODES["huber"], False, 4.0) in have, (d, e, C, "yaad")
