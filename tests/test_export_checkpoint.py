"""Round trip from a real training checkpoint to Hugging Face format: 2 processes train the tiny
model with tensor parallelism 2 under DeepSpeed ZeRO-2, then ``miras-pretrain export hf
--checkpoint <run>/checkpoints/latest`` writes an HF directory. Its logits must equal those of
the single-process model loaded with the consolidated fp32 weights of the same checkpoint, and
``load_exported_state_dict`` must give back exactly those weights. Tolerance: 1e-5 absolute on
logits (fp32; same weights, two implementations of the forward pass)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from miras_pretrain.testing import tiny_training

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_tp2_zero2_checkpoint_exports_with_logit_parity(tmp_path, monkeypatch):
    corpus = tiny_training.prepare_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    model = dict(tiny_training.TINY_MODEL, miras={"preset": "yaad"}, layer_pattern="MA")
    cfg = tiny_training.tiny_run_config(
        out, corpus, steps=2, micro_batch_size=2, model=model,
        train={"zero_stage": 2}, parallel={"tensor_parallel_size": 2},
        checkpoint={"interval": 0, "keep_last": 1, "save_at_end": True},
    )
    path = tiny_training.write_config(tmp_path / "c.yaml", cfg)
    proc = tiny_training.run_train(path, tmp_path, nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]

    hf_dir = tmp_path / "hf_tp2_zero2_roundtrip"
    exp = subprocess.run(
        [sys.executable, "-m", "miras_pretrain.cli", "export", "hf",
         "--checkpoint", str(out / "checkpoints" / "latest"), "--out", str(hf_dir)],
        env=tiny_training.child_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]

    from transformers import AutoModelForCausalLM

    from miras_pretrain.export import load_exported_state_dict
    from miras_pretrain.model import ModelConfig, build_model
    from miras_pretrain.train.consolidate import consolidate_checkpoint

    full = consolidate_checkpoint(out / "checkpoints")  # the newest complete checkpoint
    reference = build_model(ModelConfig.from_dict(model)).eval()
    reference.load_state_dict(full)

    exported_cfg, exported_sd = load_exported_state_dict(hf_dir)
    assert exported_cfg.to_dict() == reference_cfg_dict(model)
    assert sorted(exported_sd) == sorted(full)
    for key, value in full.items():
        assert torch.equal(exported_sd[key].float(), value.float()), key

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    ids = torch.randint(0, model["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(ids)
        got = hf(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def reference_cfg_dict(model: dict) -> dict:
    from miras_pretrain.model import ModelConfig

    return ModelConfig.from_dict(model).to_dict()
