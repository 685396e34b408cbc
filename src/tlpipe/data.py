"""The data layer: known datasets, the raw and prepared data types, prepared splits.

The raw readers are in `tlpipe.readers`. Prepared splits (written by `tlpipe.steps.prepare`)
are read back with `load_split` and `load_manifest`.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe import fsio
from tlpipe.errors import TlpipeError

SPLITS = ("source", "source_val", "target_train", "target_val", "target_test")


@dataclass(frozen=True)
class DatasetSpec:
    """What tlpipe knows about a public dataset: layout, class names, files, where to get them.

    Attributes:
        format: The raw layout, a key of `READERS`.
        classes: Class names, indexed by label.
        files: Raw file name → sha256 of its *uncompressed* content (see `FASHION_MNIST_SHA256`).
        sources: Places to fetch the files from, tried in order: local dirs, then base URLs.
    """

    format: str
    classes: tuple[str, ...]
    files: dict[str, str]
    sources: tuple[str, ...]


# sha256 of the uncompressed IDX bytes. The Debian package (dataset-fashion-mnist) re-gzipped the
# official files (no file name in the gzip header), so its .gz files differ byte-wise from the
# official downloads (their md5s differ from the published ones) while the content is identical.
# Hashing the content makes one checksum valid for both, and for un-gzipped copies too.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",  # noqa: E501
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # noqa: E501
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        format="idx",
        classes=FASHION_MNIST_CLASSES,
        files=FASHION_MNIST_SHA256,
        sources=(
            "/usr/share/datasets/fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
    ),
}


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from disk: official train/test sets, uint8 (N, C, H, W), int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """One prepared split: uint8 images (N, C, H, W), int64 labels, bool `shifted` flags."""

    x: np.ndarray
    y: np.ndarray
    shifted: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


# ---------------------------------------------------------------------------- prepared splits


def split_sha256(split: Split) -> str:
    """sha256 identifying a split's content (images, labels and shift flags)."""
    parts = (fsio.sha256_array(a) for a in (split.x, split.y, split.shifted))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def dataset_sha256(split_hashes: dict[str, str]) -> str:
    """sha256 over the split hashes (name order as given): the prepared data's version."""
    blob = "".join(f"{name}:{sha}\n" for name, sha in split_hashes.items())
    return hashlib.sha256(blob.encode()).hexdigest()


def save_split(path: Path, split: Split) -> Path:
    """Write a split as an uncompressed npz (atomically)."""
    return fsio.save_npz(path, x=split.x, y=split.y, shifted=split.shifted)


def load_split(prepared_dir: str | Path, name: str) -> Split:
    """Load prepared split `name` (one of `SPLITS`) from `prepared_dir`."""
    if name not in SPLITS:
        raise TlpipeError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    path = Path(prepared_dir) / f"{name}.npz"
    if not path.is_file():
        raise TlpipeError(f"{path} not found: run `tlpipe prepare` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            return Split(x=z["x"], y=z["y"], shifted=z["shifted"])
    except (OSError, ValueError, KeyError, zlib.error) as e:
        raise TlpipeError(f"{path} is damaged ({e}); run `tlpipe prepare` again") from e


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a prepared dir."""
    return fsio.read_json(Path(prepared_dir) / "manifest.json")
