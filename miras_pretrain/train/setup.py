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
