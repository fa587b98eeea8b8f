"""The operator modules an exported model runs, copied next to its modeling code.

An exported directory must load with torch and transformers alone, yet compute exactly what the
training operator computes. So instead of a second copy of the memory rules, the export writes
the operator's own modules (``miras_kernels.spec``, ``.rules``, ``.chunk_step``) into the
directory, and ``modeling_miras.py`` imports them as siblings.

How transformers finds them (``transformers.dynamic_module_utils``, 4.57): ``check_imports``
returns the modeling file's single-dot relative imports (``from .name import ...``, matched by a
regex per line) and, for a local directory, ``get_cached_module_file`` copies exactly those
``name.py`` files -- not the files *they* import. Hence the modeling file imports every copied
module itself, and the copies only import each other by single-dot relative imports.

Exported names carry a ``miras_`` prefix so that a copy can never shadow a common module name
(``spec``, ``rules``) in the directory; the copies' imports of each other are rewritten to match.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# operator module (in miras_kernels) -> module name in the exported directory
OPERATOR_MODULES: dict[str, str] = {
    "spec": "miras_spec",
    "rules": "miras_rules",
    "chunk_step": "miras_chunk_step",
}

# "from .name import ..." / "from ..name import ..." at the start of a line (as transformers reads it)
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)(\w*)(\s+import\b)", re.MULTILINE)


def operator_dir() -> Path:
    """The folder of the installed ``miras_kernels`` package (found without importing it)."""
    spec = importlib.util.find_spec("miras_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("miras_kernels is not installed: the export copies its modules")
    return Path(list(spec.submodule_search_locations)[0])


def exported_source(module: str) -> str:
    """Text of the exported copy of ``miras_kernels.<module>``: the source with its single-dot
    imports of other copied modules renamed to their exported names, nothing else changed.

    Raises ValueError when the module imports a sibling that is not copied, or imports by a
    multi-dot path: the copy would fail to load in the exported directory.
    """
    path = operator_dir() / f"{module}.py"
    text = path.read_text(encoding="utf-8")

    def rename(match: re.Match) -> str:
        head, dots, name, tail = match.groups()
        if dots != "." or name not in OPERATOR_MODULES:
            raise ValueError(
                f"{path} imports '{dots}{name}', which the export does not copy: an exported operator "
                f"module may only import {sorted(OPERATOR_MODULES)} (single-dot relative imports)"
            )
        return f"{head}.{OPERATOR_MODULES[name]}{tail}"

    return _RELATIVE_IMPORT.sub(rename, text)


def write_operator_files(out_dir: Path) -> list[str]:
    """Write every exported operator module into ``out_dir``; returns the file names."""
    names = []
    for module, exported in OPERATOR_MODULES.items():
        name = f"{exported}.py"
        (out_dir / name).write_text(exported_source(module), encoding="utf-8")
        names.append(name)
    return names
