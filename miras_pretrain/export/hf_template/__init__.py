"""The modeling code written into every exported model directory.

In an exported directory ``modeling_miras.py`` imports the operator's modules as siblings
(``from .miras_spec import MirasSpec``), copies that ``export.operator_files`` writes there.
Inside this package the same imports must resolve to the real modules (``export.hf`` builds the
template model to read parameter shapes), so they are registered here under the exported names:
the template then runs the very code its exports copy.
"""

import importlib
import sys

from ..operator_files import OPERATOR_MODULES

for _module, _exported in OPERATOR_MODULES.items():
    sys.modules.setdefault(f"{__name__}.{_exported}", importlib.import_module(f"miras_kernels.{_module}"))
