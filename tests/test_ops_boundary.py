"""Boundary chunking (``MirasSpec.retention_chunking="boundary"``, ``kernels/pytorch/boundary.py``,
docs/semantics.md "Boundary chunking"): lq's normalisation and kl's softmax only at chunk
boundaries, linear reads in between.

* The chunk-parallel form equals the token loop (the definition): moneta / memora presets at
  C 16 and 64 with T not a multiple of C, varlen with an empty document and per-document initial
  states, momentum and linear memories (per-head and per-channel alpha), ``step_at="retained"``;
  forward, final state and the gradient of every input (q, k, v, gates, initial state).
* C = 1 is the per-token form: the loop bit for bit, the chunked form to rounding.
* Properties of the definition: the final state and the outputs of tokens that end a full chunk
  equal the per-token form's (the other tokens differ); no output depends on the tokens after
  it (a partial last chunk reads the linear continuation); chaining two calls at a multiple of C
  equals one call.
* Spec errors and the Triton dispatch's refusal.

Tolerances (relative, max |diff| / max |reference| per tensor, as tests/test_ops_chunked.py):
float64 1e-9 (only rounding differs; the MLP's layer norm amplifies it; observed <= 6e-12);
float32 1e-3 for the MLP memory (observed <= 8e-5).
"""

from __future__ import annotations

import pytest
import torch

from miras_kernels import MirasSpec, miras_memory
from miras_kernels.dispatch import supports
from test_ops_helpers import assert_close_all, call, make_case, outputs_and_grads, rel_err

TOL64 = 1e-9
TOL32 = 1e-3


def _boundary(name: str, **fields) -> MirasSpec:
    return MirasSpec.preset(name, retention_chunking="boundary", **fields)


def _compare(spec, leaves, C, tol, what, **kw):
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", C, **kw))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", C, **kw))
    assert_close_all(got, ref, tol, what)
    return ref


# (chunk size, T): T not a multiple of C at both paper chunk sizes, and a sequence shorter than C
GRIDS = [(16, 37), (64, 70), (64, 9)]


@pytest.mark.parametrize("C,T", GRIDS, ids=[f"C{c}-T{t}" for c, t in GRIDS])
@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_presets_chunked_equals_loop(name, C, T):
    spec = _boundary(name)
    leaves = make_case(spec, B=2, T=T, H=2, D=4, seed=101)
    _compare(spec, leaves, C, TOL64, f"{name} boundary C={C} T={T}")


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_varlen_chunked_equals_loop(name):
    spec = _boundary(name)
    leaves = make_case(spec, B=1, T=23, H=2, D=4, seed=102, state_batch=True)
    for n in [k for k in leaves if k.startswith("state_")]:  # one initial state per document
        scale = torch.tensor([1.0, 0.7, 1.2], dtype=torch.float64, device=leaves[n].device).view(3, 1, 1, 1)
        leaves[n] = (leaves[n].detach().repeat(3, 1, 1, 1) * scale).requires_grad_()
    cu = torch.tensor([0, 7, 7, 23], dtype=torch.int64)  # an empty document, partial chunks
    _compare(spec, leaves, 4, TOL64, f"{name} boundary varlen", cu_seqlens=cu)


GRID = [  # (spec fields, per-channel alpha): per-channel gates exist for linear memories only
    (dict(memory="mlp", bias="lp", retention="lq", learner="momentum"), False),
    (dict(memory="mlp", bias="l2", retention="kl", learner="momentum"), False),
    (dict(memory="linear", bias="l2", retention="kl", learner="gd"), True),
    (dict(memory="linear", bias="l2", retention="kl", learner="momentum"), True),
    (dict(memory="linear", bias="huber", retention="lq", learner="gd"), False),
    (dict(memory="linear", bias="dot", retention="lq", learner="momentum", q=3.0), True),
]
GRID_IDS = ["-".join(str(v) for v in f.values()) + ("-channel" if ch else "") for f, ch in GRID]


@pytest.mark.parametrize("fields,channel", GRID, ids=GRID_IDS)
def test_grid_chunked_equals_loop(fields, channel):
    spec = MirasSpec(**fields, retention_chunking="boundary")
    leaves = make_case(spec, B=2, T=19, H=2, D=4, channel=channel, seed=103)
    _compare(spec, leaves, 8, TOL64, str(fields))


@pytest.mark.parametrize("name,fields", [
    ("moneta", {}), ("memora", {}),
    ("memora", dict(memory="linear")),  # kl on a linear memory, per-channel alpha below
])
def test_retained_chunked_equals_loop(name, fields):
    spec = _boundary(name, step_at="retained", **fields)
    leaves = make_case(spec, B=2, T=13, H=2, D=4, channel=spec.memory == "linear", seed=104)
    _compare(spec, leaves, 4, TOL64, f"{name} {fields} boundary retained")


def test_float32_chunked_equals_loop():
    for name in ("moneta", "memora"):
        spec = _boundary(name)
        leaves = make_case(spec, B=2, T=21, H=2, D=8, dtype=torch.float32, seed=105)
        _compare(spec, leaves, 8, TOL32, f"{name} float32")


CASES_C1 = [("moneta", {}), ("memora", {}), ("memora", dict(learner="momentum")),
            ("moneta", dict(step_at="retained")), ("memora", dict(step_at="retained"))]


@pytest.mark.parametrize("name,fields", CASES_C1, ids=[f"{n}-{'-'.join(f.values()) or 'gd'}" for n, f in CASES_C1])
def test_chunk_size_one_is_per_token(name, fields):
    """At C = 1 every token ends a full chunk: the per-token form exactly (the loops run the same
    ops, so bit for bit; the chunked form to rounding)."""
    boundary, per_token = _boundary(name, **fields), MirasSpec.preset(name, **fields)
    leaves = make_case(per_token, B=2, T=7, H=2, D=4, seed=106)
    ref = outputs_and_grads(per_token, leaves, lambda lv: call(per_token, lv, "recurrent", 1))
    loop = outputs_and_grads(boundary, leaves, lambda lv: call(boundary, lv, "recurrent", 1))
    assert_close_all(loop, ref, 0.0, f"{name} {fields} boundary loop at C=1")
    chunked = outputs_and_grads(boundary, leaves, lambda lv: call(boundary, lv, "chunked", 1))
    assert_close_all(chunked, ref, TOL64, f"{name} {fields} boundary chunked at C=1")


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_agrees_with_per_token_exactly_where_the_definition_says(name):
    """Same state recurrence: the final state and the reads of the tokens that end a full chunk
    (positions C-1, 2C-1, ...) equal the per-token form's; the linear reads in between differ."""
    C, T = 4, 11
    boundary, per_token = _boundary(name), MirasSpec.preset(name)
    leaves = make_case(per_token, B=2, T=T, H=2, D=4, seed=107)
    with torch.no_grad():
        yb, sb = call(boundary, leaves, "chunked", C)
        yp, sp = call(per_token, leaves, "chunked", C)
    for key in sp:
        assert rel_err(sb[key], sp[key]) <= TOL64, key
    ends = torch.arange(C - 1, T, C)
    assert rel_err(yb[:, ends], yp[:, ends]) <= TOL64
    inner = torch.tensor([t for t in range(T) if t % C != C - 1 and t % C != 0])
    assert rel_err(yb[:, inner], yp[:, inner]) > 1e-3, "boundary reads inside a chunk should be linear, not per-token"


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_outputs_do_not_depend_on_later_tokens(name):
    """T = 10 with C = 4 ends in a partial chunk: its tokens read the linear continuation, so the
    outputs equal the first 10 outputs of a longer sequence (where that chunk is full)."""
    spec = _boundary(name)
    leaves = make_case(spec, B=1, T=12, H=2, D=4, seed=108, grad=False)
    short = {n: (t[:, :10] if t.dim() >= 3 and t.shape[1] == 12 else t) for n, t in leaves.items()}
    for backend in ("recurrent", "chunked"):
        y_long, _ = call(spec, leaves, backend, 4)
        y_short, _ = call(spec, short, backend, 4)
        assert rel_err(y_short, y_long[:, :10]) <= TOL64, backend


def test_chaining_at_a_multiple_of_c_equals_one_call():
    spec = _boundary("memora", learner="momentum")
    leaves = make_case(spec, B=2, T=14, H=2, D=4, seed=109, grad=False, state_batch=True)
    y_all, s_all = call(spec, leaves, "chunked", 4)
    first = {n: (t[:, :8] if t.dim() >= 3 and t.shape[1] == 14 else t) for n, t in leaves.items()}
    second = {n: (t[:, 8:] if t.dim() >= 3 and t.shape[1] == 14 else t) for n, t in leaves.items()}
    y1, s1 = call(spec, first, "chunked", 4)
    second.update({"state_" + k: t for k, t in s1.items()})
    y2, s2 = call(spec, second, "recurrent", 4)
    assert rel_err(torch.cat([y1, y2], dim=1), y_all) <= TOL64
    for key in s_all:
        assert rel_err(s2[key], s_all[key]) <= TOL64, key


def test_spec_errors():
    with pytest.raises(ValueError, match="retention_chunking='boundary' is not valid for retention='decay'"):
        MirasSpec.preset("yaad", retention_chunking="boundary")
    with pytest.raises(ValueError, match="retention_chunking='boundary' is not valid for retention='none'"):
        MirasSpec.preset("ttt_mlp", retention_chunking="boundary")
    with pytest.raises(ValueError, match="retention_chunking='chunk' is not valid: choose one of per_token, boundary"):
        MirasSpec.preset("moneta", retention_chunking="chunk")
    assert MirasSpec.from_dict({"preset": "memora", "retention_chunking": "boundary"}).retention_chunking == "boundary"


@pytest.mark.triton  # needs triton installed (the optional 'kernels' extra) to reach this reason
def test_triton_refuses_and_falls_back_to_chunked(monkeypatch):
    """``supports`` names the reason; backend='triton' then runs the chunked path (one warning)."""
    import miras_kernels.api as api

    monkeypatch.setattr(api, "_warned_fallbacks", set())  # the warning is once per process
    spec = _boundary("memora")
    leaves = make_case(spec, B=1, T=6, H=2, D=16, seed=110, grad=False)
    state = {n[len("state_"):]: t for n, t in leaves.items() if n.startswith("state_")}
    ok, reason = supports(spec, leaves["q"].float(), chunk_size=16, initial_state=state)
    assert not ok and "retention_chunking='boundary'" in reason
    with pytest.warns(RuntimeWarning, match="retention_chunking='boundary'"):
        y, _ = miras_memory(leaves["q"], leaves["k"], leaves["v"], leaves["alpha"], leaves["eta"], spec=spec,
                            chunk_size=4, initial_state=state, backend="triton")
    y_ref, _ = call(spec, leaves, "recurrent", 4)
    assert rel_err(y, y_ref) <= TOL64
