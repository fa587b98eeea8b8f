"""Round trip TP = 2 -> HF -> TP = 2: gather the tensor-parallel shards with the model's
``gather_full_state_dict``, export, check the exported model's logits against the TP model's
(gathered over the vocab shards), then shard the exported weights back into a fresh TP model and
check it gives the same logits. Two gloo processes. Tolerance 1e-5 (fp32).

(The DeepSpeed ZeRO-2 checkpoint leg, ``miras-pretrain export hf --checkpoint`` on a TP = 2 /
ZeRO-2 training run, is tests/test_export_checkpoint.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from miras_pretrain.testing.local_launch import free_port, run_local_workers

pytestmark = pytest.mark.distributed

CASES = {"yaad": ("yaad", "MA"), "titans": ("titans", "M")}




def _gather_logits(logits: torch.Tensor) -> torch.Tensor:
    from miras_pretrain.parallel import state

    tp = state.tensor_parallel_world_size()
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=state.tensor_parallel_group())
    return torch.cat(parts, dim=-1)


def _worker(rank: int, port: int, workdir: str, tok_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from miras_pretrain.export import export_hf, load_exported_state_dict
    from miras_pretrain.testing.tiny_models import tiny_config
    from miras_pretrain.parallel import state
    from miras_pretrain.parallel.tensor_parallel import build_sharded_model as build_model
    from miras_pretrain.parallel.checkpoint import gather_full_state_dict, shard_state_dict

    state.initialize_parallel(2, 1, timeout_s=120)
    try:
        out = {}
        wd = Path(workdir)
        for name, (preset, pattern) in CASES.items():
            cfg = tiny_config(preset, pattern)
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            assert model.layers[0].mixer.q_proj.weight.shape[0] == cfg.d_model // 2  # really sharded
            x = torch.randint(0, cfg.vocab_size, (2, 27), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = _gather_logits(model(x))
            full = gather_full_state_dict(model)
            export_dir = wd / f"tp-export-{name}"
            if rank == 0:
                export_hf(cfg, full, tok_path, export_dir)
            torch.distributed.barrier()
            cfg2, sd = load_exported_state_dict(export_dir)
            torch.manual_seed(123)  # different init: everything must come from the export
            back = build_model(cfg2).eval()
            back.load_state_dict(shard_state_dict(sd, back))
            with torch.no_grad():
                logits_back = _gather_logits(back(x))
            out[name] = {"x": x, "logits": logits, "logits_back": logits_back}
        torch.save(out, wd / f"out_{rank}.pt")
    finally:
        state.destroy_parallel()


def test_tp2_gather_export_parity_and_back(tmp_path):
    from transformers import AutoModelForCausalLM

    from miras_pretrain.testing.tiny_models import tiny_tokenizer

    tok_path = tiny_tokenizer(tmp_path / "tok")
    run_local_workers(_worker, (free_port(), str(tmp_path), str(tok_path)), 2, timeout=240,
                      what="TP workers")
    r0, r1 = (torch.load(tmp_path / f"out_{r}.pt") for r in (0, 1))
    for name in CASES:
        assert torch.equal(r0[name]["logits"], r1[name]["logits"])
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / f"tp-export-{name}"),
                                                  trust_remote_code=True).eval()
        with torch.no_grad():
            got = hf(input_ids=r0[name]["x"], use_cache=False).logits
        assert (got - r0[name]["logits"]).abs().max().item() <= 1e-5
        assert (r0[name]["logits_back"] - r0[name]["logits"]).abs().max().item() <= 1e-5
