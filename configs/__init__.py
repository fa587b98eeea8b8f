"""Training and model configs, shipped as package data (``miras_pretrain.configs``).

This folder stays at the top of the checkout (``miras-pretrain train --config configs/X.yaml``);
pyproject.toml maps it onto ``miras_pretrain.configs`` so the wheel carries the YAMLs and
``miras-pretrain demo`` reads ``demo_moneta_tiny.yaml`` with importlib.resources wherever it is
installed (its model is a registry name, ``miras_pretrain/model/registry.py``).
"""
