"""Configuration of an exported Miras language model (self-contained: needs only transformers).

Written next to the weights by ``miras-pretrain export hf``; loaded with
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

try:  # transformers 5 renamed the base class; 4.x only has the old name
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - depends on the installed transformers
    from transformers import PretrainedConfig as _BaseConfig

MIRAS_SPEC_DEFAULT = {
    "memory": "mlp", "bias": "lp", "retention": "lq", "learner": "gd",
    "p": 3.0, "q": 4.0, "expansion": 4, "c": 1.0, "lq_eps": 1e-6,
}
LAYER_KINDS = {"M": "miras", "A": "sliding_attention", "T": "attention"}


class MirasConfig(_BaseConfig):
    """Architecture of a Miras LM (the training ``ModelConfig`` plus the full Miras spec).

    ``miras_spec`` holds every field of the memory rule (memory, bias, retention, learner, p, q,
    expansion, c, lq_eps). ``layer_pattern`` is tiled over the layers: M = Miras mixer,
    A = sliding-window attention (``window``), T = full causal attention.
    ``max_position_embeddings`` is only advisory (what evaluation harnesses truncate to): the
    Miras layers have no position limit.
    """

    model_type = "miras"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 16,
        intermediate_size: int = 2048,
        layer_pattern: str = "M",
        miras_spec: dict | None = None,
        chunk_size: int = 64,
        conv_size: int = 4,
        gate_rank: int = 32,
        eta_max: float = 1.0,
        huber_delta: float | None = None,
        window: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_pattern = layer_pattern
        self.miras_spec = dict(MIRAS_SPEC_DEFAULT if miras_spec is None else miras_spec)
        self.chunk_size = chunk_size
        self.conv_size = conv_size
        self.gate_rank = gate_rank
        self.eta_max = eta_max
        self.huber_delta = huber_delta
        self.window = window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        if tie_word_embeddings:
            # transformers 5 silently ignores a tied lm_head written by 4.x: weights are always
            # stored untied (see the project's platform notes)
            raise ValueError("MirasConfig: tie_word_embeddings must be False (weights are stored untied)")
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            tie_word_embeddings=False, **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_kinds(self) -> list[str]:
        reps = self.num_hidden_layers // len(self.layer_pattern)
        return [LAYER_KINDS[c] for c in self.layer_pattern * reps]
