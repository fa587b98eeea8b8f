"""Tensor and pipeline parallelism vs a single process (gloo, CPU, fp32).

The parent process builds the single-process model, computes the reference loss and gradients,
and saves them; worker processes (torch.multiprocessing, spawn) initialise megatron's groups
with ``initialize_parallel``, load their shard with ``shard_state_dict``, run forward/backward
(TP: the model directly; PP: DeepSpeed's pipeline engine, 1F1B, 2 micro-batches), gather the
gradients back with ``gather_full_state_dict`` and rank 0 saves them. Tolerance: 1e-5 absolute
and relative (fp32; TP changes only the summation order of the row-parallel reductions).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from miras_pretrain.model import ModelConfig, build_model
from miras_pretrain.testing.local_launch import free_port, run_local_workers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

V, T = 128, 12
TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    # Miras with MLP memory (Moneta: lq retention, learned initial accumulator) + sliding attention
    "miras": dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, layer_pattern="MA",
                  miras={"preset": "moneta"}, chunk_size=4, gate_rank=8, window=5, backend="chunked"),
    # Transformer++ with tied embeddings; fed packed documents (cu_seqlens) in the pipeline runs
    "transformer": dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64,
                        layer_pattern="T", tie_embeddings=True),
}




def _batch(name: str):
    """Two micro-batches. miras: [2, T] each; transformer: packed [1, T] with cu_seqlens of
    different lengths (exercises the pipeline's dynamic shapes)."""
    g = torch.Generator().manual_seed(7)
    if name == "miras":
        ids = torch.randint(0, V, (4, T), generator=g)
        labels = ids.roll(-1, 1)
        labels[:, -1] = -100
        return [((ids[:2], None), labels[:2]), ((ids[2:], None), labels[2:])]
    ids = torch.randint(0, V, (2, 1, T), generator=g)
    labels = ids.roll(-1, 2)
    labels[..., -1] = -100
    cus = [torch.tensor([0, 5, T], dtype=torch.int32), torch.tensor([0, 3, 4, 9, T], dtype=torch.int32)]
    return [((ids[0], cus[0]), labels[0]), ((ids[1], cus[1]), labels[1])]


def _reference(name: str, path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(CONFIGS[name]))
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    mbs = _batch(name)
    losses = [model(ids, labels=lab, cu_seqlens=cu) for (ids, cu), lab in mbs]
    loss = torch.stack(losses).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"full": full, "loss": loss.detach(), "grads": grads,
                "stats": model.memory_stats()}, path / f"ref_{name}.pt")


# ----------------------------------------------------------------------------- workers
def _tp_case(rank: int, workdir: Path) -> dict:
    from miras_pretrain.parallel import state
    from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict
    from miras_pretrain.parallel.cpu_compat import cuda_to_cpu
    from miras_pretrain.parallel.mpu import MegatronMPU
    from miras_pretrain.parallel.tensor_parallel import build_sharded_model

    out: dict = {}
    for name in CONFIGS:
        ref = torch.load(workdir / f"ref_{name}.pt")
        torch.manual_seed(0)
        model = build_sharded_model(ModelConfig.from_dict(CONFIGS[name]))
        # same seed -> the TP shards are slices of the single-process initialisation
        init = gather_full_state_dict(model)
        model.load_state_dict(shard_state_dict(ref["full"], model))
        back = gather_full_state_dict(model)
        losses = [model(ids, labels=lab, cu_seqlens=cu) for (ids, cu), lab in _batch(name)]
        loss = torch.stack(losses).mean()
        loss.backward()
        grads = gather_full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
        out[name] = {"init": init, "roundtrip": back, "loss": loss.detach(), "grads": grads,
                     "stats": model.memory_stats(),
                     "local_q_rows": model.layers[0].mixer.q_proj.weight.shape[0]}
    mpu = MegatronMPU()
    out["mpu"] = (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(),
                  mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group_ranks(),
                  mpu.get_pipeline_model_parallel_world_size())
    # CPU compat: megatron's RNG tracker works and gives each TP rank its own stream
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with cuda_to_cpu():
        buf = torch.empty(3, device=torch.cuda.current_device())
        before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            draw = torch.rand(4)
        restored = torch.equal(before, torch.get_rng_state())
    draws = [torch.zeros(4) for _ in range(2)]
    torch.distributed.all_gather(draws, draw, group=state.tensor_parallel_group())
    out["compat"] = (buf.device.type, restored, not torch.equal(draws[0], draws[1]))
    return out


def _pp_case(rank: int, workdir: Path) -> dict:
    import deepspeed

    from miras_pretrain.parallel.pipeline import build_pipeline_module
    from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict

    out: dict = {}
    for name in CONFIGS:
        ref = torch.load(workdir / f"ref_{name}.pt")
        module = build_pipeline_module(ModelConfig.from_dict(CONFIGS[name]))
        module.load_state_dict(shard_state_dict(ref["full"], module))
        opt = torch.optim.SGD(module.parameters(), lr=0.0)
        captured: dict = {}

        def grab(optimizer, args, kwargs, module=module, captured=captured):
            captured.update({n: p.grad.detach().clone() for n, p in module.named_parameters()})

        opt.register_step_pre_hook(grab)
        ds_cfg = {"train_micro_batch_size_per_gpu": 2 if name == "miras" else 1,
                  "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 0},
                  "steps_per_print": 10**9, "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_cfg)
        data = [((ids, cu) if cu is not None else ids, lab) for (ids, cu), lab in _batch(name)]
        loss = engine.train_batch(iter(data))
        grads = gather_full_state_dict(module, captured)
        out[name] = {"loss": loss.detach(), "grads": grads,
                     "roundtrip": gather_full_state_dict(module), "stage": engine.stage_id,
                     "stats": module.memory_stats()}
    return out


def _entry(rank: int, world: int, port: int, case: str, tp: int, pp: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from miras_pretrain.parallel import state

    state.initialize_parallel(tp, pp, timeout_s=120)
    try:
        out = (_tp_case if case == "tp" else _pp_case)(rank, Path(workdir))
        torch.save(out, Path(workdir) / f"out_{case}_{rank}.pt")
    finally:
        state.destroy_parallel()


def _spawn(world: int, case: str, tp: int, pp: int, workdir: Path, timeout: float = 240.0) -> None:
    run_local_workers(_entry, (world, free_port(), case, tp, pp, str(workdir)), world,
                      timeout=timeout, what=f"{case} workers")


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("parallel")
    for name in CONFIGS:
        _reference(name, path)
    return path


def _check(ref: dict, got: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], ref["loss"], **TOL, msg=f"{what}: loss")
    assert set(got["grads"]) == set(ref["grads"]), what
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, **TOL, msg=f"{what}: grad {n}")
    for n, p in ref["full"].items():
        torch.testing.assert_close(got["roundtrip"][n], p, rtol=0, atol=0, msg=f"{what}: {n}")


def test_tensor_parallel_2_matches_single_process(refs):
    _spawn(2, "tp", 2, 1, refs)
    outs = [torch.load(refs / f"out_tp_{r}.pt") for r in range(2)]
    for name in CONFIGS:
        ref = torch.load(refs / f"ref_{name}.pt")
        for r, out in enumerate(outs):
            got = out[name]
            _check(ref, got, f"TP=2 rank {r} {name}")
            assert got["local_q_rows"] == 16  # 2 of 4 heads x head_dim 8 on each rank
            for n, p in ref["full"].items():  # initialisation equals the single-process one
                torch.testing.assert_close(got["init"][n], p, rtol=0, atol=0, msg=n)
            assert got["stats"].keys() == ref["stats"].keys()
            for k, v in ref["stats"].items():
                assert got["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert outs[0]["mpu"] == (2, 0, 1, [0], 1) and outs[1]["mpu"] == (2, 1, 1, [1], 1)
    assert outs[0]["compat"] == ("cpu", True, True)


def test_pipeline_parallel_2_matches_single_process(refs):
    _spawn(2, "pp", 1, 2, refs)
    outs = [torch.load(refs / f"out_pp_{r}.pt") for r in range(2)]
    for name in CONFIGS:
        ref = torch.load(refs / f"ref_{name}.pt")
        for r, out in enumerate(outs):
            assert out[name]["stage"] == r
            _check(ref, out[name], f"PP=2 rank {r} {name}")
    # memory stats come from the stage holding the Miras layer (layer 0, stage 0)
    assert set(outs[0]["miras"]["stats"]) == {"layer0/init_W1_norm", "layer0/init_W2_norm",
                                              "layer0/alpha_mean", "layer0/eta_mean",
                                              "layer0/state_W1_norm", "layer0/state_W2_norm"}
    assert outs[1]["miras"]["stats"] == {}


def test_tensor_2_x_pipeline_2_matches_single_process(refs):
    _spawn(4, "pp", 2, 2, refs, timeout=360.0)
    outs = [torch.load(refs / f"out_pp_{r}.pt") for r in range(4)]
    for name in CONFIGS:
        ref = torch.load(refs / f"ref_{name}.pt")
        for r, out in enumerate(outs):
            assert out[name]["stage"] == r // 2  # megatron layout: TP fastest, then PP
            _check(ref, out[name], f"TP=2xPP=2 rank {r} {name}")
