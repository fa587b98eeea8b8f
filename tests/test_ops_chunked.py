"""The chunk-parallel form equals the token-loop definition at the same chunk size: forward,
final state and every gradient (q, k, v, alpha, eta, delta, mu, initial state).

Tolerances (relative: max |diff| / max |recurrent| per tensor):
* float64: 1e-9 (observed <= ~1e-10; only rounding differs, amplified by the MLP's layer norm);
* float32: 1e-5 for linear memories, 1e-3 for MLP memories (observed <= 3e-7 and <= 6e-5:
  fp32 rounding of the log-space gate products and of the inner gradients compounds over the
  sequence, most through the layer norm inside the MLP memory and the softmax/l_q weights).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from miras_kernels import MirasSpec
from test_ops_helpers import assert_close_all, call, make_case, outputs_and_grads, rel_err

TOL64 = 1e-9
TOL32 = {"linear": 1e-5, "mlp": 1e-3}

# (chunk size, T): T not a multiple of C, T smaller than one chunk, and C = 1.
GRIDS = [(16, 37), (64, 20), (1, 7)]


def _compare(spec, leaves, C, tol, what, **kw):
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", C, **kw))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", C, **kw))
    assert_close_all(got, ref, tol, what)


@pytest.mark.parametrize("C,T", GRIDS, ids=[f"C{c}-T{t}" for c, t in GRIDS])
@pytest.mark.parametrize("name", list(MirasSpec.PRESETS))
def test_presets_float64(name, C, T):
    spec = MirasSpec.preset(name)
    leaves = make_case(spec, B=2, T=T, H=2, D=4, seed=11)
    _compare(spec, leaves, C, TOL64, f"{name} C={C} T={T}")


GRID_SAMPLE = [
    dict(memory="linear", bias="lp", retention="lq", learner="momentum"),
    dict(memory="linear", bias="huber", retention="kl", learner="gd"),
    dict(memory="mlp", bias="dot", retention="decay", learner="momentum"),
    dict(memory="mlp", bias="lp", retention="kl", learner="momentum"),
    dict(memory="mlp", bias="huber", retention="lq", learner="momentum"),
    dict(memory="linear", bias="l2", retention="none", learner="momentum"),
    dict(memory="mlp", bias="l2", retention="lq", learner="gd", q=2.0),
    dict(memory="mlp", bias="huber", retention="decay", learner="gd", huber_eps=1e-6),  # Yaad, old constant
]


@pytest.mark.parametrize("fields", GRID_SAMPLE, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_grid_sample_float64(fields):
    spec = MirasSpec(**fields)
    leaves = make_case(spec, B=2, T=21, H=2, D=4, seed=12)
    _compare(spec, leaves, 8, TOL64, str(fields))


PER_CHANNEL = [
    dict(memory="linear", bias="dot", retention="decay", learner="gd"),  # GLA
    dict(memory="linear", bias="l2", retention="decay", learner="momentum"),
    dict(memory="linear", bias="huber", retention="kl", learner="gd"),
    dict(memory="linear", bias="l2", retention="lq", learner="momentum"),
]


@pytest.mark.parametrize("fields", PER_CHANNEL, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_per_channel_alpha_float64(fields):
    spec = MirasSpec(**fields)
    leaves = make_case(spec, B=2, T=19, H=2, D=4, channel=True, seed=13)
    _compare(spec, leaves, 8, TOL64, f"per-channel {fields}")


@pytest.mark.parametrize("name", list(MirasSpec.PRESETS))
def test_presets_float32(name):
    spec = MirasSpec.preset(name)
    leaves = make_case(spec, B=2, T=37, H=2, D=4, dtype=torch.float32, seed=14)
    _compare(spec, leaves, 16, TOL32[spec.memory], f"{name} float32")


def test_every_combination_runs_and_matches():
    """All 2*4*4*2 grid points (the 32 linear ones also with per-channel alpha): forward and final
    state of chunked == recurrent in float64 (gradients are covered by the tests above)."""
    count = 0
    for mem, bias, ret, learner in itertools.product(("linear", "mlp"), ("dot", "l2", "lp", "huber"),
                                                     ("none", "decay", "lq", "kl"), ("gd", "momentum")):
        spec = MirasSpec(memory=mem, bias=bias, retention=ret, learner=learner)
        for channel in (False, True) if mem == "linear" else (False,):
            leaves = make_case(spec, B=1, T=11, H=2, D=4, channel=channel, seed=15, grad=False)
            y1, s1 = call(spec, leaves, "recurrent", 4)
            y2, s2 = call(spec, leaves, "chunked", 4)
            assert torch.isfinite(y1).all(), (spec, channel)
            assert rel_err(y2, y1) < TOL64, (spec, channel)
            assert set(s1) == set(s2) == set(spec.state_keys())
            for key in s1:
                assert rel_err(s2[key], s1[key]) < TOL64, (spec, channel, key)
            count += 1
    assert count == 32 * 2 + 32
