"""Shared fixtures: tiny real raw datasets (IDX, ImageFolder) and a tiny prepared scenario.

`tiny_prepared` is what most step tests want: a prepared dir (the real `prepare` step run on a
synthetic 10-class IDX dataset of 28x28 images), built once per session.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tlpipe.params import DataSpec, ShiftOp, TargetSplit, fields
from tlpipe.steps import fetch, prepare

pytest_plugins = ["mlflow_server"]  # the real `mlflow server` fixture (tests/mlflow_server.py)

N_CLASSES = 10
TINY_TRAIN_PER_CLASS = 30
TINY_TEST_PER_CLASS = 10


def make_patterns(
    n_per_class: int, seed: int = 0, size: int = 28, n_classes: int = N_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 images (N, size, size): class c is a bright square at its own place.

    The squares sit on a 2 x 5 grid (jittered by a pixel) over a dim noisy background, so a
    small CNN tells the classes apart after a few steps. Labels are interleaved 0, 1, 2, ….
    """
    rng = np.random.default_rng(seed)
    n = n_per_class * n_classes
    y = np.tile(np.arange(n_classes), n_per_class).astype(np.uint8)
    x = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
    side = max(2, size * 6 // 28)
    for i, c in enumerate(y.tolist()):
        top = (c // 5) * size // 2 + size // 7 + rng.integers(-1, 2)
        left = (c % 5) * size * 5 // 28 + rng.integers(0, 2)
        x[i, top : top + side, left : left + side] = rng.integers(180, 256)
    return x, y


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzipped when `gz`)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_idx_dataset(
    root: Path, train_per_class: int = 8, test_per_class: int = 4, gz: bool = True, seed: int = 0
) -> Path:
    """Write an MNIST-style IDX dataset (train-…, t10k-…) of `make_patterns` images."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, per_class, s in (
        ("train", train_per_class, seed),
        ("t10k", test_per_class, seed + 1),
    ):
        x, y = make_patterns(per_class, seed=s)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz)
    return root


def write_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 3) -> Path:
    """Write ``train/`` and ``test/`` class folders of PNG and JPEG images of mixed sizes/modes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = 20 + 7 * i, 30 + 5 * ci  # every image a different size
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[..., ci % 3] = 255  # a class colour
                img = Image.fromarray(arr) if i % 2 == 0 else Image.fromarray(arr).convert("L")
                ext = "png" if i % 3 != 2 else "jpg"
                img.save(folder / f"img{i}.{ext}")
    return root


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A tiny gzipped IDX dataset: 10 classes, 8 train and 4 test images each."""
    return write_idx_dataset(tmp_path / "raw_idx")


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    """A tiny ImageFolder dataset: 3 classes, 3 PNG/JPEG images of mixed sizes each."""
    return write_imagefolder(tmp_path / "raw_folder")


def fetched(
    raw_out: Path, target: Path, fmt: str, source: Path | None | str = "same", source_fmt="idx"
) -> Path:
    """Run the real fetch on local data: `target` (and `source`, in `source_fmt`; "same" = one
    dataset split by class, None = no source dataset) → `raw_out`, the layout prepare reads."""
    tgt = {"dataset": "mine", "format": fmt, "sources": [str(target)]}
    src = tgt if source == "same" else None
    if isinstance(source, Path):
        src = {"dataset": "theirs", "format": source_fmt, "sources": [str(source)]}
    cfg = fields.build(fetch.FetchConfig, {"source": src, "target": tgt})
    fetch.run(cfg, raw_out)
    return raw_out


def mine(sources, sha256: str | None = None, fmt: str = "npz", **kw) -> fetch.FetchConfig:
    """fetch's config for one dataset of your own (the target; no source dataset)."""
    spec = DataSpec("mine", fmt, tuple(sources), sha256)
    return fetch.FetchConfig(source=None, target=spec, **kw)


def fmnist(sources=(), sha256: str | None = None, **kw) -> fetch.FetchConfig:
    """fetch's config for Fashion-MNIST from `sources`, split by class (the benchmark)."""
    spec = DataSpec(sources=tuple(sources), sha256=sha256)
    return fetch.FetchConfig(source=spec, target=spec, **kw)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny IDX dataset, fetched: 10 classes, 30 train and 10 test 28x28 images
    each, source and target the same dataset (split by class)."""
    root = tmp_path_factory.mktemp("tiny_raw")
    idx = write_idx_dataset(root / "idx", TINY_TRAIN_PER_CLASS, TINY_TEST_PER_CLASS)
    return fetched(root / "raw", idx, "idx")


@pytest.fixture(scope="session")
def tiny_prepared(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dir from the real prepare step on `tiny_raw` (do not modify it).

    Source classes 0-4 (about 140 source + 10 source_val images), target classes 5-9 with k=5
    and val_per_class=5 (25 + 25 images) and 50 test images; the target is inverted and about
    25% of the source images are too (`shifted` marks them).
    """
    cfg = _tiny_config()
    out = tmp_path_factory.mktemp("tiny_prepared") / "prepared"
    prepare.run(tiny_raw, out, cfg)
    return out


@pytest.fixture
def make_prepared(tiny_raw: Path, tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_prepared(**overrides)`` runs prepare on `tiny_raw` with config overrides."""

    def _make(**overrides) -> Path:
        base = fields.to_dict(_tiny_config())
        values = {**base, **overrides}
        for side in ("source", "target"):  # a partial side fills in the tiny config's
            values[side] = {**base[side], **overrides.get(side, {})}
        cfg = fields.build(prepare.PrepareConfig, values)
        out = tmp_path / f"prepared_{len(list(tmp_path.glob('prepared_*')))}"
        prepare.run(tiny_raw, out, cfg)
        return out

    return _make


def _tiny_config() -> prepare.PrepareConfig:
    return prepare.PrepareConfig(
        target=TargetSplit(classes=(5, 6, 7, 8, 9), k=5, val_per_class=5, val_fraction=0.5),
        shift=(ShiftOp("invert"),),
        source_shift_fraction=0.25,
        seed=0,
    )


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header for `width` x `height` grey pixels, and one row of data:
    Image.open reads the size, decoding would fail. A 553 KB bomb looks the same to the check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
