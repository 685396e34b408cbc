"""params.yaml → frozen config dataclasses.

The dataclasses in `tlpipe.params` are the defaults. `resolve` lays params.yaml and the
`--set section.key=value` overrides over them and builds every section's config, rejecting
unknown sections, keys and values of the wrong type with a `TlpipeError` that names them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError
from tlpipe.params.fields import build, to_dict
from tlpipe.params.inputs import CheckConfig, FetchConfig, PrepareConfig
from tlpipe.params.learning import (
    DEFAULT_STRATEGIES,
    FinetuneConfig,
    MatchConfig,
    PretrainConfig,
    check_source_strategies,
    check_strategies,
)
from tlpipe.params.outputs import EvaluateConfig, ExportConfig, RegisterConfig

# params.yaml section → its config class, in pipeline order
SECTIONS: dict[str, type] = {
    "fetch": FetchConfig,
    "prepare": PrepareConfig,
    "check": CheckConfig,
    "pretrain": PretrainConfig,
    "match": MatchConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
}


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
    if configs["finetune"].model is None:  # like for like: scratch is the transfer network
        configs["finetune"] = dataclasses.replace(
            configs["finetune"], model=configs["pretrain"].model
        )
    strategies = data.get("strategies", DEFAULT_STRATEGIES)
    if not isinstance(strategies, list | tuple) or not strategies:
        raise TlpipeError(f"strategies must be a non-empty list, got {strategies!r}")
    check_strategies(strategies, baseline=configs["evaluate"].baseline)
    if configs["fetch"].source is None:  # a backbone is all there is to transfer from
        check_source_strategies(strategies, has_source=False)
        if configs["pretrain"].pretrained is None:
            raise TlpipeError(
                "fetch.source is null (no source dataset): set pretrain.pretrained to the "
                "backbone to start from (imagenet, or a weights file)"
            )
    return Resolved(configs, tuple(strategies))


def _set_dotted(values: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if rest:
        sub = values.setdefault(head, {})
        if not isinstance(sub, dict):
            raise TlpipeError(f"cannot set {key}: {head} is not a section")
        _set_dotted(sub, rest, value)
    else:
        values[head] = value
