"""params.yaml → frozen config dataclasses.

Every step has a frozen dataclass config. `load_section` reads one params.yaml section, applies
`key=value` overrides (from the CLI's `--set`), and builds the dataclass, rejecting unknown keys
and values of the wrong type with a `TlpipeError` that names the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from tlpipe.errors import TlpipeError

T = TypeVar("T")


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml (a missing file means all defaults)."""
    import yaml

    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TlpipeError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise TlpipeError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML (so `k=5`, `lr=1e-3`, `cls=[5,6]` work)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TlpipeError(f"--set wants key=value, got {pair!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads `1e-3` as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[key.strip()] = parsed
    return out


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
    hints = typing.get_type_hints(cls)
    for name, value in values.items():  # a partial nested section fills in the field's default
        default = _field_default(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            values[name] = {**dataclasses.asdict(default), **value}
    kwargs = {k: _coerce(v, hints[k], where + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise TlpipeError(f"bad parameters for {where.rstrip('.') or cls.__name__}: {e}") from e


def load_section(
    cls: type[T], section: str, params: str | Path | dict = "params.yaml", overrides=None
) -> T:
    """Build `cls` from params.yaml section `section` plus `key=value` overrides."""
    data = params if isinstance(params, dict) else read_params(params)
    values = dict(data.get(section) or {})
    for key, value in parse_overrides(overrides).items():
        _set_dotted(values, key, value)
    return build(cls, values, where=f"{section}.")


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


def _set_dotted(values: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if rest:
        sub = values.setdefault(head, {})
        if not isinstance(sub, dict):
            raise TlpipeError(f"cannot set {key}: {head} is not a section")
        _set_dotted(sub, rest, value)
    else:
        values[head] = value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
