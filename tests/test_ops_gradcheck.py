"""torch.autograd.gradcheck (finite differences, float64) of the whole operator on tiny inputs,
for linear and MLP memories, through both backends: the hand-written closed-form inner
gradients must leave the op exactly differentiable (second-order terms included).
Tolerances: gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3)."""

from __future__ import annotations

import pytest
import torch

from miras_kernels import MirasSpec, miras_memory
from test_ops_helpers import make_case, used_leaves

CASES = [
    ("gated_delta-perchannel-momentum", dict(memory="linear", bias="l2", retention="decay", learner="momentum"), True, "chunked"),
    ("linear-huber-lq", dict(memory="linear", bias="huber", retention="lq", learner="gd"), False, "chunked"),
    ("linear-lp-kl", dict(memory="linear", bias="lp", retention="kl", learner="gd"), False, "recurrent"),
    ("moneta", MirasSpec.PRESETS["moneta"], False, "chunked"),
    ("yaad", MirasSpec.PRESETS["yaad"], False, "chunked"),
    ("memora", MirasSpec.PRESETS["memora"], False, "chunked"),
    ("titans", MirasSpec.PRESETS["titans"], False, "recurrent"),
]


@pytest.mark.parametrize("fields,channel,backend", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_gradcheck(fields, channel, backend):
    spec = MirasSpec(**fields)
    leaves = used_leaves(spec, make_case(spec, B=1, T=5, H=1, D=2, channel=channel, seed=31))
    names = list(leaves)

    def fn(*tensors):
        lv = dict(zip(names, tensors))
        state = {n[len("state_"):]: t for n, t in lv.items() if n.startswith("state_")}
        y, st = miras_memory(
            lv["q"], lv["k"], lv["v"], lv.get("alpha"), lv["eta"], spec=spec, chunk_size=2,
            delta=lv.get("delta"), mu=lv.get("mu"), initial_state=state, output_final_state=True,
            backend=backend,
        )
        return (y, *[st[k] for k in sorted(st)])

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-5, rtol=1e-3)
