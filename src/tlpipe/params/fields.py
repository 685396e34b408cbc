"""Frozen config dataclasses <-> plain dicts: build one from a params section, checking
names, types and ranges, and turn one back into data (for tracking, hashing and the KFP
parameters).

A numeric field states its range in its type, read here when params are resolved:
``lr: Annotated[float, above(0)] = 0.05``; a value outside it is refused in one line that names
the key, the value and the range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any, TypeVar

from tlpipe.errors import TlpipeError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric param may take: `low` .. `high`, each end open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        lo, hi = self.low, self.high
        return (lo is None or (value > lo if self.low_open else value >= lo)) and (
            hi is None or (value < hi if self.high_open else value <= hi)
        )

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


def above(low: float) -> Range:
    """> low."""
    return Range(low, low_open=True)


def at_least(low: float) -> Range:
    """>= low."""
    return Range(low)


def between(low: float, high: float, ends: str = "[]") -> Range:
    """low .. high; `ends` as in maths: "[]", "[)", "(]" or "()"."""
    return Range(low, high, low_open=ends[0] == "(", high_open=ends[1] == ")")


def build(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, checking names and types; nested dataclasses work."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TlpipeError(
            f"unknown parameter(s) {', '.join(where + k for k in unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, value in values.items():  # a partial nested section fills in the field's default
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            values[name] = {**dataclasses.asdict(default), **value}
        elif isinstance(value, dict) and isinstance(default, dict):  # per_strategy: the user's
            values[name] = merge(default, value)  # entries over the defaults, not instead
    kwargs = {k: _coerce(v, hints[k], where + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise TlpipeError(f"bad parameters for {where.rstrip('.') or cls.__name__}: {e}") from e


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid over it, mapping by mapping (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params_hash(cfg: Any) -> str:
    """Stable short hash of a config (lineage tag)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        value = _coerce(value, args[0], name)
        for allowed in (a for a in args[1:] if isinstance(a, Range)):
            if value not in allowed:
                raise TlpipeError(f"{name} = {value!r} is out of range: it must be {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name)
            except TlpipeError as e:
                errors.append(str(e))
        raise TlpipeError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TlpipeError(f"{name} must be a section (mapping), got {value!r}")
        return build(hint, value, where=name + ".")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise TlpipeError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise TlpipeError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise TlpipeError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TlpipeError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
