"""Training: DeepSpeed engine, loop, checkpoints, metrics/W&B, signals, the demo.

Entry points: ``miras-pretrain train`` / ``miras-pretrain demo`` (:mod:`.cli`),
:func:`miras_pretrain.train.trainer.train`, :func:`miras_pretrain.train.config.load_config`,
:func:`miras_pretrain.train.consolidate.consolidate_checkpoint`. See docs/training.md.
Heavy libraries are imported inside functions, so importing this package is cheap.
"""
