"""Typed, validated arguments: a dataclass per job (and the pretraining config), made from YAML, a command line or
keywords by one machinery.

``build_args`` refuses unknown keys (naming the closest valid one) and converts each value to its field's type;
each class's ``problems()`` names its bad values and ``check`` raises them together. ``arg`` declares a field with
its help text, which the command line shows (its flags are generated from these dataclasses).
"""
from __future__ import annotations

import dataclasses
import difflib
from types import UnionType
from typing import Any, Callable, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


class RunFailed(RuntimeError):
    """A run (on Ray Train) that ended in an error after its restarts; the message names the error and why."""


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
        **metadata: Any) -> Any:
    """A dataclass field with its command-line help (``metadata``: ``flag`` for another flag name, ``positional``)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / command-line value to the type ``hint``, or raise naming the key and value. Lists
    are converted item by item; a union of other types than None passes through as it is."""
    optional = get_origin(hint) in (Union, UnionType) and type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) > 1:
            return value
        hint = rest[0]
    try:
        if get_origin(hint) is tuple:
            items = list(value) if isinstance(value, (list, tuple)) else None
            if items is None or len(items) != len(get_args(hint)):
                raise TypeError
            return tuple(float(x) for x in items)
        if get_origin(hint) is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [coerce(key, item, get_args(hint)[0]) for item in value]
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            return str(value)
        if hint is dict and isinstance(value, dict):
            return dict(value)
    except (TypeError, ValueError, ConfigError):
        pass
    raise ConfigError(f"config key '{key}': value {value!r} is not a valid {hint}")


def unknown_keys(given: Any, known: Any, source: str) -> None:
    """Refuse keys outside ``known``, each with the closest valid key when there is one (a typo)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [f"'{key}' (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(key, known, n=1))
                 else f"'{key}'" for key in unknown]
        raise ConfigError(f"{source}: unknown config key(s) {', '.join(hints)}")


def check(obj: Any) -> None:
    """Raise one ``ConfigError`` naming every problem of an arguments object (its ``problems()``)."""
    problems = obj.problems()
    if problems:
        raise ConfigError(f"{type(obj).__name__}: {'; '.join(problems)}")


def below(obj: Any, names: tuple[str, ...], minimum: float) -> list[str]:
    """Problems of the fields ``names`` of ``obj`` (None allowed; lists item by item) that are below ``minimum``."""
    problems = []
    for name in names:
        value = getattr(obj, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and v < minimum for v in values):
            problems.append(f"{name} must be >= {minimum:g}, got {value}")
    return problems


def one_of(name: str, value: Any, choices: Sequence[Any]) -> list[str]:
    return [] if value in choices else [f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"]


def build_args(cls: type[T], values: dict[str, Any], source: str = "arguments") -> T:
    """``cls`` from a mapping (a YAML file, a command line): unknown keys and unconvertible values are errors
    that name them; the class's own checks run as it is made."""
    hints = get_type_hints(cls)
    unknown_keys(values, [f.name for f in dataclasses.fields(cls)], source)
    return cls(**{k: coerce(k, v, hints[k]) for k, v in values.items()})
