"""The project's own log-likelihood scoring of (context, continuation) pairs.

Definition (the one multiple-choice harnesses use): tokenize ``context + continuation`` once,
the continuation tokens are those after the tokens of ``context`` alone, and the score is the
sum of their log-probabilities given everything before; ``is_greedy`` says whether each was
the argmax. Trailing spaces of the context move to the continuation so the split falls on a
token boundary. An empty context is replaced by the BOS token (EOS when there is none).
"""

from __future__ import annotations

import torch


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:  # score every token: condition on the BOS token (EOS when there is none)
        bos = tokenizer.bos_token_id
        return [tokenizer.eos_token_id if bos is None else bos], whole
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model, tokenizer, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """[(sum log p(continuation | context), is_greedy)] for each (context, continuation)."""
    device = next(model.parameters()).device
    out = []
    for context, continuation in requests:
        ctx, cont = split_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
        ids = torch.tensor([ctx + cont], device=device)
        logp = torch.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits.float(), dim=-1)
        pred = logp[0, len(ctx) - 1:]
        target = ids[0, len(ctx):]
        ll = pred.gather(-1, target[:, None]).sum().item()
        out.append((ll, bool((pred.argmax(-1) == target).all())))
    return out
