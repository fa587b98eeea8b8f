"""Single-process model tests: every preset runs forward/backward, the Miras mixer equals a
hand-written composition of its parts, packed documents do not interact, checkpointing and
tying behave. fp32, tiny shapes, backend="chunked"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miras_pretrain.model import ModelConfig, build_model, count_parameters
from miras_kernels import causal_depthwise_conv
from miras_pretrain.model.miras_mixer import MirasMixer
from miras_kernels import miras_memory

V = 128


def tiny(pattern: str = "M", preset: str = "moneta", **kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                layer_pattern=pattern, miras={"preset": preset}, chunk_size=4, gate_rank=8,
                window=5, backend="chunked")
    base.update(kw)
    return ModelConfig.from_dict(base)


PRESETS = [("M", p) for p in ("moneta", "yaad", "memora", "titans", "gated_delta", "deltanet",
                              "ttt_mlp", "linear_attn", "gla")]
PRESETS += [("T", "moneta"), ("MA", "moneta"), ("AM", "yaad")]


@pytest.mark.parametrize("pattern,preset", PRESETS, ids=[f"{p}-{s}" for p, s in PRESETS])
def test_forward_backward_every_preset(pattern, preset):
    cfg = tiny(pattern, preset)
    model = build_model(cfg)
    ids = torch.randint(0, V, (2, 11))
    logits = model(ids)
    assert logits.shape == (2, 11, V)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    loss = model(ids, labels=labels)
    # at init the loss is close to log(V): the head's outputs are small
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    loss.backward()
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == count_parameters(cfg)
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/inf grad for {missing}"
    # every parameter gets a nonzero gradient (embedding rows of unused ids aside)
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert not zero, f"zero grad for {zero}"
    # the loss ignores -100 labels: equal to the mean CE over the kept positions
    ref = F.cross_entropy(model(ids)[:, :-1].reshape(-1, V), labels[:, :-1].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_mixer_equals_hand_composition():
    """Rebuild the mixer's output from its own weights with plain torch ops (+ the memory op,
    tested against its token loop by the ops tests). Tolerance 1e-5 (fp32, same op order up to
    conv implementation)."""
    cfg = tiny("M", "titans")  # titans: alpha, eta and mu gates, MLP memory with learned init
    mixer = MirasMixer(cfg, out_std=0.02)
    with torch.no_grad():  # non-trivial values for everything
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 9, cfg.d_model)
    b, t, d = x.shape
    h, dh, kk = cfg.n_heads, cfg.head_dim, cfg.conv_size

    def proj_conv(lin, w):
        z = x @ lin.weight.T  # [B, T, C]
        z = F.conv1d(F.pad(z.transpose(1, 2), (kk - 1, 0)), w.unsqueeze(1), groups=w.shape[0])
        return F.silu(z.transpose(1, 2)).reshape(b, t, h, dh)

    q = proj_conv(mixer.q_proj, mixer.q_conv)
    k = proj_conv(mixer.k_proj, mixer.k_conv)
    v = proj_conv(mixer.v_proj, mixer.v_conv)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    raw = (x @ mixer.gate_down.weight.T) @ mixer.gate_up.weight.T + mixer.gate_up.bias
    raw = raw.view(b, t, h, 3)  # head-major: (alpha, eta, mu) per head
    alpha, eta, mu = torch.sigmoid(raw[..., 0]), torch.sigmoid(raw[..., 1]) * cfg.eta_max, torch.sigmoid(raw[..., 2])
    y, _ = miras_memory(q, k, v, alpha, eta, spec=cfg.spec, chunk_size=cfg.chunk_size, mu=mu,
                        initial_state={"W1": mixer.mem_init["W1"], "W2": mixer.mem_init["W2"]},
                        backend="chunked")
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * mixer.out_norm
    y = y * F.silu(x @ mixer.g_proj.weight.T).view(b, t, h, dh)
    ref = y.reshape(b, t, h * dh) @ mixer.o_proj.weight.T
    torch.testing.assert_close(mixer(x), ref, rtol=1e-5, atol=1e-5)
    assert mixer.gate_names == ["alpha", "eta", "mu"]


def test_conv_respects_documents():
    x = torch.randn(1, 10, 6)
    w = torch.randn(6, 4)
    cu = torch.tensor([0, 3, 10])
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6])
    packed = causal_depthwise_conv(x, w, pos)
    sep = torch.cat([causal_depthwise_conv(x[:, :3], w), causal_depthwise_conv(x[:, 3:], w)], 1)
    torch.testing.assert_close(packed, sep, rtol=0, atol=1e-6)
    assert cu[-1] == x.shape[1]


@pytest.mark.parametrize("pattern,preset", [("T", "moneta"), ("A", "moneta"), ("MA", "gated_delta"), ("M", "memora")])
def test_packed_documents_equal_separate_runs(pattern, preset):
    """With cu_seqlens nothing crosses a document boundary: the packed logits equal running
    each document alone (tolerance 1e-5, fp32)."""
    model = build_model(tiny(pattern, preset, window=3))
    ids = torch.randint(0, V, (1, 13))
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    packed = model(ids, cu_seqlens=cu)
    parts = [model(ids[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(packed, torch.cat(parts, 1), rtol=1e-5, atol=1e-5)


def test_sliding_window_limits_context():
    """A token beyond the window of every attention layer cannot influence the output."""
    model = build_model(tiny("A", n_layers=1, window=3))
    ids = torch.randint(0, V, (1, 8))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % V
    a, b = model(ids), model(other)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])  # positions >= window do not see token 0
    assert (a[:, 2] - b[:, 2]).abs().max() > 0


def test_activation_checkpointing_same_grads():
    torch.manual_seed(1)
    m1 = build_model(tiny("MA", "yaad"))
    m2 = build_model(tiny("MA", "yaad", activation_checkpointing=True))
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(0, V, (2, 9))
    for m in (m1, m2):
        m.train()
        m(ids, labels=ids).backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_tied_embeddings():
    model = build_model(tiny("M", "deltanet", tie_embeddings=True))
    names = [n for n, _ in model.named_parameters()]
    assert "head.proj.weight" not in names
    ids = torch.randint(0, V, (1, 6))
    logits = model(ids)
    model(ids, labels=ids).backward()
    assert model.embed.word.weight.grad is not None
    ref = model.head.norm(model.layers[1](model.layers[0](model.embed(ids)))) @ model.embed.word.weight.T
    torch.testing.assert_close(logits, ref)


def test_memory_stats():
    model = build_model(tiny("MA", "titans"))
    model(torch.randint(0, V, (1, 6)))
    stats = model.memory_stats()
    assert set(stats) == {"layer0/init_W1_norm", "layer0/init_W2_norm", "layer0/alpha_mean",
                          "layer0/eta_mean", "layer0/mu_mean", "layer0/state_W1_norm", "layer0/state_W2_norm"}
    assert 0.98 < stats["layer0/alpha_mean"] < 1.0  # sigmoid(bias) = 0.99 at init
    assert all(v == v and v >= 0 for v in stats.values())
    assert stats["layer0/state_W1_norm"] > 0


def test_training_health_defaults():
    """Yaad's Huber threshold starts at 1.5 sqrt(head_dim) (above ||e|| ~ sqrt(head_dim + 1) at
    init, docs/training_health.md); the memory's initial weights put the LayerNorm input at scale
    1; Memora's inner learning-rate cap defaults to 0.1, the others' to 1.0; an explicit eta_max
    wins."""
    cfg = tiny("M", "yaad")
    mixer = MirasMixer(cfg, out_std=0.02)
    g = mixer.gates(torch.zeros(1, 3, cfg.d_model))
    torch.testing.assert_close(g["delta"], torch.full_like(g["delta"], 1.5 * cfg.head_dim ** 0.5))
    # the MLP memory's LayerNorm input has entries of order 1 at init for none/decay retentions
    # (1/std was 100-300 with init_std 0.02); lq/kl keep init_std
    x = F.normalize(torch.randn(cfg.n_heads, 64, cfg.head_dim), dim=-1)
    o = torch.einsum("hrc,hnc->hnr", mixer.mem_init["W1"].detach(),
                     F.gelu(torch.einsum("hrc,hnc->hnr", mixer.mem_init["W2"].detach(), x)))
    assert 0.3 < o.std(dim=-1).median().item() < 3.0
    moneta = tiny("M", "moneta")
    a = MirasMixer(moneta, out_std=0.02).mem_init["W1"].detach()
    assert moneta.spec.materialize(a).std().item() < 0.03  # materialised weights at init_std
    assert tiny("M", "memora").eta_max == 0.1
    assert tiny("M", "moneta").eta_max == 0.003  # lq: its inner-step window (training_health.md section 5)
    assert tiny("M", "memora", eta_max=0.5).eta_max == 0.5


def test_lq_initial_weights_materialise_to_init_std():
    """Moneta's learned initial accumulator materialises to weights of the configured scale."""
    cfg = tiny("M", "moneta", init_std=0.02)
    mixer = MirasMixer(cfg, out_std=0.02)
    w = cfg.spec.materialize(mixer.mem_init["W1"].detach())
    assert 0.015 < w.std().item() < 0.025


def test_cu_seqlens_bad_input():
    model = build_model(tiny("T"))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="end at T=4"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3]))


_ISOLATION_CHECK = """
import sys
import torch

cuda_attrs = ("get_rng_state", "set_rng_state", "manual_seed", "current_device", "synchronize")
before = {name: getattr(torch.cuda, name) for name in cuda_attrs}
import miras_pretrain.model  # noqa: F401
runtime = sorted(m for m in sys.modules if m.startswith("miras_pretrain.parallel")
                 and m != "miras_pretrain.parallel.layout" and m != "miras_pretrain.parallel")
assert not runtime, f"the model imported the parallel runtime: {runtime}"
import miras_pretrain.parallel  # noqa: F401
import miras_pretrain.parallel.context_parallel  # noqa: F401
import miras_pretrain.parallel.cpu_compat as cpu_compat
import miras_pretrain.parallel.pipeline  # noqa: F401
import miras_pretrain.parallel.state  # noqa: F401
assert all(getattr(torch.cuda, n) is f for n, f in before.items()), "importing parallel patched torch.cuda"
assert not cpu_compat.cpu_compat_installed()
if not torch.cuda.is_available():  # the CPU path asks for the patches explicitly and can undo them
    assert cpu_compat.install_cpu_compat() and torch.cuda.current_device() == 0
    cpu_compat.uninstall_cpu_compat()
    assert all(getattr(torch.cuda, n) is f for n, f in before.items()), "uninstall left torch.cuda patched"
print("isolated")
"""


def test_model_needs_no_parallel_runtime_and_parallel_patches_nothing_on_import():
    """In a fresh process: importing the model loads no module of the parallel runtime (only the
    layout dataclass), importing the parallel package leaves ``torch.cuda`` untouched, and the
    CPU compatibility layer applies only when asked and is undone by ``uninstall``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ISOLATION_CHECK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "isolated" in proc.stdout, proc.stderr[-3000:]
