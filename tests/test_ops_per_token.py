"""The per-token scan of the non-affine retentions (``kernels/pytorch/per_token_scan.py``: Moneta's l_q
scales, Memora's softmax reads, every chunk at once, hand-written backward).

* Unit level: ``lq_scales`` / ``softmax_reads`` == a plain autograd token loop written here
  (X_j = alpha_j X_{j-1} - eta_j a_j b_jᵀ, momentum S likewise; then ``spec.lq_scale`` or
  ``c * softmax(X) x``), forward and the gradients of every input (chunk-start states X0 and
  S0, factors a and b, eta, alpha per head or per key channel, mu, read input x); several chunk
  groups (also a smaller last group) and backward segments (forced by tiny GROUP/SEGMENT
  sizes), T not a multiple of C, a partial last segment, gates near 0 (no division by decay
  products).
* ``torch.autograd.gradcheck`` of the Function on tiny float64 inputs.
* Operator level: chunked == recurrent (the definition) with cu_seqlens, with momentum on
  the MLP grid points, with a zero initial accumulator (the norm's subgradient at 0).

Tolerances: float64, relative (max |diff| / max |ref|) 1e-10 at unit level (only rounding
differs; observed <= ~1e-14) and 1e-9 through the operator (as test_ops_chunked: the MLP's layer
norm amplifies rounding); gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3).
"""

from __future__ import annotations

import pytest
import torch

from miras_kernels import MirasSpec
from miras_kernels.pytorch import per_token_scan
from miras_kernels.pytorch.per_token_scan import ChunkScanInputs, lq_scales, softmax_reads
from miras_pretrain.testing.devices import test_device as device_under_test
from test_ops_helpers import assert_close_all, call, make_case, outputs_and_grads, rel_err

TOL_UNIT = 1e-10
TOL_OP = 1e-9


def _inputs(B=2, H=2, T=13, C=5, r=3, c=4, momentum=False, channel=False, seed=0, tiny_alpha=False):
    """Random leaves for the scan (float64): name -> tensor, head-major like chunked.py."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    N = -(-T // C)
    leaves = {
        "X0": rnd(B, H, N, r, c),
        "a": rnd(B, H, T, r) * 0.5,
        "b": rnd(B, H, T, c) * 0.5,
        "eta": torch.rand(B, H, T, generator=g, dtype=torch.float64),
        "alpha": 0.5 + 0.5 * torch.rand(*((B, H, T, c) if channel else (B, H, T)), generator=g, dtype=torch.float64),
        "x": rnd(B, H, T, c),
    }
    if tiny_alpha:  # a gate near 0 on some tokens: any division by decay products would blow up
        leaves["alpha"][..., ::3] = 1e-9
    if momentum:
        leaves["S0"] = rnd(B, H, N, r, c) * 0.3
        leaves["mu"] = 0.3 + 0.6 * torch.rand(B, H, T, generator=g, dtype=torch.float64)
    return {n: t.requires_grad_() for n, t in leaves.items()}


def _scan_inputs(lv) -> ChunkScanInputs:
    return ChunkScanInputs(lv["X0"], lv.get("S0"), lv["a"], lv["b"], lv["eta"], lv["alpha"], lv.get("mu"))


def _loop_reference(kind: str, spec: MirasSpec, lv: dict, C: int) -> torch.Tensor:
    """Plain autograd token loop over each chunk (the in-chunk rule of recurrent.py)."""
    T = lv["a"].shape[2]
    outs = []
    for t in range(T):
        n, j = divmod(t, C)
        if j == 0:
            X = lv["X0"][:, :, n]
            S = lv["S0"][:, :, n] if "S0" in lv else None
        g = lv["eta"][:, :, t, None, None] * (lv["a"][:, :, t, :, None] * lv["b"][:, :, t, None, :])
        al = lv["alpha"][:, :, t]
        al = al[:, :, None, :] if al.dim() == 3 else al[:, :, None, None]
        if S is not None:
            S = lv["mu"][:, :, t, None, None] * S - g
            X = al * X + S
        else:
            X = al * X - g
        if kind == "lq":
            outs.append(spec.lq_scale(X)[..., 0, 0])
        else:
            outs.append(spec.c * (torch.softmax(X, dim=-1) @ lv["x"][:, :, t, :, None])[..., 0])
    return torch.stack(outs, dim=2)


def _run(kind: str, spec: MirasSpec, lv: dict, C: int) -> torch.Tensor:
    if kind == "lq":
        return lq_scales(spec, _scan_inputs(lv), C)
    return softmax_reads(spec, _scan_inputs(lv), lv["x"], C)


def _compare(kind, spec, lv, C, tol=TOL_UNIT):
    used = {n: t for n, t in lv.items() if kind == "kl" or n != "x"}
    got = _run(kind, spec, lv, C)
    ref = _loop_reference(kind, spec, lv, C)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < tol, ("forward", rel_err(got, ref))
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype).to(ref.device)
    g_got = torch.autograd.grad((got * cot).sum(), list(used.values()))
    g_ref = torch.autograd.grad((ref * cot).sum(), list(used.values()))
    errs = {n: rel_err(a, b) for n, a, b in zip(used, g_got, g_ref)}
    assert all(e < tol for e in errs.values()), errs


SPECS = {
    "lq4": ("lq", MirasSpec(memory="mlp", bias="lp", retention="lq", q=4.0)),
    "lq3": ("lq", MirasSpec(memory="mlp", bias="lp", retention="lq", q=3.0)),
    "kl": ("kl", MirasSpec(memory="mlp", bias="l2", retention="kl", c=1.7)),
}


@pytest.fixture
def small_blocks(monkeypatch):
    """One chunk per group and the shortest backward segments: every group/segment path runs."""
    monkeypatch.setattr(per_token_scan, "GROUP_ELEMENTS", 1)
    monkeypatch.setattr(per_token_scan, "SEGMENT_ELEMENTS", 1)


@pytest.mark.parametrize("channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
@pytest.mark.parametrize("which", list(SPECS))
def test_scan_equals_token_loop(which, momentum, channel, small_blocks):
    kind, spec = SPECS[which]
    # C = 5: T = 13 leaves a partial last chunk; isqrt(5) = 2 gives segments 2 + 2 + 1
    lv = _inputs(momentum=momentum, channel=channel, seed=1)
    _compare(kind, spec, lv, C=5)


@pytest.mark.parametrize("which", list(SPECS))
def test_scan_uneven_groups(which, monkeypatch):
    """Groups of 2 chunks over N = 3 chunks: the last group is smaller than the buffers."""
    kind, spec = SPECS[which]
    lv = _inputs(momentum=True, channel=True, seed=6)  # B*H = 4 blocks of 3 x 4 per chunk
    monkeypatch.setattr(per_token_scan, "GROUP_ELEMENTS", 2 * 4 * 3 * 4)
    monkeypatch.setattr(per_token_scan, "SEGMENT_ELEMENTS", 1)
    _compare(kind, spec, lv, C=5)


@pytest.mark.parametrize("which", list(SPECS))
def test_scan_one_group_one_segment(which):
    """Default sizes: all chunks of these tiny inputs in one group, one backward segment."""
    kind, spec = SPECS[which]
    _compare(kind, spec, _inputs(T=11, C=4, momentum=True, seed=2), C=4)


@pytest.mark.parametrize("which", list(SPECS))
def test_scan_gates_near_zero(which, small_blocks):
    kind, spec = SPECS[which]
    lv = _inputs(T=12, C=6, seed=3, tiny_alpha=True)
    _compare(kind, spec, lv, C=6)


@pytest.mark.parametrize("which,momentum", [("lq4", False), ("kl", True), ("lq3", True)])
def test_scan_gradcheck(which, momentum, small_blocks):
    kind, spec = SPECS[which]
    lv = _inputs(B=1, H=1, T=5, C=2, r=2, c=3, momentum=momentum, seed=4)
    names = [n for n in lv if kind == "kl" or n != "x"]

    def fn(*tensors):
        return _run(kind, spec, {**lv, **dict(zip(names, tensors))}, 2)

    assert torch.autograd.gradcheck(fn, tuple(lv[n] for n in names), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_chunk_layout_round_trip():
    lay = per_token_scan.ChunkLayout(B=2, H=3, T=10, C=4)
    t = torch.randn(2, 3, 10, 5)
    s = lay.to_scan(t, fill=7.0)
    assert s.shape == (4, 3, 6, 5) and s.is_contiguous()
    assert torch.equal(s[1, 2, 4], t[1, 1, 9])  # token 9 = chunk 2, step 1; head row 1*3+1
    assert torch.all(s[2:, 2] == 7.0)  # padding of the last chunk
    assert torch.equal(lay.from_scan(s), t)


# ----- through the operator: chunked == recurrent ----------------------------------------------

def _varlen_case(spec, seed):
    leaves = make_case(spec, B=1, T=23, H=2, D=4, seed=seed, state_batch=True)
    # per-document initial states [N, H, r, c] (make_case gives [B=1, H, r, c]: repeat for 3 docs)
    for n in [k for k in leaves if k.startswith("state_")]:
        leaves[n] = leaves[n].detach().repeat(3, 1, 1, 1).mul(torch.tensor([1.0, 0.7, 1.2], dtype=torch.float64, device=device_under_test())
                                                                 .view(3, 1, 1, 1)).requires_grad_()
    return leaves


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_varlen_chunked_equals_recurrent(name, small_blocks):
    spec = MirasSpec.preset(name)
    leaves = _varlen_case(spec, seed=41)
    cu = torch.tensor([0, 7, 7, 23], dtype=torch.int64, device=device_under_test())  # an empty document, a partial chunk
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 4, cu_seqlens=cu))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 4, cu_seqlens=cu))
    assert_close_all(got, ref, TOL_OP, f"{name} varlen")


MOMENTUM_GRID = [  # (fields, per-channel alpha): per-channel gates exist for linear memories only
    (dict(memory="mlp", bias="lp", retention="lq", learner="momentum"), False),
    (dict(memory="mlp", bias="l2", retention="kl", learner="momentum"), False),
    (dict(memory="linear", bias="l2", retention="kl", learner="momentum"), True),
    (dict(memory="linear", bias="huber", retention="lq", learner="momentum"), True),
]


@pytest.mark.parametrize("fields,channel", MOMENTUM_GRID,
                         ids=["-".join(f.values()) + ("-channel" if ch else "") for f, ch in MOMENTUM_GRID])
def test_momentum_grid_chunked_equals_recurrent(fields, channel, small_blocks):
    spec = MirasSpec(**fields)
    leaves = make_case(spec, B=2, T=19, H=2, D=4, channel=channel, seed=42)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 8))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 8))
    assert_close_all(got, ref, TOL_OP, str(fields))


def test_lq_zero_accumulator_subgradient():
    """A = 0 at the start and eta = 0 on the first tokens: the l_q norm is exactly 0 there, where
    both paths use torch's subgradient (0) and stay finite."""
    spec = MirasSpec(memory="linear", bias="l2", retention="lq", learner="gd")
    leaves = make_case(spec, B=1, T=9, H=2, D=4, seed=43)
    with torch.no_grad():
        leaves["state_W"].zero_()
        leaves["eta"][:, :3] = 0.0
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 4))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 4))
    assert all(torch.isfinite(g).all() for g in got[2].values())
    assert_close_all(got, ref, TOL_OP, "lq at A = 0")
