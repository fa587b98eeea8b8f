"""Bad input -> one-line ValueError naming the field (and the fix)."""

from __future__ import annotations

import pytest
import torch

from miras_kernels import MirasSpec, miras_memory

B, T, H, D = 2, 6, 2, 4


def _base(spec: MirasSpec) -> dict:
    r = lambda *s: torch.rand(*s, dtype=torch.float64)  # noqa: E731
    kw = dict(q=r(B, T, H, D), k=r(B, T, H, D), v=r(B, T, H, D), alpha=r(B, T, H), eta=r(B, T, H),
              spec=spec, delta=r(B, T, H), mu=r(B, T, H))
    if spec.memory == "mlp":
        kw["initial_state"] = {n: r(H, rr, cc) for n, (rr, cc) in spec.weight_shapes(D, D).items()}
    return kw


def _packed(kw: dict, offsets: list[int]) -> None:
    """B = 1 inputs with the given cu_seqlens."""
    for n in ("q", "k", "v", "alpha", "eta", "delta", "mu"):
        kw[n] = kw[n][:1]
    kw["cu_seqlens"] = torch.tensor(offsets)


LIN = MirasSpec.preset("gated_delta")
MLP = MirasSpec.preset("titans")
HUB = MirasSpec(memory="linear", bias="huber", retention="decay")
MOM = MirasSpec(memory="linear", bias="l2", retention="lq", learner="momentum")
KL = MirasSpec(memory="linear", bias="l2", retention="kl")

CASES = [
    ("spec", LIN, lambda kw: kw.update(spec={"memory": "linear"}), "spec must be a MirasSpec"),
    ("chunk0", LIN, lambda kw: kw.update(chunk_size=0), "chunk_size"),
    ("chunkfloat", LIN, lambda kw: kw.update(chunk_size=2.5), "chunk_size"),
    ("q3d", LIN, lambda kw: kw.update(q=kw["q"][0]), "q must have shape"),
    ("kshape", LIN, lambda kw: kw.update(k=kw["k"][:, :3]), "k must have the shape of q"),
    ("vshape", LIN, lambda kw: kw.update(v=kw["v"][:1]), "v must have shape"),
    ("qint", LIN, lambda kw: kw.update(q=kw["q"].long()), "q must be a floating-point"),
    ("dtypes", LIN, lambda kw: kw.update(v=kw["v"].float()), "q, k, v must share one dtype"),
    ("mlp-dv", MLP, lambda kw: kw.update(v=torch.rand(B, T, H, D + 1, dtype=torch.float64)), "dv=5 must equal dk=4"),
    ("eta-missing", LIN, lambda kw: kw.update(eta=None), "eta is required"),
    ("eta-shape", LIN, lambda kw: kw.update(eta=kw["eta"][:, :2]), "eta must have shape"),
    ("alpha-missing", LIN, lambda kw: kw.update(alpha=None), "alpha is required for retention='decay'"),
    ("alpha-missing-kl", KL, lambda kw: kw.update(alpha=None), "alpha is required for retention='kl'"),
    ("alpha-shape", LIN, lambda kw: kw.update(alpha=kw["alpha"][..., :1]), "alpha must have shape"),
    ("alpha-channel-mlp", MLP, lambda kw: kw.update(alpha=torch.rand(B, T, H, D, dtype=torch.float64)), "per-channel"),
    ("alpha-channel-shape", LIN, lambda kw: kw.update(alpha=torch.rand(B, T, H, D + 1, dtype=torch.float64)), "alpha must have shape"),
    ("delta-missing", HUB, lambda kw: kw.update(delta=None), "delta is required for bias='huber'"),
    ("mu-missing", MOM, lambda kw: kw.update(mu=None), "mu is required for learner='momentum'"),
    ("mlp-no-state", MLP, lambda kw: kw.update(initial_state=None), "initial_state is required for memory='mlp'"),
    ("state-not-dict", LIN, lambda kw: kw.update(initial_state=torch.zeros(H, D, D)), "initial_state must be a dict"),
    ("state-unknown", LIN, lambda kw: kw.update(initial_state={"W": torch.zeros(H, D, D), "W9": torch.zeros(1)}), "unknown key"),
    ("state-missing", MLP, lambda kw: kw["initial_state"].pop("W1"), "missing key 'W1'"),
    ("state-shape", LIN, lambda kw: kw.update(initial_state={"W": torch.zeros(3, H, D, D, dtype=torch.float64)}), "initial_state['W'] must have shape"),
    ("cu-batch", LIN, lambda kw: kw.update(cu_seqlens=torch.tensor([0, T])), "cu_seqlens needs batch size B == 1"),
    ("cu-end", LIN, lambda kw: _packed(kw, [0, 2, T - 1]), "cu_seqlens must start at 0, end at T"),
    ("cu-order", LIN, lambda kw: _packed(kw, [0, 4, 2, T]), "non-decreasing"),
    ("cu-float", LIN, lambda kw: kw.update(cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens must be a 1-D int"),
    ("backend", LIN, lambda kw: kw.update(backend="cuda"), "backend='cuda' is not valid"),
]


@pytest.mark.parametrize("spec,mutate,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_one_line(spec, mutate, message):
    kw = _base(spec)
    mutate(kw)
    q, k, v, alpha, eta = (kw.pop(n) for n in ("q", "k", "v", "alpha", "eta"))
    with pytest.raises(ValueError) as info:
        miras_memory(q, k, v, alpha, eta, **kw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_ignored_gates_are_accepted():
    """Gates a spec does not use (alpha for retention 'none', delta/mu) are ignored."""
    spec = MirasSpec.preset("deltanet")
    kw = _base(spec)
    y1, _ = miras_memory(kw["q"], kw["k"], kw["v"], kw["alpha"], kw["eta"], spec=spec, delta=kw["delta"], mu=kw["mu"])
    y2, _ = miras_memory(kw["q"], kw["k"], kw["v"], None, kw["eta"], spec=spec)
    assert torch.equal(y1, y2)
