"""Every configuration key of both commands, walked from their dataclass trees: each declares what it accepts,
and for each the boundary values and hostile values end in a ConfigError naming the key, or are accepted as
documented. Loader and pre-flight checks only (no model is built): seconds for ~190 keys x ~8 cases."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Annotated, Literal

import pytest

from precisionrt.config import ConfigError, Range, Text, field_types, from_dict, rules_of
from precisionrt.train import LMConfig
from precisionrt.train import check_config as lm_check
from rl.train import RLConfig
from rl.train import check_config as rl_check

COMMANDS = {"lm": (LMConfig, lm_check), "rl": (RLConfig, rl_check)}

# Free text accepted as such; what each means is checked later, where it can be (documented acceptances).
FREE_TEXT = {
    "run.dir": "a path; a file or an unwritable place is refused by the pre-flight check (tested below)",
    "inject.layer": "a layer name, checked against the built model (test_config_rules.py)",
    "precision.control_file": "a path relative to the run directory",
}


def leaves(cls, prefix=""):
    """(dotted key, annotation, default) of every leaf field."""
    defaults = cls()
    for name, tp in field_types(cls).items():
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            yield from leaves(type(value), f"{prefix}{name}.")
        else:
            yield prefix + name, tp, value


def base(tp):
    """The annotation without Annotated / Optional wrappers."""
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType")) and type(None) in args:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def scalar_of(tp):
    """(element annotation, wrap) for a list/tuple field, (tp, identity) otherwise."""
    b = base(tp)
    origin = typing.get_origin(b)
    if origin in (list, tuple):
        inner = typing.get_args(b)[0]
        arity = len(typing.get_args(b)) if origin is tuple and typing.get_args(b)[-1] is not Ellipsis else 1
        return inner, (lambda v: [v] * arity)
    return tp, (lambda v: v)


def tree_with(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    *tables, leaf = key.split(".")
    for t in tables:
        node = node.setdefault(t, {})
    node[leaf] = value
    return tree


def outcome(cls, check, key, value):
    """None when the configuration is accepted; else the ConfigError's message."""
    try:
        check(from_dict(cls, tree_with(key, value)))
    except ConfigError as e:
        return str(e)
    return None


def names(message: str, key: str) -> bool:
    """The message names ``key``: in full, as a table and the rest of the key (a rule of one table, "rl:
    mismatch_policy.promote_share ..."), or as its table's wildcard (the memory check, "model.*")."""
    parts = key.split(".")
    return key in message or f"{'.'.join(parts[:-1])}.*" in message or any(
        f"{'.'.join(parts[:i])}:" in message and ".".join(parts[i:]) in message for i in range(1, len(parts)))


ALL = [(cmd, key, tp, default) for cmd, (cls, _) in COMMANDS.items() for key, tp, default in leaves(cls)]


def test_the_walk_covers_both_commands():
    keys = {cmd: [k for c, k, *_ in ALL if c == cmd] for cmd in COMMANDS}
    assert len(keys["lm"]) > 70 and len(keys["rl"]) > 100, {c: len(k) for c, k in keys.items()}
    assert "precision.policy.overflow" in keys["lm"] and "rl.loss.icepop_band" in keys["rl"]


@pytest.mark.parametrize("cmd,key,tp,default", ALL, ids=[f"{c}:{k}" for c, k, *_ in ALL])
def test_every_key_declares_what_it_accepts(cmd, key, tp, default):
    """A new field without a range (numbers) or a Text rule (strings) fails here."""
    inner, _ = scalar_of(tp)
    b = base(inner)
    if typing.get_origin(b) is Literal or b is bool:
        return
    rules = rules_of(tp)
    if b in (int, float):
        ranges = [r for r in rules if isinstance(r, Range)]
        assert ranges and all(r.bounded() for r in ranges), f"{key}: declare Annotated[{b.__name__}, Range(lo, hi)]"
        assert all(r.contains(v) for r in ranges for v in (default if isinstance(default, (list, tuple))
                                                          else [default])), f"{key}: the default is out of range"
    elif b is str:
        assert any(isinstance(r, Text) for r in rules), f"{key}: declare Annotated[str, Text(...)]"
    else:
        pytest.fail(f"{key}: a field of type {b!r} that the fuzz does not know")


def _cases(tp):
    """(value, must_refuse) pairs for a leaf annotation: boundaries inside (may pass), just outside and hostile
    values (must be refused)."""
    inner, wrap = scalar_of(tp)
    b = base(inner)
    cases = [(wrap("not a number" if b in (int, float) else 12345), True), ({"a": 1}, True)]
    if typing.get_origin(b) is Literal:
        return cases + [(wrap("bogus"), True)] + [(wrap(v), False) for v in typing.get_args(b)]
    if b is bool:
        return cases + [(wrap(1), True), (wrap(True), False), (wrap(False), False)]
    if b is str:
        text = next(r for r in rules_of(tp) if isinstance(r, Text))
        cases.append((wrap("a\x00b"), True))
        if text.pattern is not None:   # strings its pattern refuses (a name: no path, a pattern: not empty)
            hostile = [v for v in ("", "../escaped", "a b/c", "\n") if not re.fullmatch(text.pattern, v)]
            assert hostile, text.pattern
            cases += [(wrap(v), True) for v in hostile]
        return cases
    r = next(r for r in rules_of(inner) if isinstance(r, Range))
    step = 1 if b is int else None
    lo = r.ge if r.ge is not None else (r.gt + 1 if step else math.nextafter(r.gt, math.inf))
    hi = r.le if r.le is not None else (r.lt - 1 if step else math.nextafter(r.lt, -math.inf))
    below = (r.ge - 1 if step else math.nextafter(r.ge, -math.inf)) if r.ge is not None else r.gt
    above = (r.le + 1 if step else math.nextafter(r.le, math.inf)) if r.le is not None else r.lt
    cases += [(wrap(lo), False), (wrap(hi), False), (wrap(below), True), (wrap(above), True),
              (wrap(True), True), (wrap(-10**30 if step else -1e300), True), (wrap(10**30 if step else 1e300), True)]
    if b is float:
        cases += [(wrap(math.nan), True), (wrap(math.inf), True)]
    return cases


@pytest.mark.parametrize("cmd,key,tp,default", ALL, ids=[f"{c}:{k}" for c, k, *_ in ALL])
def test_boundary_and_hostile_values(cmd, key, tp, default):
    """Values outside the declared range, of the wrong type, NaN, inf and huge: refused, naming the key. The
    declared boundaries themselves: accepted, or refused by a rule that joins the key with others (the memory
    floor at the largest model, an eval interval that is no multiple of the log interval), still naming it."""
    cls, check = COMMANDS[cmd]
    if base(scalar_of(tp)[0]) is str and not any(r.pattern for r in rules_of(tp) if isinstance(r, Text)):
        assert key in FREE_TEXT, f"{key} accepts any text: say why in FREE_TEXT, or give its Text a pattern"
        assert outcome(cls, check, key, "some_text") is None
    for value, must_refuse in _cases(tp):
        message = outcome(cls, check, key, value)
        if must_refuse:
            assert message is not None, f"{key}={value!r} was accepted"
        if message is not None:
            assert names(message, key), (key, value, message)


def test_a_refused_value_names_its_key_exactly():
    message = outcome(LMConfig, lm_check, "precision.monitor.check_interval", 0)
    assert message == "precision.monitor.check_interval: must be in [1, 1e6], got 0"
    message = outcome(RLConfig, rl_check, "rl.loss.icepop_band", [0.5, 1e300])
    assert message == "rl.loss.icepop_band[1]: must be in (0, 1e6], got 1e+300"
