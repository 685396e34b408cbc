"""The data check before training: this run's data against the champion's (real registry)."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from tlpipe.data.manifest import Manifest, load_manifest
from tlpipe.data.prepared import Split, load_split, save_split
from tlpipe.errors import TlpipeError
from tlpipe.params import CheckConfig, RegisterConfig
from tlpipe.steps import check, register


def _compare(old: dict, new: dict) -> dict:
    return check.compare(Manifest.from_dict(old), Manifest.from_dict(new))


def test_compare_names_vanished_new_and_relabelled_classes(tiny_prepared: Path) -> None:
    old = load_manifest(tiny_prepared).to_dict()
    same = _compare(old, copy.deepcopy(old))
    assert not any(same["findings"].values()) and same["same_scenario_settings"]

    fewer = copy.deepcopy(old)  # the data lost a class the settings still ask for
    fewer["target_classes"] = old["target_classes"][:-1]
    found = _compare(old, fewer)["findings"]
    assert found["vanished_class"] == [old["target_classes"][-1]]
    assert found["label_set_changed"]

    chosen = copy.deepcopy(fewer)  # the user changed the target classes on purpose
    chosen["scenario"]["target"]["classes"] = chosen["scenario"]["target"]["classes"][:-1]
    found = _compare(old, chosen)["findings"]
    assert not found["vanished_class"] and not found["label_set_changed"]

    grey = copy.deepcopy(old)
    grey["input_shape"] = [3, 28, 28]
    assert _compare(old, grey)["findings"]["input_shape_changed"]
    assert not same["findings"]["image_size_changed"]
    photos = copy.deepcopy(old)  # the same classes, shot with another camera
    size = [640, 480]
    photos["image_sizes"]["target"] = {
        "min": size,
        "median": size,
        "max": size,
        "commonest": [["640x480", 100]],
    }
    report = _compare(old, photos)
    assert report["findings"]["image_size_changed"]
    assert report["drift"]["image_sizes"]["now"]["median"] == [640, 480]


def test_an_image_in_two_target_splits_is_found(tiny_prepared: Path, tmp_path: Path) -> None:
    import shutil

    leaky = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, leaky)
    assert check.duplicates_across_splits(leaky) == []
    test, train = load_split(leaky, "target_test"), load_split(leaky, "target_train")
    x = np.array(test.x)
    x[3] = train.x[0]  # a training image slipped into the test split
    leak = Split(x=x, y=np.array(test.y), shifted=np.array(test.shifted))
    save_split(leaky, "target_test", leak)
    assert check.duplicates_across_splits(leaky) == [
        {"image": "target_test[3]", "same_as": "target_train[0]"}
    ]


def test_classes_with_few_images_are_named_with_their_counts(tiny_prepared: Path) -> None:
    manifest = load_manifest(tiny_prepared)
    counts = {split: manifest.splits[split].per_class for split in check.TARGET_SPLITS}
    assert counts["target_train"] == (5,) * 5 and min(counts["target_test"]) > 5
    assert check.few_images(manifest, 5) == {}
    few = check.few_images(manifest, 6)  # k = 5 train and 5 val images a class: all named
    names = manifest.target_classes
    assert few == {name: {"target_train": 5, "target_val": 5} for name in names}
    assert CheckConfig().min_images_per_class == 5


def test_check_against_the_champion_stops_on_a_vanished_class(
    server, tiny_prepared: Path, make_prepared, tmp_path: Path
) -> None:
    from test_register import make_export

    from tlpipe.train.checkpoint import CheckpointMeta
    from tlpipe.train.models import build_model, save_checkpoint

    classes = load_manifest(tiny_prepared).target_classes
    meta = CheckpointMeta(
        arch="small_cnn", in_chans=1, input_size=28, classes=classes, mean=(0.3,), std=(0.35,)
    )
    model = save_checkpoint(tmp_path / "m.pt", build_model("small_cnn", 5), meta)

    name = f"m-{uuid.uuid4().hex[:8]}"
    first = check.run(tiny_prepared, tmp_path / "c0", CheckConfig(), name)
    assert first.failures == () and "no champion" in first.summary
    # a champion registered with its data's manifest
    cfg = RegisterConfig(model_name=name, accuracy_floor=0.0)
    result = register.run(make_export(tmp_path / "export", 0.9), model, cfg, tiny_prepared)
    assert result.promoted
    same = check.run(tiny_prepared, tmp_path / "c1", CheckConfig(), name)
    assert same.failures == () and f"champion v{result.version}" in same.summary
    # the same settings, but the data now lacks class 9: the run stops before training
    lost = make_prepared(target={"classes": [5, 6, 7, 8]})
    manifest = load_manifest(lost).to_dict()  # as if class 9's images were gone (same config)
    manifest["scenario"]["target"]["classes"] = [5, 6, 7, 8, 9]
    (lost / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        TlpipeError, match=r"data check failed against champion v\d+ .*vanished_class"
    ):
        check.run(lost, tmp_path / "c2", CheckConfig(), name)
    assert json.loads((tmp_path / "c2/report.json").read_text())["failures"]
    # reported only, when the config does not list it
    relaxed = check.run(lost, tmp_path / "c3", CheckConfig(fail_on=()), name)
    assert relaxed.failures == () and "vanished_class" in relaxed.summary
