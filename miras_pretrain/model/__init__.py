"""The language model: config, model, parameter and FLOP counting.

The model is built for an explicit parallel layout (``build_model(cfg, layout)``) and takes
context parallelism as a forward argument; it never imports the parallel runtime. The DeepSpeed
pipeline form lives in :mod:`miras_pretrain.parallel.pipeline`.
"""

from .config import ModelConfig
from .counting import count_parameters, flops_per_token
from .lm import Block, LMHead, MirasLM, TokenEmbedding, build_model

__all__ = [
    "ModelConfig", "MirasLM", "build_model", "Block", "TokenEmbedding", "LMHead",
    "count_parameters", "flops_per_token",
]
