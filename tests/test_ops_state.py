"""State handling: chaining with the returned state, varlen (cu_seqlens) == separate runs,
state broadcasting/defaults, and the low-precision contract (bf16 in -> fp32 state).

Float64 throughout except the dtype test; tolerance 1e-10 relative where two computations of
the same thing differ only by rounding (observed <= 1e-13).
"""

from __future__ import annotations

import pytest
import torch

from miras_kernels import MirasSpec, miras_memory
from miras_pretrain.testing.devices import test_device as device_under_test
from test_ops_helpers import call, make_case, outputs_and_grads, rel_err

TOL = 1e-10


def _slice(leaves: dict, s: int, e: int, state=None) -> dict:
    out = {n: t[:, s:e] for n, t in leaves.items() if not n.startswith("state_")}
    if state is None:
        out.update({n: t for n, t in leaves.items() if n.startswith("state_")})
    else:
        out.update({"state_" + n: t for n, t in state.items()})
    return out


@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", list(MirasSpec.PRESETS))
def test_chaining_on_chunk_grid_equals_one_pass(name, backend):
    """[0, t) then [t, T) with the returned state == one pass, for t on the chunk grid. (A split
    off the grid starts a new chunk at t, so it changes the chunk grid and the result.)"""
    spec = MirasSpec.preset(name)
    leaves = make_case(spec, B=2, T=29, H=2, D=4, seed=21, grad=False)
    C, t = 8, 16
    y, state = call(spec, leaves, backend, C)
    y1, s1 = call(spec, _slice(leaves, 0, t), backend, C)
    y2, s2 = call(spec, _slice(leaves, t, 29, s1), backend, C)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < TOL
    for key in state:
        assert rel_err(s2[key], state[key]) < TOL


def test_chaining_off_grid_changes_the_grid():
    """Documented behaviour: a split at t not a multiple of C restarts the chunk grid at t. It
    then equals the one pass only at C = 1 (every t is on the grid)."""
    spec = MirasSpec.preset("gated_delta", chunk_rule="minibatch")  # the exact rule has no grid
    leaves = make_case(spec, B=1, T=20, H=2, D=4, seed=22, grad=False)
    for C, same in ((8, False), (1, True)):
        y, _ = call(spec, leaves, "chunked", C)
        y1, s1 = call(spec, _slice(leaves, 0, 5), "chunked", C)
        y2, _ = call(spec, _slice(leaves, 5, 20, s1), "chunked", C)
        err = rel_err(torch.cat([y1, y2], dim=1), y)
        assert (err < TOL) == same, (C, err)


def _varlen_leaves(spec, lengths, seed, per_doc_state=True):
    T, N = sum(lengths), len(lengths)
    leaves = make_case(spec, B=1, T=T, H=2, D=4, seed=seed, grad=True)
    if per_doc_state:  # a different initial state per document: [N, H, r, c]
        g = torch.Generator().manual_seed(seed + 1)
        for n in [k for k in leaves if k.startswith("state_")]:
            base = leaves[n].detach()
            extra = torch.randn((N,) + tuple(base.shape), generator=g, dtype=torch.float64).to(base.device) * 0.2
            leaves[n] = (base.unsqueeze(0) + extra).requires_grad_(True)
    return leaves


@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
@pytest.mark.parametrize("name", list(MirasSpec.PRESETS))
def test_varlen_equals_separate_runs(name, backend):
    spec = MirasSpec.preset(name)
    lengths = [7, 13, 1, 12]
    cu = torch.tensor([0, 7, 20, 21, 33], dtype=torch.int32, device=device_under_test())
    leaves = _varlen_leaves(spec, lengths, seed=23)
    y, state = call(spec, leaves, backend, 5, cu_seqlens=cu)
    assert y.shape == (1, 33, 2, 4)
    for j, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc_state = {n[len("state_"):]: t[j] for n, t in leaves.items() if n.startswith("state_")}
        yj, sj = call(spec, _slice(leaves, s, e, doc_state), backend, 5)
        assert rel_err(y[:, s:e], yj) < TOL, j
        for key in sj:
            assert state[key].shape[0] == len(lengths)
            assert rel_err(state[key][j : j + 1], sj[key]) < TOL, (j, key)


def test_varlen_gradients_equal_separate_runs():
    spec = MirasSpec.preset("titans")
    cu = torch.tensor([0, 9, 25], dtype=torch.int64, device=device_under_test())
    leaves = _varlen_leaves(spec, [9, 16], seed=24)

    def separate(lv):
        ys, states = [], []
        for j, (s, e) in enumerate(((0, 9), (9, 25))):
            doc_state = {n[len("state_"):]: t[j] for n, t in lv.items() if n.startswith("state_")}
            yj, sj = call(spec, _slice(lv, s, e, doc_state), "chunked", 4)
            ys.append(yj)
            states.append(sj)
        return torch.cat(ys, dim=1), {k: torch.cat([st[k] for st in states]) for k in states[0]}

    ref = outputs_and_grads(spec, leaves, separate)
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 4, cu_seqlens=cu))
    for key in ref[2]:
        assert rel_err(got[2][key], ref[2][key]) < TOL, key


def test_varlen_broadcast_state_and_defaults():
    """[H, r, c] initial state is shared by every document; omitted state (linear memory) and
    omitted S_* keys are zeros."""
    spec = MirasSpec(memory="linear", bias="l2", retention="decay", learner="momentum")
    leaves = make_case(spec, B=1, T=15, H=2, D=4, seed=25, grad=False)
    cu = torch.tensor([0, 6, 6, 15], device=device_under_test())  # the empty middle document keeps its initial state
    y, st = call(spec, leaves, "chunked", 4, cu_seqlens=cu)
    assert st["W"].shape == (3, 2, 4, 4)
    assert torch.equal(st["W"][1], leaves["state_W"]) and torch.equal(st["S_W"][1], leaves["state_S_W"])
    for j, (s, e) in enumerate(((0, 6), (6, 6), (6, 15))):
        if e > s:
            yj, sj = call(spec, _slice(leaves, s, e), "chunked", 4)
            assert rel_err(y[:, s:e], yj) < TOL
            assert rel_err(st["W"][j : j + 1], sj["W"]) < TOL
    args = (leaves["q"], leaves["k"], leaves["v"], leaves["alpha"], leaves["eta"])
    kw = dict(spec=spec, mu=leaves["mu"], chunk_size=4, output_final_state=True)
    zeros = torch.zeros(2, 4, 4, dtype=torch.float64, device=device_under_test())
    y_none, s_none = miras_memory(*args, **kw)
    y_zero, s_zero = miras_memory(*args, initial_state={"W": zeros, "S_W": zeros}, **kw)
    y_part, _ = miras_memory(*args, initial_state={"W": zeros}, **kw)
    assert torch.equal(y_none, y_zero) and torch.equal(y_part, y_zero)
    assert torch.equal(s_none["S_W"], s_zero["S_W"])
    y_nofinal, s_nofinal = miras_memory(*args, spec=spec, mu=leaves["mu"], chunk_size=4)
    assert s_nofinal is None and torch.equal(y_nofinal, y_none)


@pytest.mark.parametrize("name", ["gated_delta", "moneta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_fp32_state(name, dtype):
    """bf16/fp16 inputs: the op computes and accumulates in fp32 (final state fp32) and casts y
    back, so it equals the fp32 computation on the upcast inputs exactly."""
    spec = MirasSpec.preset(name)
    leaves = make_case(spec, B=1, T=20, H=2, D=4, seed=26, grad=False, dtype=dtype)
    leaves = {n: (t.float() if n.startswith("state_") else t) for n, t in leaves.items()}
    y, st = call(spec, leaves, "chunked", 8)
    assert y.dtype == dtype and all(t.dtype == torch.float32 for t in st.values())
    up = {n: t.float() for n, t in leaves.items()}
    y32, st32 = call(spec, up, "chunked", 8)
    assert torch.equal(y, y32.to(dtype))
    for key in st:
        assert torch.equal(st[key], st32[key])
