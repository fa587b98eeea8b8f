"""Issue #17: ``step_at`` (gradient at the previous or at the retained state) and ``chunk_rule``
(mini-batch GD or the exact delta rule) on the torch path, and the presets named after published
models computing those models.

* The token loop (``recurrent.py``, THE definition) at chunk 1 equals hand-written DeltaNet and
  Gated DeltaNet loops (the order of the published recurrences), and ``chunk_rule="exact"``
  ignores the chunk size there.
* The exact chunk-parallel form (``pytorch/delta_exact.py``, WY / UT transform) equals the token
  loop at chunk 1/16/64 with T not a multiple of C, varlen, initial and final state, per-channel
  alpha: forward and the gradients of q, k, v, alpha, eta and the initial state.
* ``step_at="retained"`` with mini-batch GD: chunked == token loop for every memory x retention x
  learner at C > 1, forward and all gradients.
* The exported model's step (``chunk_step.memory_chunk_step``) fed in runs that split chunks
  equals the token loop for both new rules.

Tolerances, float64, relative (max |diff| / max |reference| per tensor): 1e-9 (observed <= 1e-15
for the exact form and <= 1e-12 for the mini-batch grid; only the summation order differs).
float32 exact form at C = 64 vs the float64 token loop: 1e-5 (observed 6e-7). Hand loops and the
chunk step: 1e-12 absolute.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from miras_kernels import MirasSpec
from miras_kernels.chunk_step import carry_frozen, freeze, memory_chunk_step
from miras_kernels.pytorch.recurrent import miras_memory_recurrent
from test_ops_helpers import assert_close_all, call, make_case, outputs_and_grads

TOL64 = 1e-9

EXACT_SPECS = {
    "deltanet": dict(preset="deltanet"),
    "gated_delta": dict(preset="gated_delta"),
    "delta-decay-previous": dict(preset="gated_delta", step_at="previous"),
}


def _spec(fields: dict) -> MirasSpec:
    fields = dict(fields)
    return MirasSpec.preset(fields.pop("preset"), chunk_rule="exact", **fields)


def _hand_delta(q, k, v, alpha, eta, W0, retained: bool):
    """DeltaNet / Gated DeltaNet as published, one token at a time ([B, T, H, D] inputs, W [B, H, dv, dk]):
    previous: W_t = W_{t-1}(alpha_t I - eta_t k kᵀ) + eta_t v kᵀ; retained: alpha_t W_{t-1}(I - eta_t k kᵀ) + eta_t v kᵀ."""
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    W, ys = W0, []
    for t in range(q.shape[1]):
        a = alpha[:, t, :, None, None]
        kk = k[:, t, :, :, None] @ k[:, t, :, None, :]
        vk = v[:, t, :, :, None] @ k[:, t, :, None, :]
        b = eta[:, t, :, None, None]
        W = (a * W @ (eye - b * kk) if retained else W @ (a * eye - b * kk)) + b * vk
        ys.append((W @ q[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), W


@pytest.mark.parametrize("retained", [False, True], ids=["previous", "retained"])
def test_token_loop_is_the_published_delta_rule(retained):
    """At chunk 1 the definition is DeltaNet's / Gated DeltaNet's recurrence; with chunk_rule
    exact it is that recurrence at every chunk size; with mini-batch GD at C > 1 it is not."""
    spec_mb = MirasSpec.preset("gated_delta", step_at="retained" if retained else "previous", chunk_rule="minibatch")
    leaves = make_case(spec_mb, B=2, T=11, H=2, D=6, seed=3, grad=False, state_batch=True)
    q, k, v, alpha, eta, W0 = (leaves[n] for n in ("q", "k", "v", "alpha", "eta", "state_W"))
    y_hand, W_hand = _hand_delta(q, k, v, alpha, eta, W0, retained)
    runs = [(spec_mb, 1), (MirasSpec.preset("gated_delta", step_at=spec_mb.step_at, chunk_rule="exact"), 16)]
    for spec, C in runs:
        y, st = miras_memory_recurrent(q, k, v, alpha, eta, spec=spec, chunk_size=C, initial_state={"W": W0},
                                       output_final_state=True)
        assert (y - y_hand).abs().max().item() <= 1e-12, (spec.chunk_rule, C)
        assert (st["W"] - W_hand).abs().max().item() <= 1e-12, (spec.chunk_rule, C)
    y_mb, _ = miras_memory_recurrent(q, k, v, alpha, eta, spec=spec_mb, chunk_size=4, initial_state={"W": W0})
    assert (y_mb - y_hand).abs().max().item() > 1e-3  # mini-batch GD is a different model


def test_retention_none_orders_agree():
    """Retention none has alpha = 1: the two step_at orders are the same rule (DeltaNet)."""
    a, b = (MirasSpec.preset("deltanet", step_at=s) for s in ("previous", "retained"))
    leaves = make_case(a, B=1, T=9, H=2, D=4, seed=4, grad=False)
    ya, _ = call(a, leaves, "recurrent", 4)
    yb, _ = call(b, leaves, "recurrent", 4)
    assert torch.equal(ya, yb)


@pytest.mark.parametrize("C,T", [(1, 7), (16, 37), (64, 37)], ids=["C1-T7", "C16-T37", "C64-T37"])
@pytest.mark.parametrize("name", list(EXACT_SPECS))
def test_exact_chunked_equals_token_loop(name, C, T):
    spec = _spec(EXACT_SPECS[name])
    leaves = make_case(spec, B=2, T=T, H=2, D=8, seed=5, eta_scale=1.0, state_batch=True)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", C))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", C))
    assert_close_all(got, ref, TOL64, f"{name} C={C} T={T}")


@pytest.mark.parametrize("step_at", ["previous", "retained"])
def test_exact_chunked_per_channel_alpha(step_at):
    spec = MirasSpec.preset("gated_delta", step_at=step_at, chunk_rule="exact")
    leaves = make_case(spec, B=1, T=21, H=2, D=4, seed=6, channel=True, eta_scale=1.0)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 8))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 8))
    assert_close_all(got, ref, TOL64, f"per-channel {step_at}")


@pytest.mark.parametrize("name", ["deltanet", "gated_delta"])
def test_exact_chunked_varlen(name):
    """Documents packed in one row (cu_seqlens): the state and the chunk grid restart at each
    document; per-document initial and final states."""
    spec = _spec(EXACT_SPECS[name])
    leaves = make_case(spec, B=1, T=30, H=2, D=4, seed=7, eta_scale=1.0)
    cu = torch.tensor([0, 5, 5, 23, 30])
    leaves["state_W"] = (0.5 * torch.randn(4, 2, 4, 4, dtype=torch.float64)).requires_grad_(True)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 16, cu_seqlens=cu))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 16, cu_seqlens=cu))
    assert_close_all(got, ref, TOL64, f"{name} varlen")


def test_exact_chaining_at_any_split_equals_one_call():
    """The exact rule has no chunk grid: a split off the grid (t = 5, C = 8) equals one call."""
    spec = MirasSpec.preset("gated_delta")
    leaves = make_case(spec, B=1, T=20, H=2, D=4, seed=22, grad=False)
    y, _ = call(spec, leaves, "chunked", 8)
    first = {n: t[:, :5] if t.dim() > 3 or n in ("alpha", "eta", "delta", "mu") else t for n, t in leaves.items()}
    y1, s1 = call(spec, first, "chunked", 8)
    second = {n: t[:, 5:] if t.dim() > 3 or n in ("alpha", "eta", "delta", "mu") else t for n, t in leaves.items()}
    second["state_W"] = s1["W"]
    y2, _ = call(spec, second, "chunked", 8)
    assert (torch.cat([y1, y2], dim=1) - y).abs().max().item() <= 1e-12


GRID = [dict(memory=m, retention=r, learner=lr)
        for m, r, lr in itertools.product(("linear", "mlp"), ("none", "decay", "lq", "kl"), ("gd", "momentum"))]


@pytest.mark.parametrize("fields", GRID, ids=lambda f: "-".join(f.values()))
def test_retained_minibatch_chunked_equals_token_loop(fields):
    """step_at retained, mini-batch GD, C = 4 (T = 10: a partial last chunk), every memory x
    retention x learner (bias l2; huber for the MLP so its branch logic is crossed too)."""
    spec = MirasSpec(**fields, bias="l2" if fields["memory"] == "linear" else "huber", step_at="retained",
                     expansion=2)
    leaves = make_case(spec, B=1, T=10, H=2, D=4, seed=8)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 4))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 4))
    assert_close_all(got, ref, TOL64, str(fields))


@pytest.mark.parametrize("retention", ["decay", "lq", "kl"])
def test_retained_minibatch_per_channel_alpha(retention):
    spec = MirasSpec(memory="linear", bias="l2", retention=retention, step_at="retained")
    leaves = make_case(spec, B=1, T=10, H=2, D=4, seed=9, channel=True)
    ref = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "recurrent", 4))
    got = outputs_and_grads(spec, leaves, lambda lv: call(spec, lv, "chunked", 4))
    assert_close_all(got, ref, TOL64, f"per-channel {retention}")


def test_retained_minibatch_token_loop_at_chunk_start():
    """The definition of step_at retained at C > 1: token i takes its gradient at
    materialize(gamma_i X_{t0}); checked by hand for lq (the non-trivial materialize) on the
    first chunk's second token."""
    spec = MirasSpec(memory="linear", bias="l2", retention="lq", step_at="retained")
    leaves = make_case(spec, B=1, T=2, H=1, D=4, seed=10, grad=False)
    q, k, v, alpha, eta, X0 = (leaves[n] for n in ("q", "k", "v", "alpha", "eta", "state_W"))
    X0 = X0[0]  # [H = 1, r, c] -> [r, c]
    X = X0
    for t in range(2):
        P = spec.materialize(alpha[0, : t + 1, 0].prod() * X0)
        g = (P @ k[0, t, 0] - v[0, t, 0])[:, None] * k[0, t, 0][None, :]
        X = alpha[0, t, 0] * X - eta[0, t, 0] * g
    y, st = miras_memory_recurrent(q, k, v, alpha, eta, spec=spec, chunk_size=2, initial_state={"W": X0[None]},
                                   output_final_state=True)
    assert (st["W"][0, 0] - X).abs().max().item() <= 1e-12
    assert (y[0, 1, 0] - spec.materialize(X) @ q[0, 1, 0]).abs().max().item() <= 1e-12


CHUNK_STEP = [
    dict(preset="gated_delta"), dict(preset="deltanet"),
    dict(memory="mlp", bias="l2", retention="lq", learner="momentum", step_at="retained", expansion=2),
    dict(memory="linear", bias="l2", retention="kl", learner="gd", step_at="retained"),
    dict(memory="mlp", bias="l2", retention="decay", learner="gd", step_at="retained", expansion=2),
]


@pytest.mark.parametrize("fields", CHUNK_STEP, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_chunk_step_in_runs_equals_token_loop(fields):
    """The exported model's step: chunks of 6 fed in runs cut inside chunks (freeze at each
    chunk start, carry_frozen between runs) equal the token loop."""
    fields = dict(fields)
    name = fields.pop("preset", None)
    spec = MirasSpec.preset(name, **fields) if name else MirasSpec(**fields)
    leaves = make_case(spec, B=2, T=14, H=2, D=4, seed=13, grad=False, state_batch=True)
    lv = {n: (None if n == "alpha" and not spec.needs_alpha else None if n == "mu" and not spec.needs_mu else t)
          for n, t in leaves.items()}
    X = {n: leaves["state_" + n] for n in spec.weight_names()}
    S = {n: leaves["state_S_" + n] for n in spec.weight_names()} if spec.needs_mu else {}
    y_ref, final = call(spec, leaves, "recurrent", 6)
    C, ys, pos, frozen = 6, [], 0, {}
    for end in (2, 3, 6, 11, 12, 14):
        if pos % C == 0:
            frozen = freeze(spec, X)
        hm = lambda t: None if t is None else t[:, pos:end].transpose(1, 2)  # noqa: E731
        y, X, S = memory_chunk_step(spec, *(hm(lv[n]) for n in ("q", "k", "v", "alpha", "eta", "delta", "mu")),
                                    X, S, frozen)
        frozen = carry_frozen(spec, frozen, hm(lv["alpha"]))
        ys.append(y.transpose(1, 2))
        pos = end
    assert (torch.cat(ys, 1) - y_ref).abs().max().item() <= 1e-12
    for n in spec.weight_names():
        assert (X[n] - final[n]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("fields, needle", [
    (dict(memory="mlp", bias="l2", retention="decay", chunk_rule="exact"), "chunk_rule='exact' is not valid"),
    (dict(memory="linear", bias="dot", retention="decay", chunk_rule="exact"), "exact chunking exists only"),
    (dict(memory="linear", bias="l2", retention="lq", chunk_rule="exact"), "use chunk_rule='minibatch'"),
    (dict(memory="linear", bias="l2", retention="decay", learner="momentum", chunk_rule="exact"), "learner gd"),
    (dict(step_at="after"), "MirasSpec.step_at='after' is not valid: choose one of previous, retained"),
    (dict(chunk_rule="wy"), "MirasSpec.chunk_rule='wy' is not valid"),
])
def test_spec_errors_are_one_line(fields, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        MirasSpec(**fields)
    assert "\n" not in str(err.value)


def test_presets_compute_the_published_models():
    assert MirasSpec.preset("deltanet").chunk_rule == "exact"
    gd = MirasSpec.preset("gated_delta")
    assert (gd.chunk_rule, gd.step_at) == ("exact", "retained")
    for name in ("moneta", "yaad", "memora", "titans", "ttt_mlp", "linear_attn", "gla"):
        spec = MirasSpec.preset(name)
        assert (spec.chunk_rule, spec.step_at) == ("minibatch", "previous"), name


@pytest.mark.parametrize("name", ["deltanet", "gated_delta"])
def test_exact_chunked_float32_at_chunk_64(name):
    """float32 with 64-token triangular solves (eta up to 1, D 16) against the float64 token loop:
    relative 1e-5 per tensor (observed 6e-7: the solve's rounding does not compound)."""
    spec = _spec(EXACT_SPECS[name])
    leaves64 = make_case(spec, B=1, T=150, H=2, D=16, seed=15, eta_scale=1.0)
    leaves32 = {n: t.detach().float().requires_grad_() for n, t in leaves64.items()}
    ref = outputs_and_grads(spec, leaves64, lambda lv: call(spec, lv, "recurrent", 64))
    got = outputs_and_grads(spec, leaves32, lambda lv: call(spec, lv, "chunked", 64))
    got = tuple({n: t.double() for n, t in part.items()} if isinstance(part, dict) else part.double() for part in got)
    assert_close_all(got, ref, 1e-5, f"{name} float32 C=64")


@pytest.mark.parametrize("miras", [dict(preset="titans", step_at="retained"), dict(preset="memora", step_at="retained")],
                         ids=["titans-retained", "memora-retained"])
def test_export_runs_retained_minibatch_like_training(miras, tmp_path, monkeypatch):
    """The exported model (copied operator modules, recurrent cache) computes step_at retained
    with mini-batch GD as training does: full pass within 1e-5, prefill in pieces that cut chunks
    (``carry_frozen`` between them) within 5e-5 (fp32; the tolerances of test_export_parity.py)."""
    from transformers import AutoModelForCausalLM

    from miras_pretrain.export import export_hf
    from miras_pretrain.model import build_model
    from miras_pretrain.testing.tiny_models import tiny_config, tiny_tokenizer

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    cfg = tiny_config(miras=miras)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = tmp_path / f"retained-{miras['preset']}-{tmp_path.name}"  # unique: transformers caches by name
    export_hf(cfg, model.state_dict(), tiny_tokenizer(tmp_path / "tok"), out)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        ref = model(x)
        assert (hf(input_ids=x, use_cache=False).logits - ref).abs().max().item() <= 1e-5
        cache, parts, prev = None, [], 0
        for c in (3, 4, 13, 29):  # runs that start and end inside chunks of 8
            o = hf(input_ids=x[:, prev:c], past_key_values=cache, use_cache=True)
            cache, prev = o.past_key_values, c
            parts.append(o.logits)
        assert (torch.cat(parts, 1) - ref).abs().max().item() <= 5e-5
