"""The single place that imports mosaicml-streaming.

mosaicml-streaming's package ``__init__`` imports ``streaming.vision``, which needs torchvision;
no torchvision build matches the pinned CPU torch, so it is not installed (tools/setup_env.sh
installs mosaicml-streaming without its dependency list). We never use the vision datasets, so when torchvision is missing we
register an empty ``streaming.vision`` module before the first ``import streaming``.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def import_streaming() -> types.ModuleType:
    """Return the ``streaming`` package, importable with or without torchvision."""
    if "streaming" in sys.modules and "streaming.vision" in sys.modules:
        return sys.modules["streaming"]
    if importlib.util.find_spec("torchvision") is None and "streaming.vision" not in sys.modules:
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
    import streaming

    return streaming
