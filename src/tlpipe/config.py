"""params.yaml → frozen config dataclasses.

The dataclasses in `tlpipe.params` are the defaults. `resolve` lays params.yaml and the
`--set section.key=value` overrides over them and builds every section's config, rejecting
unknown sections, keys and values of the wrong type with a `TlpipeError` that names them.
"""

from __future__ import annotations

import contextlib
import copy
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
    """Parse `section.key=value` strings; values are YAML (`prepare.k=5`, `finetune.l2sp=1e-3`,
    `prepare.target_classes=[5,6]`, `strategies=[full,lp_ft]`)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not ("." in key or key == "strategies"):
            raise TlpipeError(
                f"--set wants section.key=value (e.g. pretrain.train.epochs=2), got {pair!r}"
            )
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads `1e-3` as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[key] = parsed
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


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Every section's config, defaults filled in, and the strategy set to train and compare."""

    configs: dict[str, Any]
    strategies: tuple[str, ...]

    def __getitem__(self, section: str) -> Any:
        return self.configs[section]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples): what `tlpipe params` prints."""
        data = {s: to_dict(cfg) for s, cfg in self.configs.items()}
        return json.loads(json.dumps({**data, "strategies": self.strategies}, default=str))


def resolve(
    params: str | Path | dict = "params.yaml", overrides: list[str] | None = None
) -> Resolved:
    """The defaults (`tlpipe.params`) + params.yaml (or a dict) + `section.key=value` overrides.

    Every section is built and checked, whichever step asks: a typo anywhere (`pretrian:`,
    an unknown strategy) fails before anything trains.
    """
    from tlpipe.params import (
        DEFAULT_STRATEGIES,
        SECTIONS,
        check_source_strategies,
        check_strategies,
    )

    data = copy.deepcopy(params if isinstance(params, dict) else read_params(params))
    for key, value in parse_overrides(overrides).items():
        _set_dotted(data, key, value)
    unknown = sorted(set(data) - set(SECTIONS) - {"strategies"})
    if unknown:
        raise TlpipeError(
            f"unknown params section(s) {', '.join(unknown)}; "
            f"known: {', '.join(SECTIONS)}, strategies"
        )
    configs = {}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise TlpipeError(f"params section {section} must be a mapping, got {values!r}")
        configs[section] = build(cls, values, where=f"{section}.")
    strategies = data.get("strategies", DEFAULT_STRATEGIES)
    if not isinstance(strategies, list | tuple) or not strategies:
        raise TlpipeError(f"strategies must be a non-empty list, got {strategies!r}")
    check_strategies(strategies)
    if configs["fetch"].source is None:  # a backbone is all there is to transfer from
        check_source_strategies(strategies, has_source=False)
        if configs["pretrain"].pretrained is None:
            raise TlpipeError(
                "fetch.source is null (no source dataset): set pretrain.pretrained to the "
                "backbone to start from (imagenet, or a weights file)"
            )
    return Resolved(configs, tuple(strategies))


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
