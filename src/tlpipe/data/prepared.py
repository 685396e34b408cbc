"""The data layer: known datasets, the raw and prepared data types, prepared splits.

The raw readers are in `tlpipe.data.readers`. Prepared splits (written by `tlpipe.steps.prepare`
with `save_split`) are read back with `load_split` (images memory-mapped); their record,
manifest.json, is `tlpipe.data.manifest.Manifest`.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


KEY_DTYPE = np.dtype(
    "S32"
)  # an image's content key: 32 hex digits (`tlpipe.data.image_files.content_key`)


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from disk: every labelled image, and which are its own test set.

    Attributes:
        x: uint8 images (N, C, H, W), possibly memory-mapped.
        y: int64 labels, positions in `classes`.
        test: True for the images of the dataset's own test set (all False: it has none).
        keys: Content keys (`KEY_DTYPE`): the same bytes give the same key; splits follow them.
        sizes: Each image's stored (width, height) before resizing.
        classes: Class names.
    """

    x: np.ndarray
    y: np.ndarray
    test: np.ndarray
    keys: np.ndarray
    sizes: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Split:
    """One prepared split: uint8 images (N, C, H, W), int64 labels, bool `shifted` flags, and
    the images' content keys (`KEY_DTYPE`; None where not known)."""

    x: np.ndarray
    y: np.ndarray
    shifted: np.ndarray
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def keys(self, name: str) -> list[str]:
        """The images' content keys as text (`name:position` where the split has none): what
        pairs one model's per-image evidence with another's."""
        if self.ids is None:
            return [f"{name}:{i}" for i in range(len(self))]
        return [str(k) for k in self.ids]


@dataclass(frozen=True)
class Labelled:
    """The target's labelled images in memory, target_train then target_val (never test):
    what cross-validation folds, LogME scores and a refit model trains on.

    Attributes:
        keys: Each image's key (`Split.keys`), which pairs per-image evidence across models.
    """

    x: np.ndarray
    y: np.ndarray
    keys: list[str]

    @classmethod
    def of(cls, train: Split, val: Split) -> Labelled:
        return cls(
            x=np.concatenate([train.x, val.x]),  # (reads memory-mapped images into memory)
            y=np.concatenate([train.y, val.y]),
            keys=[*train.keys("target_train"), *val.keys("target_val")],
        )


# ---------------------------------------------------------------------------- prepared splits
#
# A split is three uncompressed .npy files, ``<name>.x.npy`` (uint8 images), ``<name>.y.npy`` and
# ``<name>.shifted.npy``, plus ``<name>.id.npy`` (the images' content keys; prepare writes it).
# `load_split` memory-maps the images, so a split larger than RAM opens instantly; readers that
# walk a whole split use `read_rows` / `take_rows`, which read through the file (pread) instead
# of touching the mapping: the pages land in the OS page cache (a cache the kernel can drop)
# rather than in the process's resident set, which stays flat.

ARRAYS = ("x", "y", "shifted")
CHUNK_BYTES = 8 << 20  # rows per read/write chunk when walking a whole split


def split_paths(prepared_dir: str | Path, name: str) -> dict[str, Path]:
    """The files of split `name`: {"x": …/name.x.npy, "y": …, "shifted": …}."""
    return {a: Path(prepared_dir) / f"{name}.{a}.npy" for a in ARRAYS}


def split_sha256(split: Split) -> str:
    """sha256 identifying a split's content (images, labels and shift flags)."""
    parts = (_sha256_array(a) for a in (split.x, split.y, split.shifted))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def _sha256_array(a: np.ndarray) -> str:
    """`fsio.sha256_array`, read chunk by chunk (no whole-split copy)."""
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    for start, stop in chunks(a):
        h.update(read_rows(a, start, stop).tobytes())
    return h.hexdigest()


def dataset_sha256(split_hashes: dict[str, str]) -> str:
    """sha256 over the split hashes (name order as given): the prepared data's version."""
    blob = "".join(f"{name}:{sha}\n" for name, sha in split_hashes.items())
    return hashlib.sha256(blob.encode()).hexdigest()


class ArrayWriter:
    """Write a .npy file of known shape row chunk by row chunk (plain writes, no mapping).

    Use as a context manager; `write` appends rows; closing checks that every row was written.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed in __exit__)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)  # one chunk: a bounded copy at most
        if rows.shape[1:] != self.shape[1:]:
            raise TlpipeError(f"{self.path}: rows of shape {rows.shape[1:]}, want {self.shape[1:]}")
        self._f.write(rows.data)
        self.rows += len(rows)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._f.close()
        if exc_type is None and self.rows != self.shape[0]:
            raise TlpipeError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")


def save_split(prepared_dir: str | Path, name: str, split: Split) -> dict[str, Path]:
    """Write `split` as `name`.{x,y,shifted}.npy in `prepared_dir`, the images chunk by chunk.

    `split.x` may be memory-mapped (or any array): it is read `CHUNK_BYTES` at a time. The
    caller writes into a temporary directory and renames it (prepare does), so no partial split
    is ever visible.
    """
    paths = split_paths(prepared_dir, name)
    with ArrayWriter(paths["x"], split.x.shape, np.uint8) as w:
        for start, stop in chunks(split.x):
            w.write(read_rows(split.x, start, stop))
    save_labels(prepared_dir, name, split.y, split.shifted, split.ids)
    return paths


def save_labels(
    prepared_dir: str | Path,
    name: str,
    y: np.ndarray,
    shifted: np.ndarray,
    ids: np.ndarray | None,
) -> None:
    """Write split `name`'s labels, shift flags and (when known) content keys."""
    paths = split_paths(prepared_dir, name)
    np.save(paths["y"], np.asarray(y, np.int64))
    np.save(paths["shifted"], np.asarray(shifted, bool))
    if ids is not None:
        np.save(ids_path(prepared_dir, name), np.asarray(ids, KEY_DTYPE))


def ids_path(prepared_dir: str | Path, name: str) -> Path:
    """The file of split `name`'s content keys."""
    return Path(prepared_dir) / f"{name}.id.npy"


def load_split(prepared_dir: str | Path, name: str) -> Split:
    """Open prepared split `name` (one of `SPLITS`): images memory-mapped, labels in memory."""
    if name not in SPLITS:
        raise TlpipeError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    paths = split_paths(prepared_dir, name)
    for path in paths.values():
        if not path.is_file():
            raise TlpipeError(f"{path} not found: run `tlpipe prepare` first")
    try:
        x = open_array(paths["x"])
        y = np.load(paths["y"], allow_pickle=False)
        shifted = np.load(paths["shifted"], allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TlpipeError(f"{paths['x']} is damaged ({e}); run `tlpipe prepare` again") from e
    if x.dtype != np.uint8 or x.ndim != 4 or not len(x) == len(y) == len(shifted):
        raise TlpipeError(
            f"{prepared_dir}: split {name} is inconsistent ({x.dtype} {x.shape}, "
            f"{len(y)} labels); run `tlpipe prepare` again"
        )
    ids = ids_path(prepared_dir, name)
    return Split(
        x=x,
        y=y.astype(np.int64, copy=False),
        shifted=shifted.astype(bool, copy=False),
        ids=np.load(ids, allow_pickle=False) if ids.is_file() else None,
    )


# ---------------------------------------------------------------------------- reading rows


def chunks(x: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about `chunk_bytes` each, covering `x`."""
    row = max(1, x[:1].nbytes) if len(x) else 1
    step = max(1, chunk_bytes // row)
    for start in range(0, len(x), step):
        yield start, min(start + step, len(x))


def read_rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows `start:stop` of `x` as an in-memory array (one pread when `x` is file-backed)."""
    where = file_view(x)
    if where is None:
        return np.asarray(x[start:stop])
    fd, offset = where
    start, stop, _ = slice(start, stop).indices(len(x))
    out = np.empty((max(0, stop - start), *x.shape[1:]), x.dtype)
    row = out[:1].nbytes if len(out) else 0
    _pread_into(fd, offset + start * row, memoryview(out).cast("B"))
    return out


def take_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`x[idx]` for a 1-d index array, read row by row through the file when file-backed."""
    where = file_view(x)
    if where is None:
        return np.asarray(x[idx])
    fd, offset = where
    out = np.empty((len(idx), *x.shape[1:]), x.dtype)
    if len(out) == 0:
        return out
    row, n = out[:1].nbytes, len(x)
    for k, i in enumerate(np.asarray(idx, np.int64).tolist()):
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows")
        got = os.preadv(fd, [memoryview(out[k]).cast("B")], offset + (i % n) * row)
        if got != row:
            raise TlpipeError(
                "short read from a prepared split (file truncated?); run `tlpipe prepare` again"
            )
    return out


def open_array(path: str | Path) -> np.ndarray:
    """Memory-map the .npy file `path` read-only, and keep a descriptor of the same file.

    `read_rows` / `take_rows` read the rows of the returned array (and of its row slices)
    through that descriptor, so a file replaced at the same path later is never mixed in.
    """
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    if isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap):
        fd = os.open(path, os.O_RDONLY)
        _FDS[id(x)] = fd
        weakref.finalize(x, _close, id(x), fd)
    return x


def file_view(x: np.ndarray) -> tuple[int, int] | None:
    """(descriptor, byte offset of row 0) when `x` is a C-contiguous view of `open_array`'s."""
    if not isinstance(x, np.memmap) or not x.flags.c_contiguous or x.ndim == 0:
        return None
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    fd = _FDS.get(id(root))
    if fd is None or not isinstance(root, np.memmap):
        return None
    return fd, root.offset + (x.ctypes.data - root.ctypes.data)


_FDS: dict[int, int] = {}  # id(root memmap) → its descriptor (workers inherit it: pread is safe)


def _close(key: int, fd: int) -> None:
    if _FDS.get(key) == fd:
        del _FDS[key]
    os.close(fd)


def _pread_into(fd: int, offset: int, buffer: memoryview) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got <= 0:
            raise TlpipeError(
                "short read from a prepared split (file truncated?); run `tlpipe prepare` again"
            )
        done += got


def stratified_folds(y: np.ndarray, folds: int, seed: int | np.random.Generator) -> np.ndarray:
    """Fold index per image: each class's images shuffled (seeded) and dealt round-robin, so
    every fold holds each class in proportion. The same labels give the same folds, whichever
    strategy asks: the comparisons between strategies are paired, image by image. `seed` may
    be a Generator, whose stream the shuffles then draw from."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        fold[rng.permutation(rows)] = (offset + np.arange(len(rows))) % folds
        offset += len(rows)  # the next class starts where this one ended: balanced fold sizes
    return fold
