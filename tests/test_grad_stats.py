"""Training-health metrics: per-group gradient norms (grad_stats.grad_norms_by_group), the
gradient-spike warning (GradSpikeMonitor), and both in a real single-process training run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.grad_stats import GradSpikeMonitor, grad_group, grad_norms_by_group


# ---------------------------------------------------------------------------- GradSpikeMonitor
def _feed(monitor: GradSpikeMonitor, norms, start: int = 1) -> dict[int, str]:
    out = {}
    for step, g in enumerate(norms, start):
        msg = monitor.update(step, g)
        if msg is not None:
            out[step] = msg
    return out


def test_spike_monitor_fires_once_on_a_spike():
    steady = [2.0 + 0.1 * (i % 5) for i in range(30)]
    warnings = _feed(GradSpikeMonitor(), steady + [5.2e4] + steady)
    assert list(warnings) == [31]
    msg = warnings[31]
    assert "\n" not in msg and msg.startswith("step 31: gradient norm 5.2e+04 is")
    assert "its running median 2.2" in msg and "grad_norm/layer*" in msg
    ratio = float(msg.split(" is ")[1].split("x")[0])
    assert ratio == pytest.approx(5.2e4 / 2.2, rel=1e-3)


def test_spike_monitor_quiet_on_steady_noise_and_small_norms():
    rng = random.Random(0)
    noisy = [math.exp(rng.gauss(0.0, 0.5)) for _ in range(500)]  # log-normal, up to ~5x median
    assert _feed(GradSpikeMonitor(), noisy) == {}
    # a 100x jump below the floor (1.0) is not worth a warning
    assert _feed(GradSpikeMonitor(), [1e-3] * 20 + [0.1]) == {}
    # too little history: nothing, whatever the jump
    assert _feed(GradSpikeMonitor(), [1.0] * 9 + [1e6]) == {}
    # non-finite norms (skipped steps) are ignored, not counted as history
    assert _feed(GradSpikeMonitor(), [float("nan")] * 5 + [1.0] * 9 + [1e6]) == {}


def test_spike_monitor_rate_limit():
    # spikes at every step from 21 on: one warning, then silence for 20 steps, then the next
    mon = GradSpikeMonitor(window=50, cooldown=20)
    warnings = _feed(mon, [1.0] * 20 + [1e4] * 3)
    assert list(warnings) == [21]
    assert _feed(mon, [1e4] * 18, start=24) == {}  # steps 24..41: still within 20 of step 21
    # by now the window's median has risen to the spike level: a new warning needs a new jump
    assert list(_feed(mon, [1e4, 1e7], start=42)) == [43]


# ---------------------------------------------------------------------------- grouping
def test_grad_group_names():
    assert grad_group("layers.3.mixer.q_proj.weight") == "layer3"
    assert grad_group("module._orig_mod.layers.12.mlp.w1.weight") == "layer12"
    assert grad_group("embed.word.weight") == "embed"
    assert grad_group("module.head.proj.weight") == "head"
    assert grad_group("head.norm.weight") == "head"
    assert grad_group("mylayers.1.weight") == "other"  # "layers" must be a whole component


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 11)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h)


def test_grad_norms_by_group_matches_manual_norms():
    model = _Tiny()
    ids = torch.randint(0, 11, (2, 5))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    norms = grad_norms_by_group(model.named_parameters())
    assert list(norms) == ["embed", "layer0", "layer1", "head"]  # frozen parameter: no group

    def norm(*mods):
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for m in mods for p in m.parameters()))

    assert norms["embed"] == pytest.approx(norm(model.embed), rel=1e-6)
    assert norms["layer0"] == pytest.approx(norm(model.layers[0]), rel=1e-6)
    assert norms["layer1"] == pytest.approx(norm(model.layers[1]), rel=1e-6)
    assert norms["head"] == pytest.approx(norm(model.head), rel=1e-6)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(float(total), rel=1e-6)
    # a custom getter (the trainer passes deepspeed's safe_get_full_grad); None = no gradient
    only_head = grad_norms_by_group(model.named_parameters(), lambda p: p.grad if p is model.head.weight else None)
    assert only_head == {"head": pytest.approx(float(model.head.weight.grad.norm()), rel=1e-6)}


# ---------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def test_training_run_logs_group_norms_and_warns_on_a_spike(tmp_path, corpus, monkeypatch, capsys):
    """12 steps, ZeRO-1, grad_accum 2, a tight grad_clip (so every update is clipped), logs every
    3 steps; the global norm DeepSpeed reports for step 11 is inflated 1e4x to stand for a spike."""
    from miras_pretrain.train import trainer as trainer_mod
    from miras_pretrain.train.config import config_from_dict
    from miras_pretrain.train.wandb_reader import find_run_files, read_history

    real, calls = trainer_mod._grad_norm, []

    def fake_grad_norm(engine):
        calls.append(1)
        g = real(engine)
        return g * 1e4 if len(calls) == 11 else g

    monkeypatch.setattr(trainer_mod, "_grad_norm", fake_grad_norm)
    out = tmp_path / "run"
    cfg = tiny_training.tiny_run_config(
        out, corpus, steps=12, train={"grad_accum_steps": 2, "grad_clip": 0.01},
        log={"interval": 3, "progress_bar": False, "wandb": True, "wandb_mode": "offline"},
    )
    res = trainer_mod.train(config_from_dict(cfg), quiet=False)
    assert res.exit_code == 0 and res.step == 12

    # the warning: one line, for step 11 only
    lines = [l for l in capsys.readouterr().out.splitlines() if "gradient norm" in l]
    assert len(lines) == 1 and lines[0].startswith("step 11: gradient norm "), lines
    assert "x its running median" in lines[0]

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train_rows) == [3, 6, 9, 12]
    spike_rows = [r for r in rows if "train/grad_spike" in r]
    assert [r["step"] for r in spike_rows] == [11] and spike_rows[0]["train/grad_spike"] == 1
    for step, r in train_rows.items():
        groups = {k: v for k, v in r.items() if k.startswith("grad_norm/")}
        assert set(groups) == {"grad_norm/embed", "grad_norm/layer0", "grad_norm/layer1", "grad_norm/head"}, step
        assert all(math.isfinite(v) and v > 0 for v in groups.values()), (step, groups)
        # the groups partition the parameters, and both sides are the raw gradient: the global
        # norm is DeepSpeed's pre-clipping one (clipping to 0.01 would show as a mismatch here)
        assert r["train/grad_norm"] > 0.01
        assert sum(v * v for v in groups.values()) == pytest.approx(r["train/grad_norm"] ** 2, rel=1e-3), step
        # memory-state norms of the Miras layers, where the model reports them
        for key in (k for k in r if k.startswith("memory/layer") and "/state_" in k):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])

    # the same keys reach W&B (offline run read back)
    history = read_history(find_run_files(out)[0])
    wb = {int(h["_step"]): h for h in history if "grad_norm/layer0" in h}
    assert sorted(wb) == [3, 6, 9, 12]
    assert wb[9]["grad_norm/layer1"] == pytest.approx(train_rows[9]["grad_norm/layer1"], rel=1e-12)
    assert any(h.get("train/grad_spike") == 1 and int(h["_step"]) == 11 for h in history)
