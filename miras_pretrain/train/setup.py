"""Process groups and this rank's model for one job: shared by the trainer and by checkpoint
consolidation, which rebuilds a run's layout to read its sharded checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miras_pretrain.train import dist as mdist
from miras_pretrain.train.config import RunConfig
from miras_pretrain.train.rng import seed_all


@dataclass
class ProcessLayout:
    """How this job's processes are arranged (sizes, and this rank's data-parallel index)."""

    tp: int
    pp: int
    dp: int  # data parallel size WITHOUT the CP dimension (the loader's view)
    dp_rank: int
    world: int
    cp: int = 1

    @property
    def megatron(self) -> bool:
        """Whether megatron's parallel_state owns the process groups."""
        return self.tp > 1 or self.pp > 1 or self.cp > 1


def setup_parallel(cfg: RunConfig, device: torch.device) -> ProcessLayout:
    """Create the process groups ``cfg.parallel`` asks for (megatron's when any of TP, PP, CP
    is > 1, else plain data parallelism) and return the layout."""
    par = cfg.parallel
    tp, pp, cp = par.tensor_parallel_size, par.pipeline_parallel_size, par.context_parallel_size
    if tp > 1 or pp > 1 or cp > 1:
        from miras_pretrain.parallel import state as pstate

        mdist.fill_env_for_single_process()
        pstate.initialize_parallel(tp, pp, cp=cp, seed=cfg.run.seed)
        return ProcessLayout(tp, pp, pstate.data_parallel_world_size(),
                              pstate.data_parallel_rank(), mdist.world_size(), cp)
    mdist.init_distributed(device)
    return ProcessLayout(1, 1, mdist.world_size(), mdist.rank(), mdist.world_size())


def teardown_parallel(layout: ProcessLayout) -> None:
    """Undo :func:`setup_parallel` (also restores the environment it filled in)."""
    if layout.megatron:
        from miras_pretrain.parallel import state as pstate

        pstate.destroy_parallel()
        mdist.reset_deepspeed_groups()
        mdist.restore_env()
    else:
        mdist.destroy()


def build_local_model(model_cfg, layout: ProcessLayout, cfg: RunConfig):
    """This rank's model (its TP shard under megatron), or DeepSpeed pipeline stages when
    pipeline_parallel > 1."""
    if layout.pp > 1:
        from miras_pretrain.parallel.pipeline import build_pipeline_module

        # activation checkpointing per block is done by the blocks themselves
        # (ModelConfig.activation_checkpointing), so the pipeline's own interval stays 0
        module = build_pipeline_module(model_cfg)
        _init_stage_like_single_process(module, model_cfg, cfg.run.seed)
        return module
    from miras_pretrain.parallel.tensor_parallel import build_sharded_model

    return build_sharded_model(model_cfg)


@torch.no_grad()
def _init_stage_like_single_process(module, model_cfg, seed: int) -> None:
    """Give this pipeline stage the weights the single-process model (same seed) has.

    Each stage builds only its own layers, so drawing their initial weights from the generator
    would differ from the one-process model's draws. Instead the whole model is built once on
    this rank from ``seed`` (TP-sharded exactly like the stage under TP: megatron's CPU init
    slices the full draw) and the stage copies its layers out of it; afterwards the full model
    is dropped. Costs one model build per rank at start-up.
    """
    from miras_pretrain.parallel.checkpoint import full_name
    from miras_pretrain.parallel.tensor_parallel import build_sharded_model

    seed_all(seed)
    ref = dict(build_sharded_model(model_cfg).named_parameters())
    for name, p in module.named_parameters():
        src = ref[full_name(module, name)]
        if src.shape != p.shape:
            raise RuntimeError(f"pipeline init: {name} {tuple(p.shape)} vs model {tuple(src.shape)}")
        p.copy_(src)
    del ref


_INIT_FIX = "give a consolidated .pt (python tools/consolidate.py <checkpoint>) or an `export hf` directory"


def check_init_from(path: str) -> str:
    """What ``train.init_from`` names without reading the weights: ``"export"`` (a directory
    with config.json) or ``"file"``. FileNotFoundError / ValueError with one line naming the
    field and the fix for a missing path, a sharded checkpoint or another directory."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"train.init_from {path}: not found; {_INIT_FIX}")
    if not p.is_dir():
        return "file"
    if (p / "config.json").is_file():
        return "export"
    from miras_pretrain.train.checkpoint import META

    if (p / META).is_file() or (p / "latest").exists():
        raise ValueError(f"train.init_from {path} is a sharded training checkpoint: consolidate it first "
                         f"(python tools/consolidate.py {path} --out weights.pt) and give the .pt")
    raise ValueError(f"train.init_from {path}: a directory without config.json, not an export; {_INIT_FIX}")


def read_init_weights(path: str) -> dict[str, torch.Tensor]:
    """The single-process state dict ``train.init_from`` names: a consolidated ``.pt``
    (tools/consolidate.py: ``{name: tensor}``) or an ``export hf`` directory. FileNotFoundError /
    ValueError with one line naming the field and the fix for a missing or unknown path."""
    fix = _INIT_FIX
    p = path
    if check_init_from(path) == "export":
        from miras_pretrain.export.hf import load_exported_state_dict

        try:
            _, sd = load_exported_state_dict(p)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"train.init_from {path}: {err}") from None
        return sd
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of every kind: the file is not a torch.save
        raise ValueError(f"train.init_from {path} is not a torch.save file ({type(err).__name__}); {fix}") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"train.init_from {path} does not hold a {{name: tensor}} state dict; {fix}")
    return sd


@torch.no_grad()
def load_init_weights(module: torch.nn.Module, path: str, layout: ProcessLayout) -> int:
    """Copy ``train.init_from``'s weights into this rank's model (its TP shard / pipeline stage)
    before the engine is built, so that the optimizer's fp32 master weights and ZeRO partitions
    start from them. The first tensor that is missing or does not fit is a one-line ValueError.
    Returns the number of tensors loaded."""
    from miras_pretrain.parallel.checkpoint import full_name, shard_state_dict

    full = read_init_weights(path)
    try:
        local = shard_state_dict(full, module)
    except ValueError as err:
        raise ValueError(f"train.init_from {path}: {err}") from None
    if layout.pp == 1:  # a pipeline stage holds only its layers; the full model must use every tensor
        # every alias counts (a tied head's weight is the embedding's, saved under both names)
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)] + list(module.state_dict())
        used = {full_name(module, n) for n in names}
        extra = [k for k in full if k not in used]
        if extra:
            raise ValueError(f"train.init_from {path}: tensor {extra[0]!r} has no parameter in this model "
                             f"({len(extra)} unused): it was saved from a different model config")
    params = dict(module.named_parameters())
    for name, value in local.items():
        params[name].copy_(value)
    return len(local)
