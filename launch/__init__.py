"""The SLURM batch script template, shipped as package data (``miras_pretrain.launch.templates``).

This folder stays at the top of the checkout, where people look for it; pyproject.toml maps it
onto ``miras_pretrain.launch.templates`` so the wheel carries ``slurm_train.sbatch`` and
:mod:`miras_pretrain.launch.render` reads it with importlib.resources wherever it is installed.
"""
