"""Typed run configuration: nested dataclasses filled from TOML and ``--set dotted.key=value`` overrides.

Every key is checked against its dataclass before anything runs, and an error names the dotted key:
- an unknown key, or a value of the wrong type;
- a number outside the range its field declares next to its definition: ``steps: Annotated[int, Range(ge=1,
  le=10**9)] = 300``. Every numeric field declares both bounds; a string field declares what it accepts with
  ``Text`` (``tests/test_config_fuzz.py`` fails for a field that declares neither);
- a cross-field rule of one dataclass (its ``validate``) or of a whole command's configuration.

Config dataclasses derive from ``Checked``, so a range holds also when the dataclass is built in Python
(``MonitorConfig(check_interval=0)`` raises). ``python -m precisionrt.train --keys`` lists every key with its
type, default and valid values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns in the message."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field, ``Annotated[float, Range(gt=0, le=10)]``: ``ge``/``gt`` a lower bound
    (inclusive/exclusive), ``le``/``lt`` an upper one."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def bounded(self) -> bool:
        return (self.ge is not None or self.gt is not None) and (self.le is not None or self.lt is not None)

    def describe(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else "(-inf"
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"


def _num(x: float) -> str:
    """``2^20``, ``1e9``, ``0.5``: bounds as a reader writes them."""
    if x and abs(x) >= 10_000:
        if isinstance(x, int) and x > 0 and x == 2 ** (x.bit_length() - 1):
            return f"2^{x.bit_length() - 1}"
        mantissa, exp = f"{x:.0e}".split("e")
        if float(f"{x:.0e}") == x:
            return f"{mantissa}e{int(exp)}"
    return f"{x:g}"


@dataclass(frozen=True)
class Text:
    """What a string field accepts, ``Annotated[str, Text("a name", pattern=...)]``: ``pattern`` must match the
    whole value; without one, any text is accepted (the meaning says why)."""

    what: str
    pattern: str | None = None

    def check(self, value: str, key: str) -> None:
        if "\x00" in value:
            raise ConfigError(f"{key}: must not contain a NUL character, got {value!r}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ConfigError(f"{key}: must be {self.what}, got {value!r}")


Seed = Annotated[int, Range(ge=0, lt=2**63)]
Name = Annotated[str, Text("a name: a letter or digit, then letters, digits, '.', '_' or '-' (no path separator)",
                           pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")]
PathText = Annotated[str, Text("a file-system path")]
LayerPattern = Annotated[str, Text("an fnmatch pattern over managed layer names (checked against the model)",
                                   pattern=r".+")]
ConfigKeyPattern = Annotated[str, Text("a dotted config key or an fnmatch pattern of keys (e.g. 'model.*')",
                                       pattern=r"[A-Za-z0-9_.*?\[\]-]+")]
Fraction = Annotated[float, Range(ge=0, le=1)]
Steps = Annotated[int, Range(ge=1, le=10**9)]
Every = Annotated[int, Range(ge=0, le=10**9)]   # an interval or count where 0 means "off" / "only at the end"
LearningRate = Annotated[float, Range(gt=0, le=10)]


class Checked:
    """Base of the config dataclasses: ``__post_init__`` checks every field against its declared type and range,
    then calls ``validate`` for the rules that join several fields (raise ValueError naming them)."""

    def __post_init__(self) -> None:
        for name, tp in field_types(type(self)).items():
            _check(getattr(self, name), tp, name)
        self.validate()

    def validate(self) -> None:
        pass


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` and their resolved annotations (``Annotated`` metadata kept)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (``3``, ``1e5``, ``true``, ``"fp8"``, ``[0.5, 2.0]``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # the shell ate the quotes of a string: types are still checked against the dataclass


def apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    key, _, value = assignment.partition("=")
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is a value, not a table")
    node[parts[-1]] = parse_value(value.strip())


def _check(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        value = _check(value, base, key)
        for rule in rules:
            if isinstance(rule, Range) and not rule.contains(value):
                raise ConfigError(f"{key}: must be in {rule.describe()}, got {value!r}")
            if isinstance(rule, Text):
                rule.check(value, key)
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):   # built in Python: it checked itself
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):   # NaN/inf would be written into config.json and fail much later
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and values out of range raise ConfigError."""
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; keys of {prefix.rstrip('.') or 'the config'}: "
            f"{sorted(types_)}"
        )
    kwargs = {k: _check(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:   # a rule of validate(): it names the fields, relative to the table
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from e


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read TOML file ``path`` (optional), apply ``--set`` overrides, validate into ``cls``."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = tomllib.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r}); TOML files are UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
    for assignment in overrides:
        apply_override(tree, assignment)
    return from_dict(cls, tree)


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, keys joined by ``sep`` (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); tuples become
    lists, as JSON has them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"[{', '.join(_type_name(a) for a in args)}]"
        return f"list of {_type_name(args[0]) if args else 'any'}"
    return getattr(tp, "__name__", str(tp))


def rules_of(tp: Any) -> list[Range | Text]:
    """The declared rules of an annotation, also inside optional and list types."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return [r for r in args[1:] if isinstance(r, (Range, Text))] + rules_of(args[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [r for a in args if a is not Ellipsis for r in rules_of(a)]
    return []


def describe(cls: type, prefix: str = "") -> list[dict]:
    """Every leaf key of config dataclass ``cls``: ``{key, type, default, valid}`` (what ``--keys`` prints)."""
    out = []
    defaults = cls()
    for name, tp in field_types(cls).items():
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            out += describe(type(value), f"{prefix}{name}.")
            continue
        valid = "; ".join(r.describe() if isinstance(r, Range) else r.what for r in rules_of(tp))
        out.append({"key": prefix + name, "type": _type_name(tp), "default": value, "valid": valid})
    return out


def print_keys(cls: type) -> None:
    rows = describe(cls)
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {r['type']:<24}  default {r['default']!r:<24}  {r['valid']}")


class StartupError(RuntimeError):
    """A run that cannot start (nothing to resume from, a resume that would change the run): one line on
    stderr, exit 2, nothing written."""
