"""Hugging Face export: ``export_hf`` writes a self-contained model directory.

See ``docs/export.md``. The modeling code written into the directory lives in ``hf_template/``
and does not import this package; the operator modules it runs are copied next to it
(``operator_files``).
"""

from .hf import convert_state_dict, export_hf, hf_config_dict, load_exported_state_dict

__all__ = ["export_hf", "convert_state_dict", "hf_config_dict", "load_exported_state_dict"]
