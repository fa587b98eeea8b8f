"""LR schedule (warmup + cosine) and the AdamW decay / no-decay parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from miras_pretrain.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_then_cosine_to_floor():
    kw = dict(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    f = [lr_factor(s, **kw) for s in range(130)]
    assert f[0] == pytest.approx(1 / 11)  # never zero: the first update moves the weights
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # linear ramp
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # monotone decay


def test_scheduler_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sch = build_scheduler(opt, warmup_steps=3, max_steps=20, min_lr_ratio=0.0)
    for _ in range(5):
        opt.step()
        sch.step()
    state = sch.state_dict()
    opt2 = torch.optim.AdamW([p], lr=1.0)
    sch2 = build_scheduler(opt2, warmup_steps=3, max_steps=20, min_lr_ratio=0.0)
    sch2.load_state_dict(state)
    assert sch2.get_last_lr() == sch.get_last_lr()
    assert sch.get_last_lr()[0] == pytest.approx(lr_factor(5, warmup_steps=3, max_steps=20, min_lr_ratio=0.0))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)  # weight decays, bias not
        self.norm = torch.nn.LayerNorm(4)
        self.gate = torch.nn.Linear(4, 2)
        self.memory_init_w = torch.nn.Parameter(torch.zeros(2, 4, 4))  # matrix, named as initial weights
        self.frozen = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_param_groups_split():
    m = _Toy()
    groups = param_groups(m, weight_decay=0.1, no_decay_patterns=["init_w"])
    names = {id(p): n for n, p in m.named_parameters()}
    by = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by["decay"] == ["embed.weight", "gate.weight", "proj.weight"]
    assert by["no_decay"] == ["gate.bias", "memory_init_w", "norm.bias", "norm.weight", "proj.bias"]
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.1, "no_decay": 0.0}


def test_no_decay_params_are_not_decayed():
    m = _Toy()
    opt = build_optimizer(m, lr=0.5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5, no_decay_patterns=["init_w"])
    with torch.no_grad():
        m.memory_init_w.fill_(1.0)
        m.proj.weight.fill_(1.0)
    # zero gradients: AdamW then changes a parameter only through decoupled weight decay
    for p in m.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.equal(m.memory_init_w, torch.ones_like(m.memory_init_w))
    assert torch.allclose(m.proj.weight, torch.full_like(m.proj.weight, 1 - 0.5 * 0.5))
    assert not math.isnan(m.norm.weight.sum().item())
