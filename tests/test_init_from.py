"""``train.init_from``: a new run starts from saved weights (a consolidated checkpoint or an
``export hf`` directory) with a fresh optimizer at step 0, also across a parallel-layout change
(2 data-parallel processes -> consolidate -> 1 process), and bad paths / shapes are one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from miras_pretrain.testing import tiny_training
from miras_pretrain.train.setup import ProcessLayout, check_init_from, load_init_weights

SINGLE = ProcessLayout(tp=1, pp=1, dp=1, dp_rank=0, world=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_training.prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _tiny_model():
    from miras_pretrain.model import build_model

    torch.manual_seed(0)
    return build_model(dict(tiny_training.TINY_MODEL))


def _direct_losses(cfg_path: Path, state: dict, cache: Path) -> tuple[float, float]:
    """(loss of the first training micro-batch, token-weighted validation loss over
    ``eval.batches``) of ``state`` evaluated in this process, on the batches a 1-process run reads."""
    from miras_pretrain.model import build_model
    from miras_pretrain.train import data_bridge
    from miras_pretrain.train.config import load_config, resolve_model_config

    cfg = load_config(cfg_path)
    model = build_model(resolve_model_config(cfg))
    model.load_state_dict(state)
    model.eval()
    data_cfg = dataclasses.replace(data_bridge.resolve(cfg), cache_dir=str(cache))
    mb = cfg.train.micro_batch_size
    train_loader = data_bridge.build_train_loader(data_cfg, micro_batch_size=mb, dp_rank=0, dp_size=1)
    val_loader = data_bridge.build_val_loader(data_cfg, micro_batch_size=mb, dp_rank=0, dp_size=1)
    try:
        with torch.no_grad():
            ids, labels, cu = data_bridge.model_inputs(data_bridge.attach_varlen(next(iter(train_loader))))
            first = float(model(ids, labels=labels))
            tot = cnt = 0.0
            for i, batch in enumerate(val_loader):
                if i == cfg.eval.batches:
                    break
                ids, labels, _ = data_bridge.model_inputs(batch)
                n = int((labels != -100).sum())
                if n:
                    tot += float(model(ids, labels=labels)) * n
                    cnt += n
    finally:
        for loader in (train_loader, val_loader):
            if hasattr(loader, "close"):
                loader.close()
    return first, tot / cnt


@pytest.mark.slow
def test_init_from_consolidated_two_process_run(tmp_path, corpus):
    """2 DP processes train and save; the consolidated weights start a 1-process run whose
    step-0 validation loss and first-step training loss equal those weights evaluated directly,
    with a fresh optimizer (lr warmup restarts) at step 0 in a new run directory."""
    from miras_pretrain.train.consolidate import consolidate_checkpoint

    src = tmp_path / "src"
    cfg2 = tiny_training.write_config(tmp_path / "two.yaml", tiny_training.tiny_run_config(src, corpus, steps=3))
    proc = tiny_training.run_train(cfg2, tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    state = consolidate_checkpoint(src / "checkpoints")
    weights = tmp_path / "weights.pt"
    torch.save(state, weights)

    dst = tmp_path / "dst"
    cfg1 = tiny_training.write_config(tmp_path / "one.yaml", tiny_training.tiny_run_config(
        dst, corpus, steps=1, train={"init_from": str(weights)}, eval={"interval": 0, "batches": 2, "at_start": True}))
    proc = tiny_training.run_train(cfg1, tmp_path, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"init_from: {len(state)} tensors from {weights}" in proc.stdout
    first, val = _direct_losses(cfg1, state, tmp_path / "direct_cache")
    assert tiny_training.step_losses(dst, "val/loss")[0] == pytest.approx(val, rel=1e-5)
    assert tiny_training.step_losses(dst)[1] == pytest.approx(first, rel=1e-5)
    # the weights are trained ones (not a fresh init): their loss is below the random model's
    assert val < math.log(tiny_training.TINY_MODEL["vocab_size"])
    assert not (dst / "checkpoints" / "step_00000000").exists()
    assert sorted(p.name for p in (dst / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_init_from_missing_path_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^train.init_from .*nope.pt: not found; give a consolidated"):
        check_init_from(str(tmp_path / "nope.pt"))


def test_init_from_unknown_directory_and_sharded_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"directory without config.json"):
        check_init_from(str(tmp_path / "plain"))
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "latest").write_text("step_00000003")
    with pytest.raises(ValueError, match=r"sharded training checkpoint: consolidate it first"):
        check_init_from(str(ckpts))


def test_init_from_not_a_state_dict(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not torch")
    with pytest.raises(ValueError, match=r"^train.init_from .*bad.pt is not a torch.save file"):
        load_init_weights(_tiny_model(), str(bad), SINGLE)


def test_init_from_names_first_tensor_that_does_not_fit(tmp_path):
    model = _tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_init_weights(_tiny_model(), str(path), SINGLE)
    line = str(err.value)
    assert "\n" not in line and f"{first!r} has shape (3, 3)" in line and line.startswith("train.init_from")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.9.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"tensor 'layers.9.extra' has no parameter in this model"):
        load_init_weights(_tiny_model(), str(path), SINGLE)


def test_init_from_loads_every_weight(tmp_path):
    src, dst = _tiny_model(), _tiny_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    n = load_init_weights(dst, str(path), SINGLE)
    assert n == len(dict(dst.named_parameters()))
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_is_a_validated_config_field(tmp_path):
    from miras_pretrain.schema import ConfigError
    from miras_pretrain.train.config import config_from_dict

    cfg = config_from_dict({"train": {"init_from": "w.pt"}})
    assert cfg.train.init_from == "w.pt"
    with pytest.raises(ConfigError, match=r"train.init_from"):
        config_from_dict({"train": {"init_from": ""}})
