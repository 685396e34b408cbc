"""The prepare step and scenario building: splits, shifts, validation, manifest."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import fetched, make_patterns, write_idx, write_idx_dataset, write_imagefolder

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import SPLITS, dataset_sha256, load_split, split_sha256
from tlpipe.data.readers import read_raw
from tlpipe.data.splitting import ShiftOp, apply_shift, conform_images
from tlpipe.errors import TlpipeError
from tlpipe.params import fields, resolver
from tlpipe.steps import fetch, prepare

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _cfg(values: dict) -> prepare.PrepareConfig:
    return resolver.resolve({"prepare": values})["prepare"]


def _run(raw: Path, out: Path, **values) -> Path:
    prepare.run(raw, out, _cfg(values))
    return out


def _image_set(x: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in x}


def _ids(prepared: Path) -> dict[str, set[bytes]]:
    return {name: set(load_split(prepared, name).ids.tolist()) for name in SPLITS}


# ---------------------------------------------------------------------------- outputs


def test_tiny_prepared_matches_contract(tiny_prepared: Path) -> None:
    names = [f"{s}.{a}.npy" for s in SPLITS for a in ("x", "y", "shifted", "id")]
    files = sorted(p.name for p in tiny_prepared.iterdir())
    assert files == sorted([*names, "manifest.json", "source.json"])
    m = load_manifest(tiny_prepared).to_dict()
    assert m["version"] == 2 and m["dataset"] == "mine" and m["one_dataset"]
    assert m["source_classes"] == ["0", "1", "2", "3", "4"]
    assert m["target_classes"] == ["5", "6", "7", "8", "9"]
    assert m["input_shape"] == [1, 28, 28] and len(m["mean"]) == len(m["std"]) == 1
    counts = {s: m["splits"][s]["count"] for s in SPLITS}
    assert counts["target_train"] == 25 and counts["target_val"] == 25
    assert counts["target_test"] == 50  # the dataset's own test set (t10k), classes 5-9
    assert counts["source"] + counts["source_val"] == 150  # every train image of classes 0-4
    assert m["image_sizes"]["target"]["commonest"] == [["28x28", 100]]
    assert m["duplicates"]["across_splits"] == 0
    hashes = {}
    for name in SPLITS:
        split = load_split(tiny_prepared, name)
        assert split.x.dtype == np.uint8 and split.y.dtype == np.int64
        assert split.shifted.dtype == bool and split.x.shape == (len(split), 1, 28, 28)
        assert len(set(split.ids.tolist())) == len(split)
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
    a = prepare.run(tiny_raw, tmp_path / "a", _cfg({"shift": shift}))
    b = prepare.run(tiny_raw, tmp_path / "b", _cfg({"shift": shift}))
    c = prepare.run(tiny_raw, tmp_path / "c", _cfg({"seed": 1}))
    assert a.dataset_sha256 == b.dataset_sha256 != c.dataset_sha256
    assert (tmp_path / "a" / "manifest.json").read_text() == (
        tmp_path / "b" / "manifest.json"
    ).read_text()


def test_splits_come_from_the_right_sets(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(
        tiny_raw,
        tmp_path / "p",
        source={"classes": [0, 1, 2, 3, 4, 5]},
        target={"val_fraction": 0.5},
    )  # class 5 in both: no image in both
    raw = read_raw(tiny_raw / "source", "idx")
    train_set, test_set = _image_set(raw.x[~raw.test]), _image_set(raw.x[raw.test])
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


def test_caps(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(
        tiny_raw,
        tmp_path / "p",
        source={"max_per_class": 10, "val_fraction": 0.2},
        target={"k": 2, "val_per_class": 1, "max_test_per_class": 3},
    )
    m = load_manifest(out).to_dict()["splits"]
    assert [
        a + b for a, b in zip(m["source"]["per_class"], m["source_val"]["per_class"], strict=True)
    ] == [10] * 5
    assert 0 < m["source_val"]["count"] < 25
    assert m["target_test"]["count"] == 15 and m["target_train"]["per_class"] == [2] * 5
    assert m["target_val"]["per_class"] == [1] * 5


# ---------------------------------------------------------------------------- growth


def _digit_folder(root: Path, n_per_class: int, start: int = 0) -> Path:
    """An ImageFolder (no test folder) of 3 classes, images `start` .. `start + n - 1` each."""
    from PIL import Image

    for c in range(3):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n_per_class):
            rng = np.random.default_rng([c, i])
            img = rng.integers(0, 256, (10, 12), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i:04d}.png")
    return root


def test_added_images_move_no_existing_image(tmp_path: Path) -> None:
    """Issues 11/12: new images arrive; every old image stays in its split, and the previous
    test set is a subset of the new one. All labels are used (k: auto = all on own data)."""
    folder = _digit_folder(tmp_path / "mine", 40)
    values = {"target": {"classes": []}, "input_size": 12, "channels": 1}
    before = _run(
        fetched(tmp_path / "raw1", folder, "imagefolder", None), tmp_path / "p1", **values
    )
    _digit_folder(folder, 34, start=40)  # 102 more images
    after = _run(fetched(tmp_path / "raw2", folder, "imagefolder", None), tmp_path / "p2", **values)
    old, new = _ids(before), _ids(after)
    m_old, m_new = load_manifest(before).to_dict(), load_manifest(after).to_dict()
    assert sum(len(v) for v in old.values()) == 120 and sum(len(v) for v in new.values()) == 222
    for name in ("target_train", "target_val", "target_test"):
        assert old[name] <= new[name], name  # nothing left its split
        others = set().union(*(new[o] for o in SPLITS if o != name))
        assert not old[name] & others, name
    assert m_old["splits"]["target_test"]["count"] >= 15  # ~20 % of 120, per class
    assert min(m_new["splits"]["target_val"]["per_class"]) >= 1
    assert m_new["source"] is None and m_new["splits"]["source"]["count"] == 0


def test_a_small_class_still_gets_a_val_and_a_test_image(tmp_path: Path) -> None:
    """3 images a class and fractions no hash of 3 is likely to hit: each split still gets one
    image per class (the smallest hashes), so the run is measurable instead of refused."""
    folder = _digit_folder(tmp_path / "mine", 3)
    values = {
        "target": {"classes": [], "val_fraction": 0.01, "test_fraction": 0.01},
        "input_size": 12,
        "channels": 1,
    }
    out = _run(fetched(tmp_path / "raw", folder, "imagefolder", None), tmp_path / "p", **values)
    splits = load_manifest(out).to_dict()["splits"]
    for name in ("target_train", "target_val", "target_test"):
        assert splits[name]["per_class"] == [1, 1, 1], name
    again = _run(fetched(tmp_path / "raw2", folder, "imagefolder", None), tmp_path / "p2", **values)
    assert _ids(out) == _ids(again)  # the promotion is by hash, not by chance
    _digit_folder(folder, 1, start=3)  # 2 images a class cannot fill 3 splits: refused
    for c in range(3):
        for extra in sorted((folder / f"class{c}").iterdir())[2:]:
            extra.unlink()
    with pytest.raises(TlpipeError, match="has no (validation|test)"):
        _run(fetched(tmp_path / "raw3", folder, "imagefolder", None), tmp_path / "p3", **values)


# ---------------------------------------------------------------------------- two datasets


def test_two_datasets_source_idx_target_imagefolder(tmp_path: Path) -> None:
    idx = write_idx_dataset(tmp_path / "idx", 6, 2)
    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    raw = fetched(tmp_path / "raw", folder, "imagefolder", source=idx)
    with pytest.raises(TlpipeError, match=r"have \[1, 3\] channels: set prepare.channels"):
        _run(raw, tmp_path / "p", source={"classes": []}, target={"classes": []}, input_size=28)
    out = _run(
        raw,
        tmp_path / "p",
        source={"classes": [], "names": [f"n{i}" for i in range(10)]},
        target={"classes": ["dog", "cat"], "names": ["Dog", "Cat"]},
        channels=1,
        input_size=16,
    )
    m = load_manifest(out).to_dict()
    assert m["source_classes"][:2] == ["n0", "n1"] and m["target_classes"] == ["Dog", "Cat"]
    assert m["input_shape"] == [1, 16, 16] and not m["one_dataset"]
    assert m["splits"]["source"]["count"] + m["splits"]["source_val"]["count"] == 80  # + t10k
    assert m["splits"]["target_test"]["count"] == 12  # the folder's own test/
    assert m["target"]["own_test_set"] and m["source"]["dataset"] == "theirs"
    sizes = m["image_sizes"]["target"]
    assert sizes["min"] == [30, 20] and sizes["max"] == [35, 55]  # as stored, before resizing
    test = load_split(out, "target_test")
    assert set(test.y.tolist()) == {0, 1}  # dog = 0, cat = 1: the order asked for


def test_duplicates_across_target_splits_are_reported(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    shutil.copy(folder / "test/cat/img0.png", folder / "train/cat/copy-of-test.png")
    raw = fetched(tmp_path / "raw", folder, "imagefolder", None)
    result = prepare.run(raw, tmp_path / "p", _cfg({"target": {"classes": []}, "input_size": 16}))
    m = load_manifest(tmp_path / "p").to_dict()
    assert m["duplicates"]["across_target_splits"] == 1
    assert "1 image(s) in more than one split" in result.summary


def test_manifest_csv_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    rows = [
        (p.relative_to(folder).as_posix(), p.parent.name, p.parts[-3])
        for p in sorted(folder.rglob("*.*"))
    ]
    (folder / "manifest.csv").write_text(
        "path,label,split\n" + "".join(f"{p},{label},{s}\n" for p, label, s in rows)
    )
    values = {"target": {"classes": []}, "input_size": 16}
    a = _run(
        fetched(tmp_path / "r1", folder / "manifest.csv", "manifest", None),
        tmp_path / "a",
        **values,
    )
    b = _run(fetched(tmp_path / "r2", folder, "imagefolder", None), tmp_path / "b", **values)
    assert load_manifest(a).splits == load_manifest(b).splits  # same images, same splits
    assert sorted(p.name for p in (tmp_path / "r1/target").iterdir()) == [
        "manifest.csv",
        "test",
        "train",
    ]  # only what the manifest lists
    (folder / "manifest.csv").unlink()
    table = {"path": [r[0] for r in rows], "label": [r[1] for r in rows]}  # no split column
    pq.write_table(pa.table(table), folder / "manifest.parquet")
    c = _run(fetched(tmp_path / "r3", folder, "manifest", None), tmp_path / "c", **values)
    assert load_manifest(c).splits["target_test"].count > 0  # by ratio now
    (folder / "manifest.parquet").unlink()
    (folder / "manifest.csv").write_text("path,label\n../outside.png,cat\n")
    with pytest.raises(TlpipeError, match="is not a file inside"):
        fetched(tmp_path / "r4", folder / "manifest.csv", "manifest", None)
    (folder / "manifest.csv").write_text("path,label,split\ntrain/cat/img0.png,cat,valid\n")
    with pytest.raises(TlpipeError, match="split 'valid' is not train or test"):
        fetched(tmp_path / "r5", folder / "manifest.csv", "manifest", None)


def test_no_source_dataset(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    raw = fetched(tmp_path / "raw", folder, "imagefolder", None)
    assert json.loads((raw / "source.json").read_text()) == {"dataset": None}
    out = _run(raw, tmp_path / "p", target={"classes": []}, input_size=16)
    m = load_manifest(out).to_dict()
    assert m["source_classes"] == [] and m["source"] is None
    assert load_split(out, "source").x.shape == (0, 3, 16, 16)
    train = load_split(out, "target_train")
    assert abs(m["mean"][0] - train.x[:, 0].mean() / 255) < 1e-5  # stats from target_train


# ---------------------------------------------------------------------------- shifts


def test_target_shift_and_mixed_source(tiny_prepared: Path, tiny_raw: Path) -> None:
    raw = read_raw(tiny_raw / "source", "idx")
    inverted_test = _image_set(255 - raw.x[raw.test])
    test = load_split(tiny_prepared, "target_test")
    assert test.shifted.all() and _image_set(test.x) <= inverted_test
    for name in ("target_train", "target_val"):
        assert load_split(tiny_prepared, name).shifted.all()
    inverted = _image_set(255 - raw.x[~raw.test])
    source = [load_split(tiny_prepared, name) for name in ("source", "source_val")]
    shifted = sum(int(split.shifted.sum()) for split in source)
    assert 20 <= shifted <= 55  # 25 % of 150, drawn by hash
    for split in source:
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
    washed = apply_shift(x, (ShiftOp("contrast", factor=0.4),), rng).astype(float)
    per_image = x.astype(float).mean(axis=(2, 3))
    assert np.allclose(washed.mean(axis=(2, 3)), per_image, atol=0.5)  # its own mean stays
    assert np.allclose(washed.std(axis=(2, 3)), 0.4 * x.astype(float).std(axis=(2, 3)), atol=0.5)
    assert np.array_equal(apply_shift(x, (ShiftOp("contrast", factor=1.0),), rng), x)


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
    [
        ({"op": "sepia"}, "unknown shift op 'sepia'"),
        ({"op": "rotate"}, "rotate needs degrees"),
        ({"op": "invert", "degrees": 3}, "invert takes no degrees"),
        ({"op": "gaussian_blur", "sigma": 0}, "sigma = 0.0 is out of range: it must be > 0"),
        ({"op": "contrast", "factor": -1}, "factor = -1.0 is out of range: it must be >= 0"),
        ({"op": "noise", "std": 0.1, "factor": 2}, "noise takes no factor"),
    ],
)
def test_shift_op_validation(op: dict, match: str) -> None:
    with pytest.raises(TlpipeError, match=match):
        fields.build(prepare.PrepareConfig, {"shift": [op]})


def test_shift_from_params_mapping() -> None:
    cfg = fields.build(
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
    [
        (_corrupt_magic, "bad magic number"),
        (_truncate, "truncated"),
        (_count_mismatch, "80 images but 81 labels"),
        (_label_out_of_range, "train labels go up to 12 but none is 0"),
    ],
)
def test_bad_raw_data_leaves_no_output(tmp_path: Path, corrupt, match: str) -> None:
    raw = fetched(tmp_path / "raw", write_idx_dataset(tmp_path / "idx"), "idx")
    corrupt(raw / "source")
    out = tmp_path / "out" / "prepared"
    with pytest.raises(TlpipeError, match=match):
        _run(raw, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"target": {"classes": [5, 10]}}, r"prepare.target.classes: no class 10 in the dataset"),
        ({"target": {"classes": ["5", "cat"]}}, r"no class 'cat' in the dataset \(10 classes: 0=0"),
        ({"source": {"classes": [1, 1]}}, "source.classes lists a class twice"),
        ({"target": {"classes": [5, "5"]}}, "prepare.target.classes names a class twice"),
        (
            {"target": {"val_fraction": 0.95, "test_fraction": 0.04}},
            "target class '.' has no training image",
        ),
        ({"source_shift_fraction": 0.5}, "needs a prepare.shift"),
        ({"target": {"k": 0}}, "target.k = 0 is out of range: it must be >= 1"),
        ({"target": {"names": ["a"]}}, "target.names must match target.classes one to one"),
        ({"source": {"val_fraction": 1.0}}, r"source.val_fraction = 1.0 is out of range"),
    ],
)
def test_bad_scenario_leaves_no_output(tiny_raw: Path, tmp_path: Path, values, match) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(TlpipeError, match=match):
        _run(tiny_raw, out, **values)
    assert list(tmp_path.iterdir()) == []


def test_class_with_no_images(tmp_path: Path) -> None:
    raw = fetched(tmp_path / "raw", write_idx_dataset(tmp_path / "idx"), "idx")
    y = np.tile(np.arange(10), 8).astype(np.uint8)
    y[y == 3] = 2  # class 3 has no train images any more (only test ones)
    write_idx(raw / "source" / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(TlpipeError, match="train labels go up to 9 but none is 3"):
        _run(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_previous_output(tiny_raw: Path, tmp_path: Path) -> None:
    out = _run(tiny_raw, tmp_path / "prepared")
    before = (out / "manifest.json").read_text()
    with pytest.raises(TlpipeError):
        _run(tiny_raw, out, target={"classes": [5, 99]})
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


# ---------------------------------------------------------------------------- other formats


def test_prepare_imagefolder(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "pets", classes=("a", "b", "c", "d"), per_class=4)
    raw = fetched(tmp_path / "raw", folder, "imagefolder")
    out = _run(
        raw,
        tmp_path / "p",
        source={"classes": [0, 1]},
        target={"classes": ["c", "d"], "k": 2, "val_per_class": 1, "val_fraction": 0.6},
        channels=3,
        input_size=16,
        shift=[{"op": "rotate", "degrees": 15}],
    )
    m = load_manifest(out).to_dict()
    assert m["target_classes"] == ["c", "d"] and m["input_shape"] == [3, 16, 16]
    assert m["splits"]["target_test"]["count"] == 8 and len(m["mean"]) == 3


def test_prepare_npz_with_conversion(tmp_path: Path) -> None:
    data = tmp_path / "npz"
    data.mkdir()
    for name, n in (("train", 12), ("test", 3)):
        x, y = make_patterns(n, n_classes=4)
        np.savez(data / f"{name}.npz", x=x, y=y)
    raw = fetched(tmp_path / "raw", data, "npz")
    out = _run(
        raw,
        tmp_path / "p",
        source={"classes": [0, 1]},
        target={"classes": [2, 3], "k": 5, "val_fraction": 0.3},
        channels=3,
        input_size=32,
    )
    split = load_split(out, "target_train")
    assert split.x.shape == (10, 3, 32, 32)
    assert load_manifest(out).source_classes == ("0", "1")


# ---------------------------------------------------------------------------- real data


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="no Debian Fashion-MNIST")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    result = fetch.run(fetch.FetchConfig(), tmp_path / "raw")
    assert result.sources == {"source": str(FMNIST_DIR)} and len(result.files) == 6
    shift = [{"op": "rotate", "degrees": 30}]
    cfg = _cfg({"shift": shift, "source": {"max_per_class": None}})
    result = prepare.run(tmp_path / "raw", tmp_path / "prepared", cfg)
    m = json.loads(result.manifest.read_text())
    counts = {s: m["splits"][s]["count"] for s in SPLITS}
    assert counts["source"] + counts["source_val"] == 30000  # every train image of 0-4
    assert 1300 < counts["source_val"] < 1700  # 5 %, by hash
    assert counts["target_train"] == counts["target_val"] == 25  # k, val_per_class: auto = 5
    assert counts["target_test"] == 5000
    assert m["target_classes"] == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert 0.25 < m["mean"][0] < 0.35 and 0.3 < m["std"][0] < 0.4


def test_make_prepared_factory(make_prepared) -> None:
    out = make_prepared(shift=[], source_shift_fraction=0.0, target={"k": 3})
    assert load_manifest(out).splits["target_train"].count == 15
    assert not load_split(out, "target_test").shifted.any()


# ---------------------------------------------------------------------------- errors up front


def test_unnamed_data_with_a_stray_label_leaves_no_output(tmp_path: Path) -> None:
    """Not a known dataset, so no class list: label 200 would have made 191 classes silently."""
    raw = fetched(tmp_path / "raw", write_idx_dataset(tmp_path / "idx"), "idx")
    y = np.tile(np.arange(10), 8).astype(np.uint8)
    y[0] = 200
    write_idx(raw / "source" / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(TlpipeError, match="train labels go up to 200 but none is 10"):
        _run(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_class_folder_leaves_no_output(tmp_path: Path, capsys) -> None:
    folder = write_imagefolder(tmp_path / "pets", classes=("a", "b", "c", "d"), per_class=4)
    raw = fetched(tmp_path / "raw", folder, "imagefolder")
    target = {"classes": [2, 3], "k": 2, "val_per_class": 1, "val_fraction": 0.6}
    values = {"source": {"classes": [0, 1]}, "input_size": 16, "target": target}
    _run(raw, tmp_path / "p", **values)
    assert "read 32 images from" in capsys.readouterr().out  # off a terminal: one summary line
    (raw / "source" / "train" / "a0").mkdir()  # would sort between a and b: b, c, d change ids
    with pytest.raises(TlpipeError, match="train/a0 is an empty class folder"):
        _run(raw, tmp_path / "q", **values)
    assert not (tmp_path / "q").exists()
