"""Scenario presets stay params.yaml plus their own changes (no silent drift)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tlpipe import config
from tlpipe.steps.prepare import PrepareConfig

REPO = Path(__file__).resolve().parents[1]


def test_mixed_source_differs_from_params_only_in_the_shift() -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    mixed = yaml.safe_load((REPO / "scenarios/mixed-source.yaml").read_text())
    for params in (base, mixed):
        params["prepare"].pop("shift")
        params["prepare"].pop("source_shift_fraction")
    assert base == mixed


def test_every_preset_builds_valid_configs() -> None:
    for path in [REPO / "params.yaml", *sorted((REPO / "scenarios").glob("*.yaml"))]:
        cfg = config.load_section(PrepareConfig, "prepare", path)
        assert cfg.target_classes
