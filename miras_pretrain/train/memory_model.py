"""Predicted per-GPU memory of a training config (issue #16 item 6; docs/memory_model.md).

``predict(cfg)`` adds up, for one rank of the TP x PP x DP layout:

* **static**: parameters, gradients and AdamW states under the ZeRO stage. bf16 (the GPU's
  ``precision: auto``): bf16 parameters (2 B), fp32 gradient accumulation (4 B, DeepSpeed's bf16
  ``grad_accum_dtype``), fp32 master + m + v (12 B); ZeRO-1 partitions the optimizer states over
  DP, ZeRO-2 also the gradients, ZeRO-3 also the parameters. fp32: 4 + 4 + 8 B (no master).
  Parameters are counted from the model itself (one block of each kind is built on the CPU).
* **activations** of one micro-batch (``b`` sequences of ``T`` tokens) saved for backward, per
  block, written out tensor by tensor below (what autograd keeps), including the Miras memory
  operator's saved per-chunk states: the Triton kernels keep the chunk-start state of every chunk
  (linear: ``W [dv x dk]`` per head per chunk; MLP: ``W1 + W2`` per head per chunk, x2 with
  momentum) in fp32; where the kernels do not cover a layer (GPU ``auto`` falls back to the chunked
  PyTorch path, and the CPU always runs it) the chunked path's saved bytes per token are measured
  once on a small input (``saved_tensors_hooks``) and scaled by the token count. With activation
  checkpointing each block keeps only its input; one block's activations are rebuilt in backward.
* **logits**: the head's ``[b*T, V]`` output in the activation dtype, its fp32 copy and
  log-softmax (saved by the loss), and the fp32 gradient built in backward.
* **transient**: the larger of the logits' backward buffers and one block's backward working
  set (the gradients of its activations, as large as what it saved; with checkpointing its
  recomputed activations too); a fixed CUDA context + allocator reserve (``RESERVE_GIB``) on GPU.

Every number is an estimate of what the allocator must hold at the peak; the CPU validation
(``tools/memory_model.py --measure``) compares it with the measured peak (docs/memory_model.md).
"""

from __future__ import annotations

import functools
import os
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miras_pretrain.model.config import ModelConfig

GIB = 1024 ** 3
# CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation held on an 80 GB H100
RESERVE_GIB = 6.0


@dataclass(frozen=True)
class Layout:
    """How a run splits over GPUs: tensor x pipeline x data parallel (context parallel 1)."""

    gpus: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def dp(self) -> int:
        return max(self.gpus // (self.tp * self.pp * self.cp), 1)


@dataclass
class Prediction:
    """Bytes per GPU, by component (``table()`` renders them)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    miras_states: float  # part of ``activations``: the memory operator's saved per-chunk states
    logits: float
    transient: float
    reserve: float
    micro_batch: int
    seq_len: int
    checkpointing: bool
    backends: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.logits + self.transient
                + self.reserve)

    def table(self) -> str:
        rows = [("parameters", self.params), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("activations (all blocks)", self.activations),
                ("  of which Miras per-chunk states", self.miras_states),
                ("logits + loss", self.logits), ("transient (backward peak)", self.transient),
                ("CUDA context / allocator reserve", self.reserve), ("total", self.total)]
        return "\n".join(f"{name:<36} {val / GIB:9.2f} GiB" for name, val in rows)


# ------------------------------------------------------------------------------ parameters
@functools.lru_cache(maxsize=None)
def _block_param_counts(cfg_key: tuple) -> dict[str, tuple[int, int]]:
    """Per layer kind: ``(parameters split over TP, replicated parameters)`` of one block."""
    from miras_pretrain.model.lm import Block

    cfg = ModelConfig.from_dict({k: dict(v) if k == "miras" else v for k, v in cfg_key})
    out: dict[str, tuple[int, int]] = {}
    kinds = cfg.layer_kinds()
    for kind in dict.fromkeys(kinds):
        torch.manual_seed(0)
        block = Block(cfg, kinds.index(kind))
        split = rep = 0
        for name, p in block.named_parameters():
            # norms and the low-rank gate down-projection are replicated under TP (sharded_layers)
            if "norm1" in name or "norm2" in name or "gate_down" in name:
                rep += p.numel()
            else:
                split += p.numel()
        out[kind] = (split, rep)
        del block
    return out


def _cfg_key(cfg: ModelConfig) -> tuple:
    """A hashable key of the config (nested mappings as sorted item tuples) for the caches."""
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in cfg.to_dict().items()))


def param_counts(cfg: ModelConfig, layout: Layout = Layout()) -> tuple[int, int]:
    """``(total parameters, parameters held by the largest pipeline stage's rank)``."""
    counts = _block_param_counts(_cfg_key(cfg))
    kinds = cfg.layer_kinds()
    embed = cfg.vocab_size * cfg.d_model
    head = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model) + cfg.d_model
    blocks_total = sum(sum(counts[k]) for k in kinds)
    total = embed + head + blocks_total
    per_stage = math.ceil(len(kinds) / layout.pp)
    # the largest stage: the first (embedding) or the last (head); with pp == 1 both
    stage_blocks = [kinds[i:i + per_stage] for i in range(0, len(kinds), per_stage)]

    def rank_params(blocks, first, last):
        n = sum(counts[k][0] / layout.tp + counts[k][1] for k in blocks)
        if first:
            n += embed / layout.tp
        if last:
            n += (head - cfg.d_model) / layout.tp + cfg.d_model
        return n

    local = max(rank_params(b, i == 0, i == len(stage_blocks) - 1) for i, b in enumerate(stage_blocks))
    return total, int(local)


# ------------------------------------------------------------------------------ the memory op
def gpu_memory_backend(cfg: ModelConfig, arch: int = 90) -> str:
    """``"triton"`` when the GPU kernels cover the model's Miras layers (``backend: auto`` on
    CUDA, sm_<arch>), else ``"chunked"`` (the fallback ``miras_kernels.supports`` names)."""
    from miras_kernels.configs import (LINEAR_CHUNK_SIZES, MLP_CHUNK_SIZES, MLP_EXPANSIONS, MLP_HEAD_DIMS,
                                       MLP_RETENTIONS, block_size, linear_config, linear_kernels_for,
                                       mlp_config_shipped)

    # the rules of miras_kernels.dispatch.supports for a CUDA device of sm_<arch> (it needs tensors
    # on that device, so it cannot be asked without one)
    if cfg.backend in ("chunked", "recurrent"):
        return cfg.backend
    spec, d, c = cfg.spec, cfg.head_dim, cfg.chunk_size
    if spec.retention_chunking != "per_token":
        return "chunked"
    if spec.memory == "linear":
        if spec.chunk_rule == "minibatch" and spec.steps_on_retained:
            return "chunked"
        if d > 128 or c not in LINEAR_CHUNK_SIZES:
            return "chunked"
        ok = all(linear_config(name, c, block_size(d), block_size(d), False, spec.learner) is not None
                 for name in linear_kernels_for(spec.learner, spec.retention, spec.chunk_rule))
        return "triton" if ok else "chunked"
    if spec.chunk_rule != "minibatch" or spec.step_at != "previous":
        return "chunked"
    e = int(spec.expansion)
    if (spec.retention not in MLP_RETENTIONS or d not in MLP_HEAD_DIMS or e not in MLP_EXPANSIONS
            or c not in MLP_CHUNK_SIZES):
        return "chunked"
    lq_q = float(spec.q) if spec.retention == "lq" and float(spec.q) != 2.0 else None
    ok, _ = mlp_config_shipped(d, e, c, arch, lq_q=lq_q, kl=spec.retention == "kl")
    return "triton" if ok else "chunked"


def triton_state_bytes(cfg: ModelConfig, seqs: int, tokens: int, heads: int) -> float:
    """Saved per-chunk states of one Miras layer on the Triton path, fp32: every chunk start plus
    the final state of each sequence (``J = chunks + sequences`` slots), per head:
    linear ``W [dv, dk]`` (+ ``S_W`` with momentum); MLP ``W1 [d, e d] + W2 [e d, d]`` (x2 momentum)."""
    d = cfg.head_dim
    per_seq_chunks = math.ceil(tokens / seqs / cfg.chunk_size)
    slots = seqs * (per_seq_chunks + 1)
    spec = cfg.spec
    per_head = d * d if spec.memory == "linear" else 2 * d * int(spec.expansion) * d
    mult = 2 if spec.learner == "momentum" else 1
    return 4.0 * slots * heads * per_head * mult


def triton_op_other_bytes(cfg: ModelConfig, tokens: int, heads: int) -> float:
    """The Triton op's other saved tensors, fp32 per token and head: the gate copies (log alpha,
    log mu, eta; the MLP host keeps four, stand-ins included) and per family
    (``kernels/miras_linear/chunk.py``, ``chunk_exact.py``, ``kernels/miras_mlp/chunk.py``):
    linear mini-batch: the residual ``E`` (dv; not for the dot bias) and the Huber row norm;
    linear exact (delta rule): the chunk's triangular inverse row (C), ``W`` (dk) and ``v_new`` (dv);
    MLP: Moneta's per-token q-norms (2)."""
    spec, d = cfg.spec, cfg.head_dim
    if spec.memory == "mlp":
        per = 4 + (2 if spec.retention == "lq" else 0)
    else:
        per = 1 + spec.needs_alpha + spec.needs_mu
        if spec.chunk_rule == "exact":
            per += cfg.chunk_size + 2 * d
        else:
            per += (d if spec.bias != "dot" else 0) + (1 if spec.bias == "huber" else 0)
    return 4.0 * tokens * heads * per


@functools.lru_cache(maxsize=None)
def chunked_op_bytes(miras_key: tuple, heads: int, head_dim: int, chunk: int, dtype_name: str) -> tuple[float, float]:
    """``(bytes per token, bytes per sequence)`` the chunked PyTorch memory op saves for backward,
    measured once with ``saved_tensors_hooks`` (unique storages) at 4 and 8 chunks of one sequence."""
    from miras_kernels import MirasSpec, miras_memory
    from miras_pretrain.model.miras_mixer import init_memory_free_variable

    spec = MirasSpec.from_dict(dict(miras_key))
    dtype = getattr(torch, dtype_name)

    def saved(T: int) -> float:
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        q = torch.nn.functional.normalize(mk(1, T, heads, head_dim), dim=-1).requires_grad_()
        k = torch.nn.functional.normalize(mk(1, T, heads, head_dim), dim=-1).requires_grad_()
        v = mk(1, T, heads, head_dim).requires_grad_()
        gate = lambda: torch.sigmoid(mk(1, T, heads)).float().requires_grad_()  # noqa: E731
        init = None
        if spec.memory == "mlp":
            init = {n: init_memory_free_variable(spec, (heads, r, c), 0.1).requires_grad_()
                    for n, (r, c) in spec.weight_shapes(head_dim, head_dim).items()}
        seen: dict[tuple, int] = {}

        def pack(t: torch.Tensor):
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            miras_memory(q, k, v, gate() if spec.needs_alpha else None, gate(), spec=spec, chunk_size=chunk,
                         delta=gate() + 1.0 if spec.needs_delta else None, mu=gate() if spec.needs_mu else None,
                         initial_state=init, backend="chunked")
        # the op's inputs are the layer's tensors (counted with the mixer), not the op's
        inputs = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in (q, k, v)}
        return float(sum(n for key, n in seen.items() if key not in inputs))

    a, b = saved(4 * chunk), saved(8 * chunk)
    per_token = (b - a) / (4 * chunk)
    return per_token, max(a - per_token * 4 * chunk, 0.0)


# ------------------------------------------------------------------------------ activations
def block_activation_bytes(cfg: ModelConfig, kind: str, seqs: int, seq_len: int, act: int, tp: int,
                           backend: str) -> tuple[float, float]:
    """``(saved bytes of one block, of which Miras per-chunk states)`` for ``seqs`` sequences of
    ``seq_len`` tokens with activations of ``act`` bytes (2 bf16, 4 fp32), heads split over ``tp``.

    Per token (``d`` model width, ``w = d / tp`` this rank's heads' width, ``F`` the SwiGLU width
    over tp): each RMSNorm keeps its fp32 input copy and normalised output (8 d B; the copy is the
    input itself in fp32); the linears keep their inputs; SwiGLU keeps gate, silu(gate), up and
    their product (4 F). Miras mixer: x (d), q and k each projection, conv and silu outputs plus the
    normalised vector (4 w), v three (3 w), the gates (fp32), the memory output, its per-head
    RMSNorm (fp32 in and out), the output gate (projection, silu) and the o_proj input (5 w), plus the
    memory operator (per-chunk states, see :func:`triton_state_bytes`). Attention: q, k, v, the fp32
    RoPE inputs and outputs of q and k, and the output (flash/flex attention keeps no T x T matrix).
    """
    d = cfg.d_model
    w = d / tp
    F = cfg.ffn_width / tp
    N = seqs * seq_len
    f32 = 4
    norm = lambda: (f32 * d + (f32 * d if act == 2 else 0))  # noqa: E731 (fp32 output + fp32 copy of a bf16 input)
    per_token = 2 * norm() + act * d          # norm1, norm2, the mixer input
    per_token += act * (d + 4 * F)            # SwiGLU input (shared by gate/up) and its four tensors
    states = 0.0
    heads = cfg.n_heads // tp
    if kind == "miras":
        spec = cfg.spec
        n_g = 2 + spec.needs_delta + spec.needs_mu
        per_token += act * (4 * w + 4 * w + 3 * w)          # q, k, v branches
        per_token += f32 * (2 * n_g * heads) + act * cfg.gate_rank
        per_token += act * w + 2 * f32 * w + act * 4 * w    # y, its fp32 norm, output gate + o_proj input
        if backend == "triton":
            states = triton_state_bytes(cfg, seqs, N, heads)
            other = triton_op_other_bytes(cfg, N, heads)
        else:
            dtype_name = "bfloat16" if act == 2 else "float32"
            tok, seq = chunked_op_bytes(tuple(sorted(spec.to_dict().items())), heads, cfg.head_dim,
                                        cfg.chunk_size, dtype_name)
            states = tok * N + seq * seqs
            other = 0.0
        return per_token * N + states + other, states
    # attention: q, k, v, fp32 rope in/out for q and k, output, o_proj input
    per_token += act * 3 * w + f32 * 4 * w + act * 2 * w + f32 * 2 * heads / max(w, 1)
    return per_token * N, 0.0


def logits_bytes(cfg: ModelConfig, tokens: int, act: int, tp: int) -> tuple[float, float]:
    """``(saved, transient)``: the ``[tokens, V/tp]`` logits (activation dtype), their fp32 copy
    and log-softmax saved by the loss; in backward the fp32 and activation-dtype gradients."""
    v = cfg.vocab_size / tp
    # fp32 logits: ``logits.float()`` is the logits themselves (no copy)
    saved = tokens * v * ((act + 4 + 4) if act != 4 else (4 + 4))
    return saved, tokens * v * ((4 + act) if act != 4 else 4)


# ------------------------------------------------------------------------------ the whole run
def predict(cfg: ModelConfig, *, micro_batch: int, seq_len: int, layout: Layout = Layout(), zero_stage: int = 1,
            precision: str = "bf16", checkpointing: bool | None = None, device: str = "cuda",
            packed_documents_per_seq: int = 1) -> Prediction:
    """Predicted peak bytes of one GPU (``device="cuda"``) or of the CPU process (``"cpu"``: the
    chunked memory op, no reserve) for one training step with ``micro_batch`` sequences of
    ``seq_len`` tokens. ``zero_stage`` 0 means a plain (non-DeepSpeed) optimizer."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r} is not valid: use 'bf16' or 'fp32'")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage!r} is not valid: use 0, 1, 2 or 3")
    ckpt = cfg.activation_checkpointing if checkpointing is None else checkpointing
    total, local = param_counts(cfg, layout)
    dp = layout.dp
    p_b, g_b, o_b = (2, 4, 12) if precision == "bf16" else (4, 4, 8)
    params = local * p_b / (dp if zero_stage == 3 else 1)
    grads = local * g_b / (dp if zero_stage >= 2 else 1)
    optim = local * o_b / (dp if zero_stage >= 1 else 1)
    act = 2 if precision == "bf16" else 4
    backend = gpu_memory_backend(cfg) if device == "cuda" else "chunked"
    kinds = cfg.layer_kinds()
    per_stage = kinds[:math.ceil(len(kinds) / layout.pp)]
    # pipeline 1F1B: the first stage holds up to pp micro-batches in flight
    in_flight = layout.pp
    seqs = micro_batch * packed_documents_per_seq
    tokens = micro_batch * seq_len
    acts = states = 0.0
    biggest = 0.0
    for kind in per_stage:
        a, s = block_activation_bytes(cfg, kind, seqs, tokens // seqs, act, layout.tp, backend)
        biggest = max(biggest, a)
        if ckpt:
            acts += act * tokens * cfg.d_model  # the block input
        else:
            acts += a
            states += s
    acts *= in_flight
    states *= in_flight
    # the logits live on the last pipeline stage; counting them with the first stage's blocks is
    # the conservative bound for pp > 1
    lg_saved, lg_transient = logits_bytes(cfg, tokens, act, layout.tp)
    # during a block's backward the gradients of its activations (at most the size of what it
    # saved; on the Triton path the gradient of every chunk state of the layer) are live while its
    # saved tensors still are; with checkpointing the block's activations are rebuilt first
    transient = max(lg_transient, biggest * (2 if ckpt else 1))
    return Prediction(params=params, grads=grads, optimizer=optim, activations=acts,
                      miras_states=states, logits=lg_saved, transient=transient,
                      reserve=RESERVE_GIB * GIB if device == "cuda" else 0.0, micro_batch=micro_batch,
                      seq_len=seq_len, checkpointing=ckpt,
                      backends={"miras": backend} if "miras" in kinds else {})


def stated_gpus(config_path: str | Path, default: int = 8) -> int:
    """The GPU count a shipped config's header states (``x N data-parallel GPUs``), else ``default``."""
    m = re.search(r"x\s*(\d+)\s+data-parallel GPUs", Path(config_path).read_text())
    return int(m.group(1)) if m else default


def predict_config(path: str | Path, *, gpus: int | None = None, micro_batch: int | None = None,
                   checkpointing: bool | None = None) -> tuple[Prediction, dict]:
    """Prediction for a training config file at its stated GPU count (or ``gpus``); returns the
    prediction and the run facts used (``gpus``, ``zero_stage``, ``micro_batch``, ``grad_accum``...)."""
    from miras_pretrain.train.config import load_config, resolve_data_config, resolve_model_config

    run = load_config(path)
    cfg = resolve_model_config(run)
    data = resolve_data_config(run)
    n = stated_gpus(path) if gpus is None else gpus
    layout = Layout(gpus=n, tp=run.parallel.tensor_parallel_size, pp=run.parallel.pipeline_parallel_size,
                    cp=run.parallel.context_parallel_size)
    precision = "bf16" if run.train.precision in ("auto", "bf16") else "fp32"
    mb = run.train.micro_batch_size if micro_batch is None else micro_batch
    seq_len = int(data.seq_len) // layout.cp
    pred = predict(cfg, micro_batch=mb, seq_len=seq_len, layout=layout, zero_stage=run.train.zero_stage,
                   precision=precision, checkpointing=checkpointing)
    facts = dict(gpus=n, tp=layout.tp, pp=layout.pp, dp=layout.dp, zero_stage=run.train.zero_stage,
                 precision=precision, micro_batch=mb, grad_accum=run.train.grad_accum_steps, seq_len=seq_len,
                 global_batch=run.train.micro_batch_size * run.train.grad_accum_steps * layout.dp,
                 params=param_counts(cfg, layout)[0], model=cfg)
    return pred, facts


def largest_micro_batch(path: str | Path, gpu_mem_gib: float = 80.0, *, gpus: int | None = None,
                        checkpointing: bool | None = None, limit: int = 256) -> int:
    """The largest micro-batch whose predicted peak fits ``gpu_mem_gib`` (0 when even 1 does not)."""
    best = 0
    for mb in range(1, limit + 1):
        pred, _ = predict_config(path, gpus=gpus, micro_batch=mb, checkpointing=checkpointing)
        if pred.total > gpu_mem_gib * GIB:
            break
        best = mb
    return best


# ------------------------------------------------------------------------------ CPU validation
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE"))


def _measure_child(cfg_dict: dict, micro_batch: int, seq_len: int, steps: int) -> dict:
    """Run in a fresh process: ``steps`` fp32 AdamW training steps of the model on random tokens;
    returns the peak resident-set growth over the RSS before the model was built (bytes)."""
    from miras_pretrain.model.lm import build_model

    torch.set_num_threads(1)
    cfg = ModelConfig.from_dict(cfg_dict)
    # warm-up on a throwaway 1-layer model and 16 tokens: the first step of a process maps
    # library code, starts thread pools and grows malloc arenas (~200 MiB here) -- process
    # overhead, not the training step's memory
    small = build_model(ModelConfig.from_dict({**cfg_dict, "n_layers": len(cfg.layer_pattern)}))
    opt = torch.optim.AdamW(small.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, 17))
    small(ids[:, :-1], labels=ids[:, 1:]).backward()
    opt.step()
    del small, opt, ids
    base = _rss_bytes()
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # VmHWM: the peak RSS of this process image (ru_maxrss would also count the forked parent's
    # pages before exec)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"peak_growth": peak - base, "base": base, "peak": peak}


def measure_cpu_peak(cfg: ModelConfig, *, micro_batch: int, seq_len: int, steps: int = 2) -> dict:
    """Peak RSS growth (bytes) of ``steps`` plain fp32 AdamW steps in a fresh CPU process (one
    thread). RSS, not torch allocator statistics: the CPU allocator keeps none."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from miras_pretrain.train.memory_model import _measure_child; "
            "a = json.loads(sys.argv[1]); print(json.dumps(_measure_child(a['cfg'], a['mb'], a['T'], a['steps'])))")
    arg = json.dumps({"cfg": cfg.to_dict(), "mb": micro_batch, "T": seq_len, "steps": steps})
    # large blocks from mmap (returned to the OS when freed): RSS then follows the live bytes
    # instead of what glibc keeps in its heap after frees (its default threshold adapts upwards)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
