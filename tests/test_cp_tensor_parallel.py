"""CP x TP = 2 x 2 on 4 gloo processes vs one process (megatron groups, fp32, 1e-5).

The parent computes the single-process loss and gradients; the workers initialise megatron with
``initialize_parallel(tp=2, cp=2)`` (layout TP fastest, then CP: CP groups {0, 2} and {1, 3}),
load their TP shard of the same weights, run their CP slice (each TP rank passes the memory
state of its own heads), sum gradients over the CP group and gather them over TP. Cases: a
Moneta hybrid (Miras + sliding-window + full attention) on packed documents crossing the CP
boundary off the chunk grid (state passing), and gated_delta on dense input (all-gather). Also
checks the DeepSpeed ``mpu`` view: data parallel = DP only (size 1), sequence-data parallel =
DP x CP (size 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from miras_pretrain.testing.context_parallel_launch import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = dict(rtol=1e-5, atol=1e-5)
V = 64
CASES = {
    "moneta_packed": (dict(vocab_size=V, d_model=16, n_layers=3, n_heads=2, ffn_hidden=32, layer_pattern="MAT",
                           miras={"preset": "moneta"}, chunk_size=4, gate_rank=4, window=5, eta_max=0.1,
                           backend="chunked"), "auto", True),
    "gated_delta_dense": (dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, layer_pattern="M",
                               miras={"preset": "gated_delta"}, chunk_size=4, gate_rank=4, eta_max=0.1,
                               backend="chunked"), "all_gather", False),
}


def _batch(packed: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (1 if packed else 2, 24), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    cu = torch.tensor([0, 5, 15, 24], dtype=torch.int32) if packed else None  # 15 crosses 12, offset 10
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def _reference(path: Path) -> None:
    from miras_pretrain.model import ModelConfig, build_model

    for name, (cfg, _, packed) in CASES.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict(cfg))
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        b = _batch(packed)
        loss = model(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
        loss.backward()
        torch.save({"full": full, "loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
                   path / f"ref_{name}.pt")


def _worker(rank: int, world: int, workdir: str) -> None:
    from miras_pretrain.model import ModelConfig
    from miras_pretrain.parallel import state
    from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict
    from miras_pretrain.parallel.context_parallel import (
        ContextParallel, CPGroup, all_reduce_cp_grads, cp_loss_reduce, slice_batch_for_cp, validate_cp_model,
    )
    from miras_pretrain.parallel.mpu import MegatronMPU
    from miras_pretrain.parallel.tensor_parallel import build_sharded_model

    state.initialize_parallel(2, 1, cp=2, timeout_s=120)
    grp = CPGroup.from_megatron()
    out: dict = {"cp_ranks": grp.ranks, "tp": state.tensor_parallel_world_size()}
    mpu = MegatronMPU()
    out["mpu"] = (mpu.get_data_parallel_world_size(), mpu.get_sequence_parallel_world_size(),
                  mpu.get_sequence_data_parallel_world_size())
    for name, (cfg_dict, scheme, packed) in CASES.items():
        ref = torch.load(Path(workdir) / f"ref_{name}.pt")
        cfg = ModelConfig.from_dict(cfg_dict)
        torch.manual_seed(0)
        model = build_sharded_model(cfg)
        model.load_state_dict(shard_state_dict(ref["full"], model))
        b = _batch(packed)
        validate_cp_model(cfg, b["input_ids"].shape[1], grp.size)
        cp = ContextParallel(grp, scheme)
        local = slice_batch_for_cp(b, grp.rank, grp.size, chunk_size=cfg.chunk_size)
        with cp.batch(local["cp_slice"]) as ctx:
            loss = model(local["input_ids"], labels=local["labels"], cu_seqlens=local.get("cu_seqlens"), cp=ctx)
            loss = loss * local["cp_loss_scale"]
        loss.backward()
        cp.finish_step()
        all_reduce_cp_grads(model.parameters(), grp)  # what DeepSpeed's sequence-data-parallel reduce does
        grads = gather_full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
        out[name] = {"loss": cp_loss_reduce(loss, grp), "grads": grads, "stats": cp.stats.as_dict()}
    torch.save(out, Path(workdir) / f"out_{rank}.pt")


def test_cp2_x_tp2_matches_single_process(tmp_path):
    _reference(tmp_path)
    spawn(_worker, 4, str(tmp_path), timeout=280.0, megatron=True)
    outs = [torch.load(tmp_path / f"out_{r}.pt") for r in range(4)]
    assert [o["cp_ranks"] for o in outs] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(o["tp"] == 2 and o["mpu"] == (1, 2, 2) for o in outs)
    for name in CASES:
        ref = torch.load(tmp_path / f"ref_{name}.pt")
        for r, out in enumerate(outs):
            got = out[name]
            torch.testing.assert_close(got["loss"], ref["loss"], **TOL, msg=f"rank {r} {name} loss")
            assert set(got["grads"]) == set(ref["grads"])
            for n, g in ref["grads"].items():
                torch.testing.assert_close(got["grads"][n], g, **TOL, msg=f"rank {r} {name} grad {n}")
            assert got["stats"]["cp/messages"] > 0 and got["stats"]["cp/tokens"] > 0
