"""The typed records that cross steps: `Manifest` (manifest.json, source.json) and
`CheckpointMeta`: one definition of each key, schema versions, older files still read."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tlpipe.data.manifest import (
    MANIFEST_VERSION,
    Manifest,
    SourceManifest,
    load_manifest,
    load_source_manifest,
)
from tlpipe.errors import TlpipeError
from tlpipe.fsio import read_json
from tlpipe.steps import check
from tlpipe.train.checkpoint import CHECKPOINT_VERSION, CheckpointMeta
from tlpipe.train.models import build_model, load_checkpoint, save_checkpoint

SPLIT = {"count": 2, "sha256": "s" * 64, "per_class": [1, 1]}
# manifest.json as tlpipe wrote it before source and target were separate specs (version 1)
VERSION_1 = {
    "version": 1,
    "dataset": "fashion-mnist",
    "scenario": {
        "dataset": "fashion-mnist",
        "format": "idx",
        "source_classes": [0, 1],
        "target_classes": [5, 6],
        "k": 5,
        "seed": 0,
    },
    "source_classes": ["T-shirt/top", "Trouser"],
    "target_classes": ["Sandal", "Shirt"],
    "input_shape": [1, 28, 28],
    "mean": [0.28],
    "std": [0.35],
    "splits": {
        name: SPLIT
        for name in ("source", "source_val", "target_train", "target_val", "target_test")
    },
    "dataset_sha256": "d" * 64,
}


def test_the_manifest_file_is_the_record(tiny_prepared: Path) -> None:
    data = read_json(tiny_prepared / "manifest.json")
    manifest = load_manifest(tiny_prepared)
    assert manifest.version == MANIFEST_VERSION and manifest.to_dict() == data
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert (manifest.in_chans, manifest.input_size) == (1, 28) and manifest.has_source
    source = load_source_manifest(tiny_prepared)
    assert isinstance(source, SourceManifest) and source.to_dict() == read_json(
        tiny_prepared / "source.json"
    )
    assert source.source_classes == manifest.source_classes
    assert source.dataset_sha256 != manifest.dataset_sha256  # the source splits' version only


def test_a_version_1_manifest_still_reads_and_compares(tiny_prepared: Path) -> None:
    old = Manifest.from_dict(copy.deepcopy(VERSION_1), "old/manifest.json")
    assert old.version == 1 and old.one_dataset and old.target.dataset == "fashion-mnist"
    assert old.input_size == 28 and old.splits["target_test"].count == 2
    assert old.image_sizes == {} and old.duplicates == {}
    assert old.requested()["target"] == ("fashion-mnist", "idx", [5, 6])
    # a champion prepared by an older tlpipe is still compared with this run's data
    report = check.compare(old, load_manifest(tiny_prepared))
    assert report["findings"]["new_class"] and not report["same_scenario_settings"]


def test_a_damaged_or_newer_manifest_is_refused_by_name() -> None:
    lacking = {k: v for k, v in VERSION_1.items() if k != "input_shape"}
    with pytest.raises(TlpipeError, match=r"p/manifest.json lacks 'input_shape'"):
        Manifest.from_dict(lacking, "p/manifest.json")
    with pytest.raises(TlpipeError, match="newer than this tlpipe reads"):
        Manifest.from_dict({**VERSION_1, "version": MANIFEST_VERSION + 1}, "p/manifest.json")


def test_checkpoint_meta_round_trip_and_older_files(tmp_path: Path) -> None:
    meta = CheckpointMeta(
        arch="small_cnn",
        in_chans=1,
        input_size=28,
        classes=("a", "b"),
        mean=(0.3,),
        std=(0.2,),
        strategy="full",
        pretrained="imagenet",
    )
    assert CheckpointMeta.from_dict(meta.to_dict()) == meta
    assert meta.to_dict()["version"] == CHECKPOINT_VERSION and meta.input_shape == (1, 28, 28)
    # a checkpoint written before the schema had a version (and `pretrained`)
    net = build_model("small_cnn", 2)
    old = {k: v for k, v in meta.to_dict().items() if k not in ("version", "pretrained")}
    torch.save({"meta": old, "state_dict": net.state_dict()}, tmp_path / "old.pt")
    _, read = load_checkpoint(tmp_path / "old.pt")
    assert read.version == 1 and read.pretrained is None and read.classes == ("a", "b")
    save_checkpoint(tmp_path / "new.pt", net, read)
    assert load_checkpoint(tmp_path / "new.pt")[1] == read.replace(version=CHECKPOINT_VERSION)


def test_a_checkpoint_without_its_input_size_is_an_error_not_a_guess(tmp_path: Path) -> None:
    net = build_model("small_cnn", 2)
    meta = {
        "arch": "small_cnn",
        "num_classes": 2,
        "in_chans": 1,
        "classes": ["a", "b"],
        "mean": [0.3],
        "std": [0.2],
    }
    torch.save({"meta": meta, "state_dict": net.state_dict()}, tmp_path / "m.pt")
    with pytest.raises(TlpipeError, match=r"m\.pt: checkpoint metadata lacks input_size"):
        load_checkpoint(tmp_path / "m.pt")
