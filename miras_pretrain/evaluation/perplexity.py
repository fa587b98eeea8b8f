"""Validation perplexity of an exported model on prepared shards (``miras-pretrain data prepare``).

Batches come from the project's eval loader (one unshuffled pass over the split). Packed rows
are scored as they are; in the ``documents`` layout every document of a row (``cu_seqlens``) is
scored on its own, which is exactly what training computes (nothing crosses a document start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


@torch.no_grad()
def score_batch(model, input_ids: torch.Tensor, labels: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum of token NLLs and the token count of one loader batch.

    input_ids, labels [B, T] (labels aligned: ``labels[:, t]`` follows ``input_ids[:, t]``,
    -100 ignored); cu_seqlens [N+1] over the flattened B*T tokens (documents layout) or None.
    """
    device = next(model.parameters()).device
    if cu_seqlens is None:
        pieces = [(input_ids, labels)]
    else:
        flat_x, flat_y = input_ids.reshape(1, -1), labels.reshape(1, -1)
        cu = [int(c) for c in cu_seqlens.tolist()]
        pieces = [(flat_x[:, s:e], flat_y[:, s:e]) for s, e in zip(cu[:-1], cu[1:]) if e > s]
    nll, count = 0.0, 0
    for x, y in pieces:
        keep = y != IGNORE
        if not bool(keep.any()):
            continue
        logits = model(input_ids=x.to(device), use_cache=False).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        nll += float(loss)
        count += int(keep.sum())
    return nll, count


def eval_perplexity(model, data_paths: list[str], *, seq_len: int, batch_size: int = 1,
                    split: str = "val", max_batches: int | None = None,
                    tokenizer_path: str | None = None) -> PerplexityResult:
    """Perplexity over ``split`` of the prepared dataset roots ``data_paths`` (same layout)."""
    from miras_pretrain.data.config import DataConfig
    from miras_pretrain.data.loader import build_eval_loader
    from miras_pretrain.data.manifest import read_manifest

    if not data_paths:
        raise ValueError("--perplexity needs at least one prepared dataset path")
    layouts = {read_manifest(p).layout for p in data_paths}
    if len(layouts) != 1:
        raise ValueError(f"--perplexity datasets mix layouts {sorted(layouts)}: evaluate them separately")
    cfg = DataConfig.from_dict({
        "streams": list(data_paths), "layout": layouts.pop(), "seq_len": seq_len,
        "micro_batch_size": batch_size, "num_workers": 0, "shuffle": False, "eval_split": split,
        "eval_batches": max_batches, "tokenizer": tokenizer_path,
    }, where="perplexity")
    total = PerplexityResult(0.0, 0)
    loader = build_eval_loader(cfg)
    try:
        for batch in loader:
            nll, n = score_batch(model, batch["input_ids"], batch["labels"], batch.get("cu_seqlens"))
            total.nll_sum += nll
            total.tokens += n
    finally:
        loader.close()
    if total.tokens == 0:
        raise ValueError(f"split {split!r} of {data_paths} has no tokens to score")
    return total
