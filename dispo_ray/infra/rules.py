"""One rule per config key, declared beside its field and checked generically.

A field of the schema (:mod:`dispo_ray.infra.config`) declares its range or choices with
:func:`key`; rules that tie fields of one section together live in that section's ``check``
method; only rules across sections stay in :func:`dispo_ray.infra.validation.validate`.

Choices (and a bound) may name their owner instead of repeating it: ``"pkg.module.NAME"`` is read
from that module when the config is checked (a callable is called), so the loss registry, the
answer formats, the generator backends, ... are each written once, where they are used. The
schema names an owner by string so that this layer does not import the layers above it.

Every failure is one :class:`ConfigError` line naming the key, the value and what is allowed;
:func:`reference` renders the same rules as the configuration reference's key table.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from omegaconf import MISSING


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line, fit for the console."""


Owned = Union[str, Sequence[Any], float, int, None]  # a literal, or "module.NAME" of its owner


@dataclasses.dataclass(frozen=True)
class Rule:
    ge: Owned = None
    gt: Owned = None
    le: Owned = None
    lt: Owned = None
    choices: Owned = None  # the value is one of them
    each: Owned = None  # a non-empty list, every item one of them
    test: Optional[Callable[[Any], bool]] = None  # anything else: a predicate and its ``allowed`` text
    allowed: str = ""
    note: str = ""  # appended in parentheses, e.g. "0 = off"


def key(*, default: Any = MISSING, **rule: Any) -> Any:
    """A schema field whose value must meet ``Rule(**rule)``; its default lives in ``conf/``."""
    return dataclasses.field(default=default, metadata={"rule": Rule(**rule)})


def owned(ref: Owned) -> Any:
    """A literal as is; ``"pkg.module.NAME"`` read from its owner (called when callable)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.rpartition(".")
    value = getattr(importlib.import_module(module), name)
    return value() if callable(value) else value


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def allowed(rule: Rule, nullable: bool = False) -> str:
    """What the rule allows, as the error message and the key table say it."""
    if rule.test is not None:
        return rule.allowed
    if rule.choices is not None:
        text = "one of " + ", ".join(str(c) for c in owned(rule.choices))
    elif rule.each is not None:
        text = "a non-empty list of " + ", ".join(repr(c) for c in owned(rule.each))
    else:
        lo = ("[", owned(rule.ge)) if rule.ge is not None else ("(", owned(rule.gt)) if rule.gt is not None else None
        hi = ("]", owned(rule.le)) if rule.le is not None else (")", owned(rule.lt)) if rule.lt is not None else None
        if lo and hi:
            text = f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + _num(lo[1])
        else:
            text = ("<= " if hi[0] == "]" else "< ") + _num(hi[1])
    text += f" ({rule.note})" if rule.note else ""
    return text + (" or null" if nullable else "")


def holds(rule: Rule, value: Any) -> bool:
    if rule.test is not None:
        return bool(rule.test(value))
    if value is None:
        return True  # a rule on an Optional field applies to a value, not to null
    if rule.choices is not None:
        return value in owned(rule.choices)
    if rule.each is not None:
        return bool(value) and all(v in owned(rule.each) for v in value)
    return ((rule.ge is None or value >= owned(rule.ge)) and (rule.gt is None or value > owned(rule.gt))
            and (rule.le is None or value <= owned(rule.le)) and (rule.lt is None or value < owned(rule.lt)))


def check(ok: bool, key_: str, value: Any, allowed_: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key_}' = {value!r}: must be {allowed_}")


def _nullable(f: dataclasses.Field) -> bool:
    return str(f.type).startswith("Optional")


def _rules(section: Any, prefix: str) -> Iterator[Tuple[str, Any, Optional[Rule], bool, Any, str]]:
    """(key, value, rule, nullable, sub-section or None, type) for each field, in schema order."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        sub = value if dataclasses.is_dataclass(value) else None
        yield prefix + f.name, value, f.metadata.get("rule"), _nullable(f), sub, str(f.type)


def check_section(section: Any, prefix: str = "") -> None:
    """Every field rule of ``section`` and its sub-sections, then each section's own ``check``."""
    for key_, value, rule, nullable, sub, _type in _rules(section, prefix):
        if sub is not None:
            check_section(sub, key_ + ".")
        elif rule is not None:
            check(holds(rule, value), key_, value, allowed(rule, nullable))
    if hasattr(section, "check"):
        section.check(prefix.rstrip("."))


def reference(root: Any, prefix: str = "") -> List[Tuple[str, Any, str]]:
    """``(key, value in root, allowed)`` for every key: with ``root`` the composed default config,
    the rows of the configuration reference (see :func:`reference_table`). A key without a rule of
    its own shows its type (any rule tying it to other keys is in a section's ``check`` or in
    :func:`dispo_ray.infra.validation.validate`)."""
    rows: List[Tuple[str, Any, str]] = []
    for key_, value, rule, nullable, sub, type_ in _rules(root, prefix):
        if sub is not None:
            rows.extend(reference(sub, key_ + "."))
        else:
            rows.append((key_, value, allowed(rule, nullable) if rule else _type_text(type_)))
    return rows


def _type_text(type_: str) -> str:
    """``Optional[List[str]]`` -> ``a list of str, or null``: what the schema's type admits."""
    nullable = type_.startswith("Optional[")
    inner = type_[len("Optional["):-1] if nullable else type_
    inner = {"bool": "true or false", "float": "a number", "int": "an integer", "str": "a string",
             "List[str]": "a list of strings", "List[float]": "a list of numbers",
             "Dict[str, Any]": "a mapping"}.get(inner, inner)
    return inner + (", or null" if nullable else "")


def reference_table(root: Any) -> str:
    """A Markdown table of every key, its default and what it allows (rules across keys are
    listed in :func:`dispo_ray.infra.validation.validate`)."""
    lines = ["| key | default | allowed |", "|---|---|---|"]
    for key_, value, text in reference(root):
        lines.append(f"| `{key_}` | `{value!r}` | {text.replace('|', '/')} |")
    return "\n".join(lines)
