"""Chunk size 1 equals an INDEPENDENT transcription of the per-token rules of docs/semantics.md
(tests/test_ops_helpers.notes_reference: inner gradients by torch.autograd.grad, not the op's
closed forms), forward, final state and every outer gradient, for every preset.

Tolerance (float64): 1e-9 relative (max |diff| / max |reference|) per tensor. Observed worst is
~1e-11: the only differences are rounding (closed-form vs autograd backprop, exp(log alpha) in
the chunked form), amplified a little by the layer norm of the MLP memory.
"""

from __future__ import annotations

import pytest

from miras_kernels import MirasSpec
from test_ops_helpers import assert_close_all, call, make_case, notes_reference, outputs_and_grads

TOL = 1e-9

CASES = [(name, False) for name in MirasSpec.PRESETS] + [("gla", True), ("gated_delta", True)]


@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
@pytest.mark.parametrize("name,channel", CASES, ids=[f"{n}{'-perchannel' if c else ''}" for n, c in CASES])
def test_chunk1_equals_notes_rules(name, channel, backend):
    spec = MirasSpec.preset(name)
    leaves = make_case(spec, B=2, T=9, H=2, D=4, channel=channel, seed=3)
    ref = outputs_and_grads(spec, leaves, lambda lv: notes_reference(spec, lv))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, backend, 1))
    assert_close_all(got, ref, TOL, f"{name} {backend} C=1")


@pytest.mark.parametrize(
    "fields",
    [
        dict(memory="linear", bias="lp", retention="lq", learner="momentum"),
        dict(memory="linear", bias="huber", retention="kl", learner="gd"),
        dict(memory="mlp", bias="dot", retention="decay", learner="momentum"),
        dict(memory="mlp", bias="huber", retention="lq", learner="momentum", q=3.0),
        dict(memory="linear", bias="lp", retention="decay", learner="gd", p=4.0),
        # Yaad at a non-default smooth-sign constant (the old 1e-6)
        dict(memory="mlp", bias="huber", retention="decay", learner="gd", huber_eps=1e-6),
    ],
    ids=lambda f: "-".join(str(v) for v in f.values()),
)
def test_chunk1_equals_notes_rules_grid_sample(fields):
    spec = MirasSpec(**fields)
    leaves = make_case(spec, B=1, T=8, H=2, D=4, seed=5)
    ref = outputs_and_grads(spec, leaves, lambda lv: notes_reference(spec, lv))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 1))
    assert_close_all(got, ref, TOL, f"{fields} C=1")
