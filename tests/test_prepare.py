"""The prepare step and scenario building: splits, shifts, validation, manifest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_patterns, write_idx, write_idx_dataset, write_imagefolder

from tlpipe import config
from tlpipe.data import SPLITS, dataset_sha256, load_manifest, load_split, split_sha256
from tlpipe.errors import TlpipeError
from tlpipe.readers import read_raw
from tlpipe.scenario import ShiftOp, apply_shift, conform_images
from tlpipe.steps import fetch, prepare

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _run(raw: Path, out: Path, **values) -> Path:
    prepare.run(raw, out, config.build(prepare.PrepareConfig, values))
    return out


def _image_set(x: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in x}


# ---------------------------------------------------------------------------- outputs


def test_tiny_prepared_matches_contract(tiny_prepared: Path) -> None:
    assert sorted(p.name for p in tiny_prepared.iterdir()) == sorted(
        [f"{s}.{a}.npy" for s in SPLITS for a in ("x", "y", "shifted")] + ["manifest.json"]
    )
    m = load_manifest(tiny_prepared)
    assert m["version"] == 1 and m["dataset"] == "fashion-mnist"
    assert m["source_classes"][0] == "T-shirt/top" and m["target_classes"][-1] == "Ankle boot"
    assert m["input_shape"] == [1, 28, 28] and len(m["mean"]) == len(m["std"]) == 1
    counts = {s: m["splits"][s]["count"] for s in SPLITS}
    assert counts == {"source": 140, "source_val": 10, "target_train": 25, "target_val": 25,
                      "target_test": 50}  # fmt: skip
    hashes = {}
    for name in SPLITS:
        split = load_split(tiny_prepared, name)
        assert split.x.dtype == np.uint8 and split.y.dtype == np.int64
        assert split.shifted.dtype == bool and split.x.shape == (len(split), 1, 28, 28)
        assert m["splits"][name]["per_class"] == np.bincount(split.y, minlength=5).tolist()
        hashes[name] = split_sha256(split)
        assert m["splits"][name]["sha256"] == hashes[name]
    assert m["dataset_sha256"] == dataset_sha256(hashes)
    source = load_split(tiny_prepared, "source")
    assert abs(m["mean"][0] - source.x.mean() / 255) < 1e-5
    assert abs(m["std"][0] - source.x.std() / 255) < 1e-5
    assert m["scenario"]["shift"][0]["op"] == "invert"


def test_deterministic_with_seed(tiny_raw: Path, tmp_path: Path) -> None:
    shift = [{"op": "noise", "std": 0.1}]
    a = prepare.run(tiny_raw, tmp_path / "a", config.build(prepare.PrepareConfig, {"shift": shift}))
    b = prepare.run(tiny_raw, tmp_path / "b", config.build(prepare.PrepareConfig, {"shift": shift}))
    c = prepare.run(tiny_raw, tmp_path / "c", prepare.PrepareConfig(seed=1))
    assert a.dataset_sha256 == b.dataset_sha256 != c.dataset_sha256
    assert (tmp_path / "a" / "manifest.json").read_text() == (
        tmp_path / "b" / "manifest.json"
    ).read_text()


def test_splits_come_from_the_right_sets(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(tiny_raw, tmp_path / "p", source_classes=[0, 1, 2, 3, 4, 5])  # 5 also in target
    raw = read_raw(tiny_raw, "idx")
    train_set, test_set = _image_set(raw.train_x), _image_set(raw.test_x)
    s = {name: load_split(out, name) for name in SPLITS}
    sets = {name: _image_set(split.x) for name, split in s.items()}
    for name in ("source", "source_val", "target_train", "target_val"):
        assert sets[name] <= train_set and not sets[name] & test_set
    assert sets["target_test"] <= test_set and not sets["target_test"] & train_set
    pairs = [(a, b) for i, a in enumerate(SPLITS[:4]) for b in SPLITS[i + 1 : 4]]
    for a, b in pairs:  # no image in two splits, even for class 5 (source and target)
        assert not sets[a] & sets[b], (a, b)
    assert np.bincount(s["target_test"].y).tolist() == [10] * 5
    assert not s["source"].shifted.any() and not s["target_test"].shifted.any()


def test_caps_and_overlap(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(tiny_raw, tmp_path / "p", max_source_per_class=10, max_test_per_class=3,
               source_val_fraction=0.2, k=2, val_per_class=1)  # fmt: skip
    m = load_manifest(out)["splits"]
    assert m["source"]["per_class"] == [8] * 5 and m["source_val"]["per_class"] == [2] * 5
    assert m["target_test"]["count"] == 15 and m["target_train"]["per_class"] == [2] * 5
    assert m["target_val"]["per_class"] == [1] * 5


# ---------------------------------------------------------------------------- shifts


def test_target_shift_and_mixed_source(tiny_prepared: Path, tiny_raw: Path) -> None:
    raw = read_raw(tiny_raw, "idx")
    inverted_test = _image_set(255 - raw.test_x)
    test = load_split(tiny_prepared, "target_test")
    assert test.shifted.all() and _image_set(test.x) <= inverted_test
    for name in ("target_train", "target_val"):
        assert load_split(tiny_prepared, name).shifted.all()
    for name, n in (("source", 140), ("source_val", 10)):
        split = load_split(tiny_prepared, name)
        assert split.shifted.sum() == round(n * 0.25)
        inverted = _image_set(255 - raw.train_x)
        assert _image_set(split.x[split.shifted]) <= inverted  # flags match the pixels
        assert not _image_set(split.x[~split.shifted]) & inverted


def test_shift_ops_change_pixels_as_expected() -> None:
    x = make_patterns(2)[0][:, None]
    rng = np.random.default_rng(0)
    assert np.array_equal(apply_shift(x, (ShiftOp("invert"),), rng), 255 - x)
    assert np.array_equal(
        apply_shift(x, (ShiftOp("rotate", degrees=90),), rng), np.rot90(x, 1, (2, 3))
    )
    assert np.array_equal(apply_shift(x, (ShiftOp("rotate", degrees=360),), rng), x)
    flat = np.full((1, 1, 9, 9), 77, np.uint8)
    assert np.array_equal(apply_shift(flat, (ShiftOp("gaussian_blur", sigma=2.0),), rng), flat)
    blurred = apply_shift(x, (ShiftOp("gaussian_blur", sigma=1.0),), rng)
    assert blurred.std() < x.std() and abs(blurred.mean() - x.mean()) < 1.0
    grey = np.full((200, 1, 28, 28), 128, np.uint8)
    noisy = [
        apply_shift(grey, (ShiftOp("noise", std=0.1),), np.random.default_rng(s)) for s in (1, 1, 2)
    ]
    assert np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], noisy[2])
    assert abs(noisy[0].astype(float).std() - 25.5) < 1.0
    both = apply_shift(x, (ShiftOp("invert"), ShiftOp("rotate", degrees=90)), rng)
    assert np.array_equal(both, np.rot90(255 - x, 1, (2, 3)))


def test_conform_images() -> None:
    from PIL import Image

    x = make_patterns(1)[0][:, None]
    rgb = conform_images(x, 3, 32)
    assert rgb.shape == (10, 3, 32, 32) and np.array_equal(rgb[:, 0], rgb[:, 2])
    assert np.array_equal(conform_images(rgb, 1, None), rgb[:, :1])  # grey RGB → same grey
    assert conform_images(x, None, None) is x
    for size in (32, 20):  # up and down: as PIL's bilinear resize, within a grey level
        ours = conform_images(x, None, size)[0, 0].astype(int)
        pil = np.asarray(Image.fromarray(x[0, 0]).resize((size, size), Image.Resampling.BILINEAR))
        assert np.abs(ours - pil).max() <= 1


@pytest.mark.parametrize(
    ("op", "match"),
    [({"op": "sepia"}, "unknown shift op 'sepia'"),
     ({"op": "rotate"}, "rotate needs degrees"),
     ({"op": "invert", "degrees": 3}, "invert takes no degrees"),
     ({"op": "gaussian_blur", "sigma": 0}, "sigma must be > 0")],
)  # fmt: skip
def test_shift_op_validation(op: dict, match: str) -> None:
    with pytest.raises(TlpipeError, match=match):
        config.build(prepare.PrepareConfig, {"shift": [op]})


def test_shift_from_params_mapping() -> None:
    cfg = config.build(
        prepare.PrepareConfig, {"shift": [{"op": "invert"}, {"op": "rotate", "degrees": 30}]}
    )
    assert cfg.shift == (ShiftOp("invert"), ShiftOp("rotate", degrees=30.0))


# ---------------------------------------------------------------------------- validation


def _corrupt_magic(raw: Path) -> None:
    (raw / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x01\x08\x03" + b"\0" * 12)
    )


def _truncate(raw: Path) -> None:
    path = raw / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))


def _count_mismatch(raw: Path) -> None:
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(81, np.uint8))


def _label_out_of_range(raw: Path) -> None:
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.full(80, 12, np.uint8))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [(_corrupt_magic, "bad magic number"),
     (_truncate, "truncated"),
     (_count_mismatch, "80 images but 81 labels"),
     (_label_out_of_range, "train label 12 out of range")],
)  # fmt: skip
def test_bad_raw_data_leaves_no_output(tmp_path: Path, corrupt, match: str) -> None:
    raw = write_idx_dataset(tmp_path / "raw")
    corrupt(raw)
    out = tmp_path / "out" / "prepared"
    with pytest.raises(TlpipeError, match=match):
        _run(raw, out, k=2, val_per_class=2)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("values", "match"),
    [({"source_classes": []}, "source_classes is empty"),
     ({"target_classes": []}, "target_classes is empty"),
     ({"target_classes": [5, 10]}, "class id 10 is not in the dataset"),
     ({"source_classes": [1, 1]}, "lists a class twice"),
     ({"k": 28, "val_per_class": 5}, r"class 5 \(Sandal\) has 30 train images, fewer than k"),
     ({"source_shift_fraction": 0.5}, "needs a prepare.shift"),
     ({"k": 0}, "k must be >= 1"),
     ({"source_val_fraction": 1.0}, r"source_val_fraction must be in \[0, 1\)")],
)  # fmt: skip
def test_bad_scenario_leaves_no_output(tiny_raw: Path, tmp_path: Path, values, match) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(TlpipeError, match=match):
        _run(tiny_raw, out, **values)
    assert list(tmp_path.iterdir()) == []


def test_class_with_no_images(tmp_path: Path) -> None:
    raw = write_idx_dataset(tmp_path / "raw")
    y = np.tile(np.arange(10), 8).astype(np.uint8)
    y[y == 3] = 2  # class 3 has no train images any more
    write_idx(raw / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(TlpipeError, match=r"class 3 \(Dress\) has no images in the train set"):
        _run(raw, tmp_path / "out", k=2, val_per_class=2)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_output(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(tiny_raw, tmp_path / "prepared")
    before = (out / "manifest.json").read_text()
    with pytest.raises(TlpipeError):
        _run(tiny_raw, out, k=100)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


# ---------------------------------------------------------------------------- other formats


def test_prepare_imagefolder(tmp_path: Path) -> None:
    raw = write_imagefolder(tmp_path / "raw", classes=("a", "b", "c", "d"), per_class=4)
    out = _run(raw, tmp_path / "p", dataset="pets", format="imagefolder", source_classes=[0, 1],
               target_classes=[2, 3], k=2, val_per_class=1, channels=3, input_size=16,
               shift=[{"op": "rotate", "degrees": 15}])  # fmt: skip
    m = load_manifest(out)
    assert m["target_classes"] == ["c", "d"] and m["input_shape"] == [3, 16, 16]
    assert m["splits"]["target_test"]["count"] == 8 and len(m["mean"]) == 3


def test_prepare_npz_with_conversion(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, n in (("train", 12), ("test", 3)):
        x, y = make_patterns(n, n_classes=4)
        np.savez(raw / f"{name}.npz", x=x, y=y)
    out = _run(raw, tmp_path / "p", dataset="toy", format="npz", source_classes=[0, 1],
               target_classes=[2, 3], channels=3, input_size=32)  # fmt: skip
    split = load_split(out, "target_train")
    assert split.x.shape == (10, 3, 32, 32)
    assert load_manifest(out)["source_classes"] == ["0", "1"]


# ---------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="no Debian Fashion-MNIST")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    fetched = fetch.run(fetch.FetchConfig(), tmp_path / "raw")
    assert fetched.source == str(FMNIST_DIR) and len(fetched.files) == 4
    shift = [{"op": "rotate", "degrees": 30}]
    cfg = config.build(prepare.PrepareConfig, {"shift": shift, "max_source_per_class": None})
    result = prepare.run(tmp_path / "raw", tmp_path / "prepared", cfg)
    m = json.loads(result.manifest.read_text())
    counts = {s: m["splits"][s]["count"] for s in SPLITS}
    assert counts == {"source": 28500, "source_val": 1500, "target_train": 25, "target_val": 25,
                      "target_test": 5000}  # fmt: skip
    assert m["splits"]["source"]["per_class"] == [5700] * 5
    assert m["target_classes"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert 0.25 < m["mean"][0] < 0.35 and 0.3 < m["std"][0] < 0.4


def test_make_prepared_factory(make_prepared) -> None:
    out = make_prepared(shift=[], source_shift_fraction=0.0, k=3)
    assert load_manifest(out)["splits"]["target_train"]["count"] == 15
    assert not load_split(out, "target_test").shifted.any()


# ---------------------------------------------------------------------------- errors up front


def test_unnamed_data_with_a_stray_label_leaves_no_output(tmp_path: Path) -> None:
    """Not a known dataset, so no class list: label 200 would have made 191 classes silently."""
    raw = write_idx_dataset(tmp_path / "raw")
    y = np.tile(np.arange(10), 8).astype(np.uint8)
    y[0] = 200
    write_idx(raw / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(TlpipeError, match="train labels go up to 200 but none is 10"):
        _run(raw, tmp_path / "out", dataset="my-scans", k=2, val_per_class=2)
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_leaves_no_output(tmp_path: Path, capsys) -> None:
    raw = write_imagefolder(tmp_path / "raw", classes=("a", "b", "c", "d"), per_class=4)
    values = {"dataset": "pets", "format": "imagefolder", "source_classes": [0, 1],
              "target_classes": [2, 3], "k": 2, "val_per_class": 1, "input_size": 16}  # fmt: skip
    _run(raw, tmp_path / "p", **values)
    assert "read 32 images from" in capsys.readouterr().err  # off a terminal: one summary line
    (raw / "train" / "a0").mkdir()  # would sort between a and b: b, c, d would change ids
    with pytest.raises(TlpipeError, match="train/a0 is an empty class folder"):
        _run(raw, tmp_path / "q", **values)
    assert not (tmp_path / "q").exists()
