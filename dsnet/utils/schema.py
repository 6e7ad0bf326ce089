"""Config dataclasses built from mappings and ``--set`` items, checked by their annotations.

One validator for every config of dsnet and its Ray layer. A config dataclass says all its
checks need in its field annotations:

* enumerations are ``Literal[...]``: the accepted values are ``typing.get_args`` of the type;
* every ``int``/``float`` field carries a :class:`Range` through ``Annotated`` (the aliases
  :data:`Count`, :data:`NonNegInt`, :data:`PositiveFloat`, ... or ``Annotated[int, Range(-1)]``);
* a field typed as another config dataclass is a section (``asha: AshaConfig``); a
  ``dict[str, X]`` field is an open section whose keys are free (``space``, ``ray``).

:func:`build` makes a dataclass from a mapping (unknown keys refused with a "did you mean"
suggestion, values coerced and range-checked); :func:`split_item` and :func:`set_item` are the
one ``--set KEY=VALUE`` parser (dotted keys into sections, VALUE parsed as YAML and checked
against the field's type). Errors are :class:`ConfigError` with a one-line message naming
the key.

This module imports only the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

# PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; float fields accept that spelling.
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration file, mapping or override is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``low <= v`` (``low < v`` when ``open_low``) and,
    given ``high``, ``v <= high`` (``v < high`` when ``open_high``)."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.low if self.open_low else v >= self.low
        below = self.high is None or (v < self.high if self.open_high else v <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return (f"in {'(' if self.open_low else '['}{self.low}, "
                f"{self.high}{')' if self.open_high else ']'}")


# The usual ranges, by meaning (a field's annotation names its range).
Count = Annotated[int, Range(1)]  # a number of things, at least one
NonNegInt = Annotated[int, Range(0)]  # an index, a seed, or a count where 0 means off/default
PositiveFloat = Annotated[float, Range(0, open_low=True)]
NonNegFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
Fraction = Annotated[float, Range(0, 1, open_high=True)]  # a rate below one (dropout, ...)


# ----------------------------------------------------------------------------- types


def alternatives(tp: Any) -> tuple[Any, ...]:
    """The members of a union type (``int | None``), else ``(tp,)``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def unwrap(tp: Any) -> tuple[Any, Range | None]:
    """``Annotated[int, Range(1)]`` -> ``(int, Range(1))``; any other type -> ``(tp, None)``."""
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return base, next((e for e in extras if isinstance(e, Range)), None)
    return tp, None


def choices(tp: Any) -> tuple[Any, ...]:
    """The values of the ``Literal`` in ``tp`` (``Literal["a", "b"] | None`` -> a, b)."""
    return tuple(v for alt in alternatives(tp) if typing.get_origin(alt) is Literal
                 for v in typing.get_args(alt))


def type_name(tp: Any) -> str:
    """Readable name of a type, e.g. ``int or None``, ``list of int``, ``one of 'a', 'b'``."""
    if len(alternatives(tp)) > 1:
        return " or ".join(type_name(a) for a in alternatives(tp))
    tp = unwrap(tp)[0]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) in (list, dict):
        return f"{typing.get_origin(tp).__name__} of {type_name(typing.get_args(tp)[-1])}"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def is_section(tp: Any) -> bool:
    """Whether a field of type ``tp`` is a nested config dataclass."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> annotated type (``Annotated`` kept) of a config dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# ----------------------------------------------------------------------------- values


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the single (non-union, unwrapped) type ``tp``, and the value
    coerced (ints widened to float, ``1e-5`` text read as a float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp)), value
    if tp is str or tp is bool or is_section(tp):
        return isinstance(value, tp), value
    if isinstance(value, bool):  # a bool is not an int or a float here
        return False, value
    if tp is int:
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return True, float(value)
        ok = isinstance(value, int | float)
        return ok, float(value) if ok else value
    if origin is list and isinstance(value, list | tuple):
        items = [_match(v, unwrap(typing.get_args(tp)[0])[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict and isinstance(value, Mapping):
        items = {k: _match(v, unwrap(typing.get_args(tp)[1])[0]) for k, v in value.items()}
        ok = all(isinstance(k, str) and fit for k, (fit, _) in items.items())
        return ok, {k: v for k, (_, v) in items.items()}
    return False, value


def coerce(key: str, value: Any, tp: Any, *, ranges: bool = True) -> Any:
    """``value`` checked against the annotation ``tp`` (and its range, unless ``ranges`` is
    false) and coerced to it.

    Raises:
        ConfigError: naming the key, what it takes and the value got.
    """
    for alt in alternatives(tp):
        base, rule = unwrap(alt)
        ok, out = _match(value, base)
        if ok:
            if ranges and rule is not None and out not in rule:
                raise ConfigError(f"key '{key}' must be {rule}, got {out!r}")
            return out
    valid = choices(tp)
    if valid and isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in valid], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key '{key}' must be one of {', '.join(map(repr, valid))}, "
                          f"got {value!r}{hint}")
    raise ConfigError(f"key '{key}': expected {type_name(tp)}, "
                      f"got {value!r} ({type(value).__name__})")


def check_fields(obj: Any) -> Any:
    """Coerce every field of a config dataclass to its type in place and check its range;
    returns ``obj``. Raises ConfigError on the first bad field."""
    for name, tp in field_types(type(obj)).items():
        setattr(obj, name, coerce(name, getattr(obj, name), tp))
    return obj


def field_value(cls: type, name: str, value: Any, source: str) -> Any:
    """One field's value checked and coerced as :func:`build` would (a command-line flag
    that sets a config key); ConfigError prefixed with ``source``."""
    try:
        return coerce(name, value, field_types(cls)[name])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- mappings


def suggest(key: str, valid: Sequence[str], hints: Mapping[str, str] | None = None) -> str:
    """``; did you mean 'X'?`` for the closest valid name (``lr_rate`` -> ``lr``), or ``""``.

    ``hints``: other trainers' names of valid keys (``learning_rate`` -> ``lr``).
    """
    valid = list(valid)
    close = [hints[key]] if hints and hints.get(key) in valid else []
    # a valid name plus a suffix (lr_rate), or the start of one (epoch, grace)
    close = close or sorted((v for v in valid if key.startswith(v + "_") or v.startswith(key)),
                            key=len, reverse=True)
    close = close or difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_known(d: Mapping[str, Any], valid: Sequence[str], source: str,
                hints: Mapping[str, str] | None = None) -> None:
    """ConfigError for the first key of ``d`` not in ``valid``, with a suggestion."""
    for key in d:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{key}'{suggest(str(key), valid, hints)}")


def build(cls: type, d: Any, source: str, *, hints: Mapping[str, str] | None = None,
          check: Callable[[Any], None] | None = None) -> Any:
    """A config dataclass from a mapping of its fields, every value checked.

    Args:
        cls: the config dataclass; absent keys keep its defaults.
        d: the mapping; a section field (a nested config dataclass) takes a mapping too.
        source: what to name in error messages (a file path, ``FILE [section]``).
        hints: see :func:`suggest`.
        check: cross-field rules run after every field's own check.

    Raises:
        ConfigError: ``source: ...`` for a key that is unknown, of the wrong type or range.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(d).__name__}")
    fields = field_types(cls)
    check_known(d, list(fields), source, hints)
    values = {name: build(fields[name], value, f"{source} [{name}]")
              if is_section(fields[name]) and isinstance(value, Mapping) else value
              for name, value in d.items()}
    try:
        obj = check_fields(cls(**values))
        if check is not None:
            check(obj)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return obj


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Mapping at the top of a YAML file (empty file -> {}), read with ``yaml.safe_load``.

    Raises:
        ConfigError: missing file, malformed YAML (with line) or a top level not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of 'key: value' lines, "
                          f"got a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- --set items


def split_item(item: str) -> tuple[str, str]:
    """``"a.b-c=v"`` -> ``("a.b_c", "v")``; ConfigError when there is no ``=`` or no key."""
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"malformed override {item!r}: expected KEY=VALUE, "
                          f"e.g. 'supernet.epochs=3' or 'lr=0.05'")
    key, raw = item.split("=", 1)
    return key.strip().replace("-", "_"), raw.strip()


def parse_value(item: str, key: str, raw: str, tp: Any) -> Any:
    """An override's VALUE read as YAML and type-checked for ``key`` (ranges are the built
    config's to check). A scalar that YAML reads as another type is kept as the text when
    the text fits (``name=2024``, ``resume=``, ``dist_bn=``).
    """
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    try:
        return coerce(key, value, tp, ranges=False)
    except ConfigError as e:
        error = e
    if not isinstance(value, list | dict) and value != raw:
        try:
            return coerce(key, raw, tp, ranges=False)
        except ConfigError:
            pass
    raise ConfigError(f"override {item!r}: {error}") from None


def set_item(d: dict[str, Any], cls: type, key: str, raw: str, item: str, *,
             what: str = "key", hints: Mapping[str, str] | None = None) -> None:
    """Set the dotted ``key`` of the mapping form ``d`` of the dataclass ``cls`` to ``raw``
    parsed against the field's type.

    ``section.key`` goes into a section field (a nested config dataclass) or, for a
    ``dict[str, X]`` field, sets the key ``key`` (dots and all) of that dict. A value whose
    type is a config dataclass is only read as YAML here: :func:`build` checks it.

    Raises:
        ConfigError: ``override 'ITEM': ...`` naming the unknown ``what`` or the bad value.
    """
    head, _, rest = key.partition(".")
    fields = field_types(cls)
    if head not in fields:
        raise ConfigError(f"override {item!r}: unknown {what} '{key}'"
                          f"{suggest(head, list(fields), hints)}")
    tp = fields[head]
    if not rest:
        d[head] = _parse_field(item, head, raw, tp)
        return
    section = d.get(head)
    d[head] = section = dict(section) if isinstance(section, Mapping) else {}
    if is_section(tp):
        set_item(section, tp, rest, raw, item, what=f"{head} key")
    elif typing.get_origin(tp) is dict:
        section[rest] = _parse_field(item, rest, raw, typing.get_args(tp)[1])
    else:
        raise ConfigError(f"override {item!r}: '{head}' has no sub-keys")


def _parse_field(item: str, key: str, raw: str, tp: Any) -> Any:
    """:func:`parse_value`, but only read as YAML for a config-dataclass type."""
    if is_section(unwrap(tp)[0]):
        return parse_value(item, key, raw, Any)
    return parse_value(item, key, raw, tp)


__all__ = [
    "ConfigError", "Count", "Fraction", "NonNegFloat", "NonNegInt", "PositiveFloat",
    "Probability", "Range", "alternatives", "build", "check_fields", "check_known", "choices",
    "coerce", "field_types", "field_value", "parse_value", "read_yaml", "set_item",
    "split_item", "suggest", "type_name", "unwrap",
]


def apply_items(cfg: Any, overrides: Sequence[str] | str,
                set_one: Callable[[dict[str, Any], str], None],
                rebuild: Callable[[dict[str, Any], str], Any]) -> Any:
    """Apply ``KEY=VALUE`` items to the config dataclass ``cfg``, all or nothing.

    Each item goes into ``cfg``'s mapping form through ``set_one(d, item)``; ``rebuild(d,
    source)`` validates the result as a whole (its ``*_from_dict``). Only when both pass
    is ``cfg`` updated, in place, and returned.

    Raises:
        ConfigError: a malformed item, unknown key, wrong type or invalid result.
    """
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    if not items:
        return cfg
    d = dataclasses.asdict(cfg)
    for item in items:
        set_one(d, item)
    new = rebuild(d, f"after overrides {items}")
    for f in dataclasses.fields(new):
        setattr(cfg, f.name, getattr(new, f.name))
    return cfg
