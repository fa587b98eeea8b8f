"""One schema engine for every config section: a dataclass built from a mapping, with one-line errors.

A section is a dataclass. A field's type comes from its annotation (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``Literal[...]``, ``list[X]``, ``dict``, a nested dataclass); its
constraints from plain ``dataclasses.field(metadata={...})`` keys, so a package that must not
import this one (``miras_kernels.spec.MirasSpec``) can still declare them:

==========  ==================================================================================
key         meaning
==========  ==================================================================================
choices     the accepted values (a tuple)
ge gt le lt numeric bounds; on a list they hold for every entry
finite      ``True``: reject inf and nan
length      the exact length of a list
nonempty    ``True``: a string or a list must not be empty
fix         how to fix a bad value; appended to the error after ``;``
doc         one line for the config reference (docs/training.md)
==========  ==================================================================================

After the fields are converted and checked, the dataclass's own ``check(prefix)`` method (its
cross-field rules) runs, when it has one. Every error is a :class:`ConfigError` (a ``ValueError``)
of one line in one format::

    config key 'train.lr' = -1.0 is not valid: must be > 0
    config key 'train.lrr' is not valid: unknown key 'lrr'; did you mean 'lr'? (valid keys in 'train': ...)
    config key 'train.tensor_parallel' is not valid: it moved; write parallel.tensor_parallel_size instead
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Iterator, Literal, Union

class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming the dotted key."""


# stands for "no value to show" in :func:`bad_value` (an unknown or moved key)
NO_VALUE = object()


def bad_value(key: str, value: Any, what: str, fix: str | None = None) -> ConfigError:
    """``config key '<key>' = <value> is not valid: <what>[; <fix>]`` (``value`` may be
    :data:`NO_VALUE`, which leaves the ``= <value>`` part out)."""
    shown = "" if value is NO_VALUE else f" = {value!r}"
    tail = f"; {fix}" if fix else ""
    return ConfigError(f"config key '{key}'{shown} is not valid: {what}{tail}")


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    """The option spelled most like ``name`` (a typo's intended key), or None."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_key(prefix: str, name: str, valid: typing.Sequence[str]) -> ConfigError:
    """The error for a key that is not a field of section ``prefix``."""
    key = f"{prefix}.{name}" if prefix else name
    guess = closest(str(name), valid)
    listing = f"{'valid keys in ' + repr(prefix) if prefix else 'valid sections'}: {', '.join(valid)}"
    fix = f"did you mean '{guess}'? ({listing})" if guess else listing
    return bad_value(key, NO_VALUE, f"unknown key '{name}'", fix)


def moved_key(old: str, new: str) -> ConfigError:
    """The error for a key that has a new home (the config schema moved it)."""
    return bad_value(old, NO_VALUE, "it moved", f"write {new} instead")


# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------


def type_name(tp: Any) -> str:
    """How a type reads in an error and in the config reference (``int or null``, ...)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "mapping"
    return {"int": "integer", "float": "number", "bool": "true/false", "str": "string"}.get(
        getattr(tp, "__name__", ""), getattr(tp, "__name__", str(tp)))


def _convert(key: str, value: Any, tp: Any, fix: str | None = None) -> Any:
    """``value`` as type ``tp`` (ints widen to float; integral floats narrow to int, as YAML
    writes ``1e3``), or a :class:`ConfigError` naming ``key`` (with the field's ``fix``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        errors = []
        for a in real:
            try:
                return _convert(key, value, a, fix)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise bad_value(key, value, f"expected {type_name(tp)}", fix)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise bad_value(key, value, "choose one of " + ", ".join(str(c) for c in choices), fix)
        return value
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise bad_value(key, value, "expected a list", fix)
        out = [_convert(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise bad_value(key, value, "expected true or false", fix)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                isinstance(value, int) or (math.isfinite(value) and value == int(value))):
            raise bad_value(key, value, "expected an integer", fix)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_value(key, value, "expected a number", fix)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad_value(key, value, "expected a string", fix)
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad_value(key, value, "expected a mapping", fix)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            validate(value, key)
            return value
        return build(tp, value, key)
    return value


def _bound_error(value: Any, meta: typing.Mapping) -> str | None:
    """What is wrong with a converted scalar against its metadata, or None."""
    if "choices" in meta and value not in meta["choices"]:
        return "choose one of " + ", ".join(str(c) for c in meta["choices"])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("finite") and not math.isfinite(value):
            return "must be finite"
        for op, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                             ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            if op in meta and not ok(value, meta[op]):
                return f"must be {word} {meta[op]}"
    if meta.get("nonempty") and isinstance(value, str) and not value:
        return "must not be empty"
    return None


def _check_meta(key: str, value: Any, meta: typing.Mapping, shown: Any) -> None:
    """Check converted ``value`` against field metadata; errors show the value as written."""
    if value is None or not meta:
        return
    fix = meta.get("fix")
    if isinstance(value, (list, tuple)):
        if "length" in meta and len(value) != meta["length"]:
            raise bad_value(key, shown, f"expected {meta['length']} entries", fix)
        if meta.get("nonempty") and not value:
            raise bad_value(key, shown, "must not be empty", fix)
        for i, v in enumerate(value):
            what = _bound_error(v, meta)
            if what:
                raise bad_value(key, shown, f"entry {i} {what}" if what.startswith("must") else what, fix)
        return
    what = _bound_error(value, meta)
    if what:
        raise bad_value(key, shown, what, fix)


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of ``cls`` (resolving is slow; classes do not change)."""
    return typing.get_type_hints(cls)


def validate(obj: Any, prefix: str) -> None:
    """Convert every field of dataclass instance ``obj`` in place (``1`` -> ``1.0`` for a float
    field), check it against its type and metadata, then run ``obj.check(prefix)`` if defined.

    Dataclasses whose ``__post_init__`` calls this validate on direct construction too."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}"
        value = getattr(obj, f.name)
        new = _convert(key, value, hints[f.name], f.metadata.get("fix"))
        _check_meta(key, new, f.metadata, value)
        if new is not value:
            object.__setattr__(obj, f.name, new)  # works on frozen dataclasses too
    hook = getattr(obj, "check", None)
    if callable(hook):
        hook(prefix)


def build(cls: type, data: Any, prefix: str, *, moved: typing.Mapping[str, str] | None = None) -> Any:
    """Dataclass ``cls`` from a mapping: unknown keys are refused with the closest valid name,
    keys in ``moved`` (``{old_key: 'new.section.key'}``) with their new home, every value is
    converted and checked (see :func:`validate`). ``None`` means an empty mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad_value(prefix, data, "expected a mapping of keys",
                        "write it as indented key: value lines")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        if moved and name in moved:
            raise moved_key(f"{prefix}.{name}", moved[name])
        if name not in fields:
            raise unknown_key(prefix, name, list(fields))
        key = f"{prefix}.{name}"
        kwargs[name] = _convert(key, value, hints[name], fields[name].metadata.get("fix"))
        _check_meta(key, kwargs[name], fields[name].metadata, value)
    for f in fields.values():
        if (f.name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):  # type: ignore[misc]
            raise bad_value(f"{prefix}.{f.name}", NO_VALUE, "missing",
                            f.metadata.get("fix", f"give {prefix}.{f.name}"))
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a class's own __post_init__ rule (e.g. MirasSpec)
        raise ConfigError(f"config key '{prefix}' is not valid: {err}") from None
    validate(obj, prefix)
    return obj


def describe(cls: type, prefix: str) -> Iterator[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, doc)`` for every field of ``cls``, nested sections
    flattened -- the rows of the config reference (docs/training.md)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from describe(tp, key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = NO_VALUE
        yield key, type_name(tp), default, f.metadata.get("doc", "")
