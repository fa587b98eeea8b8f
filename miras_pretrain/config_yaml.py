"""Reading config YAML: files and ``--set`` values, with numbers as a person writes them.

PyYAML follows YAML 1.1, where ``3e-3`` and ``1e3`` (no dot) are strings; every config here is
read with a loader that also takes those as numbers (the YAML 1.2 rule), so the schema engine
(:mod:`miras_pretrain.schema`) can demand real numbers everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from miras_pretrain.schema import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2 floats (``3e-3``, ``1E+6``)."""


_FLOAT = re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$""", re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def loads(text: str) -> Any:
    """Parse YAML text (a file's content or one ``--set`` value)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


def _position(mark) -> str:
    # PyYAML marks count from 0; editors and people count lines and columns from 1
    return f"line {mark.line + 1}, column {mark.column + 1}"


def yaml_error_line(err: yaml.YAMLError) -> str:
    """One line for a PyYAML error: where it is (line, column) and what is wrong there.

    PyYAML's own message spans several lines (a context, its position, a quoted excerpt of the
    source, the problem): keep the problem and its position, plus the opening construct (an
    unclosed bracket or quote) when it starts elsewhere, since that is usually what to fix.
    """
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None or mark is None:
        text = " ".join(str(err).split())
        return text or "parse error"
    line = f"{_position(mark)}: {problem}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and \
            (context_mark.line, context_mark.column) != (mark.line, mark.column):
        line += f" ({context} started at {_position(context_mark)})"
    return line


def read_mapping(path: Path, what: str) -> dict:
    """The top-level mapping of YAML file ``path``; ``what`` names it in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path} (check the path)")
    try:
        data = loads(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} file {path} is not valid YAML: {yaml_error_line(err)}; "
                          "fix the syntax there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must contain a mapping at the top level")
    return data


def resolve_path(path: str | Path, base_dir: str | Path) -> Path:
    """A path written in a config: as given if it exists (relative to the CWD), else relative to
    the config file's directory or its parent (so a training config can name a model YAML next
    to it); unchanged when none exists (the caller reports it)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (Path(base_dir), Path(base_dir).parent):
        if (base / p).exists():
            return base / p
    return p
