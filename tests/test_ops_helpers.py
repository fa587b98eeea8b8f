"""Shared helpers for the ops tests (random inputs, an INDEPENDENT transcription of the
per-token rules of docs/semantics.md, gradient collection) plus sanity tests of the helpers themselves.

Inputs are drawn on the CPU (the same numbers everywhere) and put on ``test_device()``: the CPU, or
the GPU under ``MIRAS_TEST_DEVICE=cuda`` (miras_pretrain/testing/devices.py). The operators' float64
paths do no TF32 math (torch's fp32 matmul TF32 switch is off by default), so bounds are unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miras_kernels import MirasSpec, miras_memory
from miras_pretrain.testing.devices import test_device as device_under_test



def make_case(spec: MirasSpec, B=2, T=13, H=2, D=4, dtype=torch.float64, channel=False, seed=0,
              eta_scale=0.3, state_batch=False, grad=True):
    """Random well-conditioned inputs. Returns (args dict, leaves dict name -> tensor)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = F.normalize(r(B, T, H, D), dim=-1)
    k = F.normalize(r(B, T, H, D), dim=-1)
    v = r(B, T, H, D)
    alpha = 0.6 + 0.4 * torch.sigmoid(r(B, T, H, D) if channel else r(B, T, H))
    # the l_p bias (p=3) grows like e^2: keep its steps small so the inner loop stays stable
    eta = eta_scale * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    if spec.bias == "lp":
        eta = eta / 3
    delta = 0.3 + torch.rand(B, T, H, generator=g, dtype=torch.float64)  # some tokens on each branch
    mu = 0.5 + 0.4 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    state = {}
    lead = (B, H) if state_batch else (H,)
    for name, (rows, cols) in spec.weight_shapes(D, D).items():
        state[name] = r(*lead, rows, cols) * (1.5 / cols**0.5)
        if spec.learner == "momentum":
            state["S_" + name] = r(*lead, rows, cols) * 0.1
    leaves = dict(q=q, k=k, v=v, alpha=alpha, eta=eta, delta=delta, mu=mu)
    leaves.update({"state_" + n: t for n, t in state.items()})
    leaves = {n: t.to(device=device_under_test(), dtype=dtype).requires_grad_(grad) for n, t in leaves.items()}
    return leaves


def call(spec, leaves, backend, chunk_size, **kw):
    state = {n[len("state_"):]: t for n, t in leaves.items() if n.startswith("state_")}
    return miras_memory(
        leaves["q"], leaves["k"], leaves["v"], leaves["alpha"], leaves["eta"], spec=spec,
        chunk_size=chunk_size, delta=leaves["delta"], mu=leaves["mu"], initial_state=state,
        output_final_state=True, backend=backend, **kw,
    )


def used_leaves(spec: MirasSpec, leaves: dict) -> dict:
    """Leaves the spec actually reads (gates it ignores get no gradient)."""
    skip = set()
    if not spec.needs_alpha:
        skip.add("alpha")
    if not spec.needs_delta:
        skip.add("delta")
    if not spec.needs_mu:
        skip.add("mu")
    return {n: t for n, t in leaves.items() if n not in skip}


def outputs_and_grads(spec, leaves, fn, seed=1):
    """Run fn(leaves) -> (y, state); return y, state and the gradients of a random projection of
    (y, final state) w.r.t. every used leaf."""
    y, state = fn(leaves)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)).sum()
    for key in sorted(state):
        cot = torch.randn(state[key].shape, generator=g, dtype=torch.float64).to(state[key].device, state[key].dtype)
        loss = loss + (state[key] * cot).sum()
    used = used_leaves(spec, leaves)
    grads = torch.autograd.grad(loss, list(used.values()))
    return y.detach(), {k: s.detach() for k, s in state.items()}, dict(zip(used, grads))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the reference is b)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_close_all(got, ref, tol, what=""):
    y1, s1, g1 = got
    y2, s2, g2 = ref
    errs = {"y": rel_err(y1, y2)}
    errs.update({"state " + k: rel_err(s1[k], s2[k]) for k in s2})
    errs.update({"grad " + k: rel_err(g1[k], g2[k]) for k in g2})
    assert set(s1) == set(s2) and set(g1) == set(g2)
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol}: {bad}"


# ---------------------------------------------------------------------------------------------
# Independent transcription of the per-token rules of docs/semantics.md (chunk size 1). Uses torch.autograd.grad on
# the inner loss (create_graph=True keeps it differentiable) instead of the op's closed forms.
# ---------------------------------------------------------------------------------------------
EPS = 1e-6  # the l_p bias's smooth |x|; the Huber l1 branch uses spec.huber_eps


def notes_materialize(spec: MirasSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.retention == "lq":
        qn = (x.abs() ** spec.q).sum(dim=(-2, -1), keepdim=True) ** (1.0 / spec.q)
        return x / (qn + spec.lq_eps) ** (spec.q - 2.0)
    if spec.retention == "kl":
        return spec.c * torch.softmax(x, dim=-1)
    return x


def notes_memory(spec: MirasSpec, W: dict, x: torch.Tensor) -> torch.Tensor:
    """M(W, x) for x [B, H, d]."""
    if spec.memory == "linear":
        return torch.einsum("bhrc,bhc->bhr", W["W"], x)
    hid = F.gelu(torch.einsum("bhrc,bhc->bhr", W["W2"], x))
    o = torch.einsum("bhrc,bhc->bhr", W["W1"], hid)
    return x + F.layer_norm(o, (o.shape[-1],), eps=1e-5)


def notes_loss(spec: MirasSpec, W: dict, k, v, delta) -> torch.Tensor:
    out = notes_memory(spec, W, k)
    e = out - v
    if spec.bias == "dot":
        return -(out * v).sum()
    if spec.bias == "l2":
        return 0.5 * (e * e).sum()
    if spec.bias == "lp":
        return ((e * e + EPS) ** (spec.p / 2.0)).sum()
    per_head_l2 = 0.5 * (e * e).sum(-1)
    per_head_l1 = delta * torch.sqrt(e * e + spec.huber_eps).sum(-1)
    inside = torch.linalg.vector_norm(e, dim=-1) <= delta
    return torch.where(inside, per_head_l2, per_head_l1).sum()


def notes_reference(spec: MirasSpec, leaves: dict):
    """Per-token rules of docs/semantics.md for [B, T, H, D] inputs; returns (y, final state)."""
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    B, T, H, D = q.shape
    names = spec.weight_names()
    X, S = {}, {}
    for n, (r, c) in spec.weight_shapes(D, D).items():
        X[n] = leaves["state_" + n].expand(B, H, r, c)
        if spec.learner == "momentum":
            S[n] = leaves["state_S_" + n].expand(B, H, r, c)
    ys = []
    for t in range(T):
        if spec.retention == "none":
            a = 1.0
        elif leaves["alpha"].dim() == 4:
            a = leaves["alpha"][:, t, :, None, :]
        else:
            a = leaves["alpha"][:, t, :, None, None]
        # step_at="retained" (Gated DeltaNet's order): the gradient at the retained state a * X
        point = (lambda x: a * x) if spec.step_at == "retained" else (lambda x: x)
        W = {n: notes_materialize(spec, point(X[n])) for n in names}
        W = {n: w if w.requires_grad else w.detach().requires_grad_() for n, w in W.items()}
        with torch.enable_grad():
            loss = notes_loss(spec, W, k[:, t], v[:, t], leaves["delta"][:, t])
            grads = torch.autograd.grad(loss, [W[n] for n in names], create_graph=True)
        for n, g in zip(names, grads):
            eta = leaves["eta"][:, t, :, None, None]
            if spec.learner == "momentum":
                S[n] = leaves["mu"][:, t, :, None, None] * S[n] - eta * g
                X[n] = a * X[n] + S[n]
            else:
                X[n] = a * X[n] - eta * g
        ys.append(notes_memory(spec, {n: notes_materialize(spec, X[n]) for n in names}, q[:, t]))
    final = dict(X)
    final.update({"S_" + n: s for n, s in S.items()})
    return torch.stack(ys, dim=1), final


def test_reference_matches_linear_attention_closed_form():
    """Sanity of the transcription itself: linear attention (dot, none) is
    y_t = W0 q_t + sum_{i<=t} eta_i v_i (k_i . q_t)."""
    spec = MirasSpec.preset("linear_attn")
    leaves = make_case(spec, grad=False)
    y, _ = notes_reference(spec, leaves)
    q, k, v, eta = leaves["q"], leaves["k"], leaves["v"], leaves["eta"]
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril() * eta.permute(0, 2, 1)[:, :, None, :]
    expect = torch.einsum("bhts,bshd->bthd", scores, v) + torch.einsum("hrc,bthc->bthr", leaves["state_W"], q)
    assert rel_err(y, expect) < 1e-12


def test_reference_matches_torch_huber_branches():
    """The Huber transcription's gradient is e inside the ball and delta*e/sqrt(e^2+eps) outside."""
    spec = MirasSpec.preset("yaad")
    e = torch.tensor([[[0.1, -0.2, 0.05, 0.0]], [[3.0, -1.0, 0.5, 2.0]]], dtype=torch.float64)
    delta = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    W = {"W": torch.eye(4, dtype=torch.float64).expand(2, 1, 4, 4).clone().requires_grad_()}
    lin = MirasSpec(memory="linear", bias="huber", retention="decay")
    k = torch.ones(2, 1, 4, dtype=torch.float64)
    v = k - e
    (g,) = torch.autograd.grad(notes_loss(lin, W, k, v, delta), [W["W"]])
    u = g[..., 0]  # k is all ones so every column of g equals u
    assert torch.allclose(u[0], e[0])
    assert torch.allclose(u[1], 0.5 * e[1] / torch.sqrt(e[1] ** 2 + lin.huber_eps))
    assert spec.needs_delta
