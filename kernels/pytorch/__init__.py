"""The PyTorch forms of the operator: ``recurrent`` (the token loop, the definition of the
semantics) and ``chunked`` (chunk-parallel, same semantics), plus the per-token scan of the
non-affine retentions that ``chunked`` uses (``per_token_scan``) and the exact delta rule's WY
chunk form it routes ``chunk_rule="exact"`` to (``delta_exact``). The per-token rules both forms
share are in ``miras_kernels.rules``."""
