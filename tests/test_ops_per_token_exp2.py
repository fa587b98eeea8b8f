"""Memora's two exp2 paths in the per-token scan (``kernels/pytorch/per_token_scan.py``,
``_SoftmaxRead``): the *fast* path (exp2 of the logits without the row-max shift, taken per
group of chunks when ``_Group.abs_bound`` proves every logit within ``EXP2_RANGE``) and the
*safe* path (row-max shift). Both must equal the plain autograd token loop of
tests/test_ops_per_token.py, forward and every gradient, whichever the group takes:

* each path forced on its own (with and without momentum, per-head and per-key-channel alpha);
* logits far outside the range (|Xl| ~ 430 in log2 units, exp2 would overflow) take the safe
  path by themselves and stay finite and exact;
* one call with fast and safe groups side by side (one chunk per group);
* the bound really bounds: it is >= the largest |X_j| the scan visits;
* ``gradcheck`` of the safe path (the fast path is what test_ops_per_token's gradcheck runs now).

Tolerance as test_ops_per_token: float64, relative 1e-10 (only rounding differs).
"""

from __future__ import annotations

import pytest
import torch

from miras_kernels.pytorch import per_token_scan
from test_ops_per_token import SPECS, _compare, _inputs, _run

KL = SPECS["kl"]


@pytest.fixture
def record_paths(monkeypatch):
    """The fast/safe decision of every group, in call order."""
    taken: list[bool] = []
    decide = per_token_scan._SoftmaxRead.fast_group

    def spy(self, g):
        taken.append(decide(self, g))
        return taken[-1]

    monkeypatch.setattr(per_token_scan._SoftmaxRead, "fast_group", spy)
    monkeypatch.setattr(per_token_scan, "GROUP_ELEMENTS", 1)  # one chunk per group
    monkeypatch.setattr(per_token_scan, "SEGMENT_ELEMENTS", 1)
    return taken


@pytest.mark.parametrize("channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
@pytest.mark.parametrize("path", ["fast", "safe"])
def test_each_path_equals_token_loop(path, momentum, channel, record_paths, monkeypatch):
    monkeypatch.setattr(per_token_scan, "EXP2_RANGE", float("inf") if path == "fast" else -1.0)
    lv = _inputs(momentum=momentum, channel=channel, seed=21)
    _compare(*KL, lv, C=5)
    assert record_paths and all(t == (path == "fast") for t in record_paths), record_paths


def test_huge_logits_take_the_safe_path(record_paths):
    lv = _inputs(T=12, C=6, seed=22)
    with torch.no_grad():
        lv["X0"].mul_(300.0)  # exp2 of |Xl| ~ 430 overflows float64's exponent range too
    _compare(*KL, lv, C=6)
    assert record_paths and not any(record_paths)


def test_fast_and_safe_groups_in_one_call(record_paths):
    lv = _inputs(B=1, H=1, T=12, C=4, seed=23)
    with torch.no_grad():
        lv["X0"][:, :, 1].mul_(300.0)  # only the second chunk's logits are large
    _compare(*KL, lv, C=4)
    # forward then backward recomputation: each decides per group, the same way
    assert record_paths[:3] == [True, False, True]


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
def test_bound_is_an_upper_bound(momentum):
    """abs_bound >= max |X_j| over the group's steps (X_j from the recurrence written out)."""
    lv = {n: t.detach() for n, t in _inputs(B=2, H=2, T=10, C=10, momentum=momentum, seed=24).items()}
    lv["X0"] = lv["X0"] * 0.01  # small start: the steps, not X0, make the largest entries
    lv["alpha"][..., 3] = 1.3  # a gate above 1 grows the state: the bound must cover it
    lay = per_token_scan.ChunkLayout(2, 2, 10, 10)
    u = lay.to_scan(-(lv["eta"].unsqueeze(-1) * lv["a"]))
    g = per_token_scan._Group(
        slice(0, 1), lay.states_to_scan(lv["X0"]), None if "S0" not in lv else lay.states_to_scan(lv["S0"]),
        u, lay.to_scan(lv["b"]), lay.to_scan(lv["alpha"], 1.0), None if "mu" not in lv else lay.to_scan(lv["mu"], 1.0),
        None,
    )
    X, S, biggest = g.X0.clone(), None if g.S0 is None else g.S0.clone(), 0.0
    for j in range(10):
        g.advance(j, X, S, X, S)
        biggest = max(biggest, float(X.abs().max()))
    assert biggest > 2 * float(g.X0.abs().max())  # the case is not trivial
    assert biggest <= g.abs_bound()


def test_safe_path_gradcheck(monkeypatch):
    monkeypatch.setattr(per_token_scan, "EXP2_RANGE", -1.0)
    lv = _inputs(B=1, H=1, T=5, C=2, r=2, c=3, momentum=True, seed=25)
    names = list(lv)

    def fn(*tensors):
        return _run(*KL, {**lv, **dict(zip(names, tensors))}, 2)

    assert torch.autograd.gradcheck(fn, tuple(lv[n] for n in names), eps=1e-6, atol=1e-5, rtol=1e-3)
