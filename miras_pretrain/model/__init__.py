"""The language model (issue 5): config, model, parameter and FLOP counting."""

from .config import ModelConfig
from .counting import count_parameters, flops_per_token
from .lm import Block, LMHead, MirasLM, TokenEmbedding, build_model

__all__ = [
    "ModelConfig", "MirasLM", "build_model", "Block", "TokenEmbedding", "LMHead",
    "count_parameters", "flops_per_token",
]


def build_pipeline_module(*args, **kwargs):
    """See :func:`miras_pretrain.parallel.pipeline.build_pipeline_module` (re-exported here for
    the trainer; imported lazily because it pulls in DeepSpeed)."""
    from miras_pretrain.parallel.pipeline import build_pipeline_module as impl

    return impl(*args, **kwargs)


__all__.append("build_pipeline_module")
