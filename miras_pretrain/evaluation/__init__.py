"""Evaluation: validation perplexity on prepared shards, log-likelihood scoring,
the lm-evaluation-harness bridge and built-in synthetic long-context tasks (MQAR, S-NIAH).

Everything runs on a Hugging Face model directory written by ``miras-pretrain export hf``
(a training checkpoint is exported to a temporary directory first), so the numbers are those
of the artefact users load.
"""
