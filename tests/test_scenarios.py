"""params.yaml and the presets in scenarios/ only override the defaults in `tlpipe.params`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tlpipe import params
from tlpipe.errors import TlpipeError
from tlpipe.params import resolver

REPO = Path(__file__).resolve().parents[1]


def test_default_scenario_is_the_dataclass_defaults() -> None:
    resolved = resolver.resolve(REPO / "params.yaml")
    for section, cls in params.SECTIONS.items():
        want = cls()
        if section == "finetune":  # finetune.model null = pretrain.model (like for like)
            want = dataclasses.replace(want, model=params.PretrainConfig().model)
        assert resolved[section] == want, section
    assert resolved.strategies == params.DEFAULT_STRATEGIES


def test_mixed_source_changes_only_the_shift() -> None:
    base = resolver.resolve(REPO / "params.yaml").as_dict()
    mixed = resolver.resolve(REPO / "scenarios/mixed-source.yaml").as_dict()
    assert mixed["prepare"].pop("shift") == [
        {"op": "invert", "degrees": None, "sigma": None, "std": None, "factor": None}
    ]
    assert mixed["prepare"].pop("source_shift_fraction") == 0.5
    base["prepare"].pop("shift")
    base["prepare"].pop("source_shift_fraction")
    assert base == mixed


def test_every_preset_resolves_and_lists_every_section() -> None:
    for path in [REPO / "params.yaml", *sorted((REPO / "scenarios").glob("*.yaml"))]:
        assert resolver.resolve(path)["fetch"].target.dataset
        # DVC tracks each section by name: a preset without one would make `dvc repro` fail
        assert set(resolver.read_params(path)) == {*params.SECTIONS, "strategies"}, path


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"pretrian": {}}, [], "unknown params section(s) pretrian"),
        ({}, ["pretrain.trian.lr=1"], "unknown parameter(s) pretrain.trian"),
        ({}, ["train.epochs=2"], "unknown params section(s) train"),
        ({}, ["epochs=2"], "--set wants section.key=value"),
        ({"strategies": ["full", "magic"]}, [], "unknown strategy 'magic'"),
        ({"finetune": {"per_strategy": {"fulll": {}}}}, [], "unknown strategy 'fulll'"),
        ({"prepare": [1]}, [], "params section prepare must be a mapping"),
        ({"fetch": {"target": {"format": "csv"}}}, [], "fetch.target.format must be one of"),
        ({"prepare": {"target": {"k": "all"}}}, [], "prepare.target.k must be"),
        ({"fetch": {"source": None}}, [], "strategy 'joint' needs a source dataset"),
        ({"fetch": {"source": None}, "strategies": ["full"]}, [], "set pretrain.pretrained"),
        (
            {"prepare": {"target": {"val_fraction": 0.5, "test_fraction": 0.5}}},
            [],
            "test_fraction must be < 1",
        ),
    ],
)
def test_bad_params_are_named(data, overrides, message) -> None:
    with pytest.raises(TlpipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolver.resolve(data, overrides)


def test_registries_match_the_names_params_accepts() -> None:
    from tlpipe.data import readers, splitting
    from tlpipe.match import matchers
    from tlpipe.steps import finetune

    assert set(readers.READERS) == set(params.DATA_FORMATS)
    assert set(finetune.STRATEGIES) == set(params.STRATEGY_NAMES)
    assert set(matchers.MATCHERS) == set(params.MATCHER_NAMES)
    assert set(splitting.SHIFTS) == set(params.SHIFT_PARAMS)
