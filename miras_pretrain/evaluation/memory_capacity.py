"""Can a Miras memory store key-value pairs at a given inner learning rate? Write into it directly.

The outer model learns its gates (``eta``, ``alpha``, ...) from the scale they start at, so a
memory whose useful ``eta`` lies far from ``eta_max / 2`` starts in a regime where it cannot
remember and has to be pulled out of it by the outer loop first. This probe measures that window
for any grid point without training anything: ``pairs`` random unit keys with Gaussian values are
written at a constant ``eta`` (retention gate 1, so nothing is forgotten), then every key is read
back from the final memory (``eta = 0`` on the reading tokens) and counts as recalled when the
read-out is closer (cosine) to its own value than to any other stored value.

What is compared: a linear memory's read ``y``; an MLP memory's learned part ``y - q`` (its output
is ``q + LayerNorm(...)``: zero mean, fixed norm) against the centred values. The initial MLP
weights are drawn as the model draws them (:func:`miras_pretrain.model.miras_mixer.memory_init_std`).

It found Moneta's window 30-100x lower than the other MLP memories' (docs/training_health.md
section 5, ``tools/memory_capacity.py`` prints the table).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from miras_kernels.api import miras_memory
from miras_kernels.spec import MirasSpec


def write_read_accuracy(spec: MirasSpec, eta: float, *, head_dim: int = 32, pairs: int = 8,
                        chunk_size: int = 16, batch: int = 64, init_std: float = 0.02,
                        seed: int = 0) -> float:
    """Fraction of ``batch x pairs`` written keys whose read-out is nearest to their own value.

    Args:
        spec: the grid point (one head; gates ``alpha = 1``, ``mu = 0.9``, Huber ``delta`` at the
            model's initial ``1.5 sqrt(head_dim)``).
        eta: the inner learning rate of every writing token.
        head_dim: ``d`` of keys and values (``[batch, 2 * pairs, 1, d]`` inputs).
        pairs: how many pairs each sequence writes before reading them all back.
        chunk_size: the chunk length of the chunked path (mini-batch GD inside a chunk).
        init_std: the model's ``init_std`` (the MLP memory's initial weights follow from it).
    Returns:
        accuracy in [0, 1] (chance is ``1 / pairs``).
    """
    from miras_pretrain.model.miras_mixer import (DELTA_INIT_PER_SQRT_DIM, init_memory_free_variable,
                                                  memory_init_std)

    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    keys = F.normalize(torch.randn(batch, pairs, 1, head_dim, generator=gen, dtype=dt), dim=-1)
    values = torch.randn(batch, pairs, 1, head_dim, generator=gen, dtype=dt)
    t = 2 * pairs  # write every pair, then read every key
    q, k, v = torch.cat([keys, keys], 1), torch.cat([keys, keys], 1), torch.cat([values, values], 1)
    eta_t = torch.cat([torch.full((batch, pairs, 1), float(eta), dtype=dt),
                       torch.zeros(batch, pairs, 1, dtype=dt)], 1)
    ones = torch.ones(batch, t, 1, dtype=dt)
    extra = {}
    if spec.needs_delta:
        extra["delta"] = ones * DELTA_INIT_PER_SQRT_DIM * math.sqrt(head_dim)
    if spec.learner == "momentum":
        extra["mu"] = ones * 0.9
    init = None
    if spec.memory == "mlp":
        std = memory_init_std(spec, head_dim, init_std)
        # init_memory_free_variable draws from the global generator: seed it without disturbing
        # the caller's random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init = {name: init_memory_free_variable(spec, (1, r, c), std).to(dt)
                    for name, (r, c) in spec.weight_shapes(head_dim, head_dim).items()}
    y, _ = miras_memory(q, k, v, ones, eta_t, spec=spec, chunk_size=chunk_size, initial_state=init,
                        backend="chunked", **extra)
    read = y[:, pairs:, 0]
    stored = values[:, :, 0]
    if spec.memory == "mlp":
        read = read - keys[:, :, 0]
        stored = stored - stored.mean(-1, keepdim=True)
    sims = torch.einsum("bnd,bmd->bnm", F.normalize(read, dim=-1), F.normalize(stored, dim=-1))
    return (sims.argmax(-1) == torch.arange(pairs)).to(dt).mean().item()
