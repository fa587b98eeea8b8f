"""Pipeline parallelism through DeepSpeed's pipeline engine (1F1B ``TrainSchedule``).

``build_pipeline_module(cfg, num_stages)`` returns a ``deepspeed.pipe.PipelineModule`` made of the
model's own pieces (``TokenEmbedding`` -> ``Block`` x N -> ``LMHead``) as ``LayerSpec``s, so each
stage builds only its layers. Activations between stages are ``h`` [B, T, D] or, for packed
documents, the tuple ``(h, cu_seqlens)``; the engine's data iterator yields
``(input_ids, labels)`` or ``((input_ids, cu_seqlens), labels)``. Under TP the topology is
``PipeModelDataParallelTopology(pp, dp, tp)`` whose rank layout equals megatron's, so the TP
groups megatron's layers use and DeepSpeed's grid agree. Under context parallelism the grid's
data axis is DP x CP and the labels carry a loss factor (see :func:`pipeline_loss`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from miras_pretrain.model.config import ModelConfig
from miras_pretrain.model.layers import check_cu_seqlens
from miras_pretrain.model.lm import Block, LMHead, TokenEmbedding, check_tp_divisibility

from . import layers as tpl
from . import state

TIED_KEY = "embed"


def _split(inputs):
    if isinstance(inputs, (tuple, list)):
        return inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return inputs, None


class EmbeddingPipe(TokenEmbedding):
    """input_ids [B, T] or (input_ids, cu_seqlens) -> h or (h, cu_seqlens)."""

    def forward(self, inputs):  # type: ignore[override]
        ids, cu = _split(inputs)
        h = super().forward(ids)
        if cu is None:
            return h
        check_cu_seqlens(cu, ids.shape[0], ids.shape[1])
        return h, cu


class BlockPipe(Block):
    """h or (h, cu_seqlens) -> same structure."""

    def forward(self, inputs):  # type: ignore[override]
        h, cu = _split(inputs)
        out = super().forward(h, cu)
        return out if cu is None else (out, cu)


class LMHeadPipe(LMHead):
    """h or (h, cu_seqlens) -> logits [B, T, V / tp]; with tied embeddings only the final norm
    (the logits come from the tied embedding layer that follows, :func:`tied_logits`)."""

    def forward(self, inputs):  # type: ignore[override]
        h, _ = _split(inputs)
        if self.tied:
            return self.norm(h)
        return super().forward(h)


def tied_logits(embedding: EmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
    """Output head sharing the embedding weight (last stage's copy of the tied module)."""
    if state.is_initialized():
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        h = copy_to_tensor_model_parallel_region(h)
    return F.linear(h, embedding.word.weight)


def pipeline_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """Mean token loss of one micro-batch (labels aligned with inputs, -100 ignored).

    ``labels`` is [B, T] long, or ``(labels, factor)`` with a float tensor ``factor`` the loss is
    multiplied by: under context parallelism each rank's factor is CP x its share of the
    micro-batch's counted labels, because the engine averages over its data axis (DP x CP)."""
    if isinstance(labels, (tuple, list)):
        labels, factor = labels
        return tpl.lm_cross_entropy(logits, labels) * factor.to(torch.float32).reshape(())
    return tpl.lm_cross_entropy(logits, labels)


@functools.lru_cache(maxsize=None)
def _pipeline_class():
    """The PipelineModule subclass, defined lazily so importing this module needs no DeepSpeed."""
    from deepspeed.pipe import PipelineModule

    from miras_pretrain.model.lm import collect_memory_stats

    class MirasPipelineModule(PipelineModule):
        """DeepSpeed's PipelineModule plus the model's ``memory_stats()`` (this stage's layers)."""

        miras_config: ModelConfig

        def memory_stats(self) -> dict[str, float]:
            return collect_memory_stats(self)

    return MirasPipelineModule


def build_pipeline_module(
    cfg: ModelConfig | dict,
    num_stages: int | None = None,
    *,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    dynamic_shape: bool = True,
):
    """The model as a ``deepspeed.pipe.PipelineModule`` for the current process's stage.

    ``num_stages`` defaults to megatron's pipeline size (``initialize_parallel(tp, pp)`` must
    have run when TP > 1). ``partition_method``: DeepSpeed's ``"parameters"`` (balance parameter
    counts, default), ``"uniform"`` (layer counts) or ``"type:BlockPipe"`` (balance blocks only).
    ``dynamic_shape`` lets micro-batches differ in shape (e.g. number of packed documents in
    ``cu_seqlens``); it costs one small metadata message per micro-batch.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    check_tp_divisibility(cfg)
    if state.is_initialized():
        # DeepSpeed's grid has no CP axis: its data axis is DP x CP (megatron's tp-cp-dp-pp
        # order puts CP right inside DP, the grid's order puts data right outside model = TP, so
        # the two agree rank for rank); gradients are then averaged over DP x CP
        pp, tp, dp = (state.pipeline_parallel_world_size(), state.tensor_parallel_world_size(),
                      state.data_context_parallel_world_size())
        if num_stages is not None and num_stages != pp:
            raise ValueError(
                f"build_pipeline_module: num_stages={num_stages} differs from the pipeline size "
                f"{pp} given to initialize_parallel; pass num_stages=None or {pp}"
            )
        topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        num_stages = None
    else:
        if num_stages is None:
            raise ValueError("build_pipeline_module: pass num_stages or call initialize_parallel first")
        topology = None
    if cfg.n_layers + 2 < (num_stages or topology.get_dim("pipe")):
        raise ValueError("build_pipeline_module: more pipeline stages than layers")
    specs: list = []
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, tied_weight_attr=["word.weight"]))
    else:
        specs.append(LayerSpec(EmbeddingPipe, cfg))
    specs += [LayerSpec(BlockPipe, cfg, i) for i in range(cfg.n_layers)]
    specs.append(LayerSpec(LMHeadPipe, cfg))
    if cfg.tie_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, cfg, forward_fn=tied_logits,
                                   tied_weight_attr=["word.weight"]))
    module = _pipeline_class()(
        layers=specs, num_stages=num_stages, topology=topology, loss_fn=pipeline_loss,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        dynamic_shape=dynamic_shape,
    )
    if state.is_initialized() and module.stage_id != state.pipeline_parallel_rank():
        raise RuntimeError(
            f"DeepSpeed stage {module.stage_id} != megatron pipeline rank "
            f"{state.pipeline_parallel_rank()}: rank layouts disagree"
        )
    module.miras_config = cfg
    return module
