"""Raw readers (IDX, ImageFolder, npz, manifest): untrusted files in, a checked `RawDataset` out.

Raw data comes in one of four layouts (`READERS`):

- ``idx``: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…`` (MNIST
  style, gzipped or raw).
- ``imagefolder``: ``<class>/<image>``, or ``train/<class>/<image>`` and ``test/<class>/<image>``
  when the data has its own test set; the class of an image is its folder name, class ids follow
  the sorted folder names (of ``train/``).
- ``npz``: ``train.npz`` (and optionally ``test.npz``) with ``x`` (uint8 images) and ``y`` (int
  labels), and optionally ``classes`` (names).
- ``manifest``: ``manifest.csv`` or ``manifest.parquet`` with columns ``path`` (relative to the
  manifest), ``label`` (a class name) and optionally ``split`` (train or test), for data that is
  not laid out by class folders.

Every reader returns every labelled image as uint8 ``(N, C, H, W)``, a flag for the images of the
dataset's own test set, and a content key per image (a hash of its file, or of its pixels for
array formats) that the splits are drawn from. Raw data is untrusted: readers refuse symlinks
that lead out of the dataset folder, images over a pixel limit (checked from the header, before
decoding), labels outside the class list and unnamed labels with gaps (a stray label).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data import DATASETS, KEY_DTYPE, RawDataset
from tlpipe.errors import TlpipeError

# ---------------------------------------------------------------------------- IDX


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw), checking the magic number, dims and data length."""
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0:2] != b"\x00\x00":
        raise TlpipeError(
            f"{path}: bad magic number {data[:4].hex() or '(empty)'}, not an IDX file"
        )
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise TlpipeError(f"{path}: unsupported IDX data type 0x{dtype_code:02x} (want 0x08 uint8)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise TlpipeError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    want, got = int(np.prod(dims)), len(data) - header
    if got != want:
        what = "truncated" if got < want else "too long"
        raise TlpipeError(f"{path}: {what}: dims {dims} need {want} bytes of data, found {got}")
    return np.frombuffer(data, _IDX_DTYPES[dtype_code], offset=header).reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise TlpipeError(f"{path}: cannot read ({e}); the file is damaged, fetch it again") from e


def _idx_file(raw_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (raw_dir / name).is_file():
            return check_inside(raw_dir / name, raw_dir)
    raise TlpipeError(f"{raw_dir}: missing {stem}[.gz]; run `tlpipe fetch` first")


def _read_idx_pair(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _idx_file(raw_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(raw_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise TlpipeError(f"{images_path}: images must have 3 dims (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise TlpipeError(f"{labels_path}: labels must have 1 dim (N,), got {labels.shape}")
    _check_counts(images, labels, f"{images_path} / {labels_path}")
    return images[:, None], labels.astype(np.int64)


def content_key(data: bytes | memoryview) -> bytes:
    """The key an image is split by: 32 hex digits of a hash of its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


def _array_keys(x: np.ndarray) -> np.ndarray:
    return np.array([content_key(np.ascontiguousarray(row).data) for row in x], KEY_DTYPE)


def _array_dataset(
    parts: list[tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...] | None, where: Path
) -> RawDataset:
    """A `RawDataset` from in-memory (images, labels) parts: train, then the test set if any."""
    x = np.concatenate([images for images, _ in parts])
    y = np.concatenate([labels for _, labels in parts])
    test = np.zeros(len(y), bool)
    if len(parts) > 1:
        test[len(parts[0][1]) :] = True
    classes = classes or _unnamed_classes(y[~test], y[test], where)
    sizes = np.tile(np.array([x.shape[3], x.shape[2]], np.int32), (len(y), 1))
    return RawDataset(x, y, test, _array_keys(x), sizes, classes)


def read_idx_dir(raw_dir: Path, classes: tuple[str, ...] | None = None, **_: Any) -> RawDataset:
    """Read an MNIST-style IDX directory; `classes` names the labels (default "0", "1", …)."""
    parts = [_read_idx_pair(raw_dir, "train"), _read_idx_pair(raw_dir, "t10k")]
    return _array_dataset(parts, classes, raw_dir)


# ---------------------------------------------------------------------------- ImageFolder


def read_imagefolder(
    raw_dir: Path,
    channels: int | None = None,
    input_size: int | None = None,
    max_pixels: int | None = None,
    **_: Any,
) -> RawDataset:
    """Read ``<class>/*``, or ``train/<class>/*`` and ``test/<class>/*``: any PIL-readable image.

    Args:
        raw_dir: Holds the class folders, or ``train/`` and (optionally) ``test/``.
        channels: 1 (grey, PIL mode L) or 3 (RGB); default 3.
        input_size: Side of the square the images are resized to (required).
        max_pixels: Images with more pixels are refused before decoding (None = no limit).
    """
    train_dir = raw_dir / "train" if (raw_dir / "train").is_dir() else raw_dir
    classes = _class_dirs(train_dir)
    items = _list_images(raw_dir, train_dir, classes, required=True)
    n_train = len(items)
    if train_dir != raw_dir and (raw_dir / "test").is_dir():
        items += _list_images(raw_dir, raw_dir / "test", classes, required=False)
    test = np.arange(len(items)) >= n_train
    return _image_dataset(items, test, classes, channels, input_size, max_pixels, raw_dir)


def _image_dataset(
    items: list[tuple[str, int]], test: np.ndarray, classes: tuple[str, ...],
    channels: int | None, size: int | None, max_pixels: int | None, raw_dir: Path,
) -> RawDataset:  # fmt: skip
    if size is None:
        raise TlpipeError("set prepare.input_size for image files (images differ in size)")
    x, keys, sizes = _load_images([path for path, _ in items], channels or 3, size, max_pixels,
                                  raw_dir)  # fmt: skip
    y = np.asarray([label for _, label in items], np.int64)
    return RawDataset(x, y, test, keys, sizes, classes)


def _class_dirs(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise TlpipeError(f"{root} not found: an imagefolder dataset is a folder of class folders")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p)))
    if not names:
        raise TlpipeError(f"{root} has no class subfolders")
    return names


def _list_images(
    raw_dir: Path, root: Path, classes: tuple[str, ...], required: bool
) -> list[tuple[str, int]]:
    """(path, label) of every image under `root`, in class then file-name order.

    Class ids are positions in the sorted (train) folder names, so an empty train class folder
    is refused: DVC stores no empty folders, it would vanish from a restored data/raw and every
    class after it would change id.
    """
    unknown = sorted(set(_class_dirs(root)) - set(classes))
    if unknown:
        raise TlpipeError(f"{root}: class folder(s) {unknown} are not in the train classes "
                          f"({list(classes)})")  # fmt: skip
    items = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if _visible(p)) if folder.is_dir() else []
        if not files and required:
            raise TlpipeError(
                f"{folder} is an empty class folder: DVC drops empty folders, which would shift "
                "the ids of the classes after it; add its images or delete the folder"
            )
        # a str per file, not a Path: 100 000 Paths hold ~100 MB, their strings ~10 MB
        items += [(str(check_inside(path, raw_dir)), label) for path in files]
    return items


def _load_images(
    paths: list[str], channels: int, size: int, max_pixels: int | None, raw_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode `paths` into one uint8 array on disk (memory-mapped), written chunk by chunk.

    Returns the images, their content keys (a hash of each file) and their stored sizes
    (width, height). The decoded images go to a temporary .npy file under ``$TMPDIR`` whose
    name is removed as soon as it is mapped (the mapping keeps the data until the array is
    freed, and a killed prepare leaves nothing behind), so reading a folder larger than RAM
    keeps memory flat. A progress bar on a terminal, else one summary line.
    """
    from tqdm import tqdm

    from tlpipe.data import ArrayWriter, open_array

    tty = sys.stderr.isatty()
    start = time.perf_counter()
    keys = np.empty(len(paths), KEY_DTYPE)
    sizes = np.empty((len(paths), 2), np.int32)
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-decoded-"))
    try:
        path = tmp / "x.npy"
        rows = max(1, (16 << 20) // (channels * size * size))  # a 16 MB buffer of images
        buf = np.empty((rows, channels, size, size), np.uint8)
        with ArrayWriter(path, (len(paths), channels, size, size), np.uint8) as out:
            bar = tqdm(paths, desc=f"reading {raw_dir}", unit=" images", disable=not tty)
            for i, image in enumerate(bar):
                buf[i % rows], keys[i], sizes[i] = _decode(image, channels, size, max_pixels)
                if i % rows == rows - 1 or i == len(paths) - 1:
                    out.write(buf[: i % rows + 1])
        x = open_array(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not tty and paths:  # CI, pod logs, DVC stages: one line instead of a bar
        seconds = max(time.perf_counter() - start, 1e-9)
        print(f"read {len(paths)} images from {raw_dir} in {seconds:.1f} s "
              f"({len(paths) / seconds:.0f} images/s)", file=sys.stderr, flush=True)  # fmt: skip
    return x, keys, sizes


def _decode(
    path: str, channels: int, size: int, max_pixels: int | None
) -> tuple[np.ndarray, bytes, tuple[int, int]]:
    """One image file → (pixels, content key, stored (width, height)); the file is read once."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlpipeError(f"{path}: cannot read ({e})") from e
    pixels, stored = load_image(io.BytesIO(data), channels, size, max_pixels, name=path)
    return pixels, content_key(data), stored


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def check_inside(path: Path, root: Path) -> Path:
    """Return `path`, or refuse it when a symlink leads it out of `root` (e.g. to a secret).

    Data outside the dataset folder is not data: copied into data/raw it would land in the DVC
    cache and remote, and read by prepare it would end up in training arrays.
    """
    top = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path), top]) != top:
        raise TlpipeError(
            f"{path} is a symlink that leads out of {root}: tlpipe reads no files outside the "
            "dataset folder; copy the file into it or remove the link"
        )
    return path


def load_image(
    path: Path | io.BytesIO, channels: int, size: int, max_pixels: int | None = None,
    name: Path | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:  # fmt: skip
    """Load one image as uint8 (C, size, size), converted to L (1 channel) or RGB (3).

    Returns the pixels and the image's stored (width, height). The pixel count is read from the
    header and checked against `max_pixels` before anything is decoded: a small file can
    declare a huge image (a decompression bomb). `name` names an in-memory file in errors.
    """
    from PIL import Image

    name = name or path
    if channels not in (1, 3):
        raise TlpipeError(f"channels must be 1 or 3, got {channels}")
    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            stored = img.size
            _check_pixels(name, img.size, max_pixels)
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, np.uint8)
    except Image.DecompressionBombError as e:
        raise TlpipeError(f"{name}: refused, too many pixels to decode safely ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise TlpipeError(f"{name}: not a readable image ({e}); remove or replace it") from e
    return (arr[None] if channels == 1 else arr.transpose(2, 0, 1)), stored


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise TlpipeError(
            f"{path}: {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is over "
            f"prepare.max_image_pixels = {max_pixels:,} (a decompression bomb, or a photo to "
            "shrink): downscale or remove it, or raise the limit"
        )


# ---------------------------------------------------------------------------- manifest

MANIFEST_NAMES = ("manifest.csv", "manifest.parquet")


def read_manifest(
    raw_dir: Path,
    channels: int | None = None,
    input_size: int | None = None,
    max_pixels: int | None = None,
    **_: Any,
) -> RawDataset:
    """Read ``manifest.csv`` / ``manifest.parquet``: one row per image, ``path,label[,split]``.

    Paths are relative to the manifest and must stay inside its folder; labels are class names
    (class ids follow their sorted order, numerically when every label is an integer); ``split``
    is ``train`` or ``test`` (empty = train).
    """
    rows = read_manifest_rows(manifest_file(raw_dir))
    names = {label for _, label, _ in rows}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = tuple(sorted(names, key=(lambda n: int(n)) if numeric else None))
    ids = {name: i for i, name in enumerate(classes)}
    items, test = [], []
    for rel, label, split in rows:
        path = raw_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
            raise TlpipeError(f"{raw_dir}: manifest path {rel!r} is not a file inside {raw_dir}")
        items.append((str(check_inside(path, raw_dir)), ids[label]))
        test.append(split == "test")
    test_mask = np.array(test, bool)
    if not (~test_mask).any():
        raise TlpipeError(f"{raw_dir}: the manifest has no train rows")
    return _image_dataset(items, test_mask, classes, channels, input_size, max_pixels, raw_dir)


def manifest_file(root: Path) -> Path:
    """The manifest file of a manifest-format dataset folder."""
    found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(found) != 1:
        what = "none" if not found else "both"
        raise TlpipeError(f"{root}: want one of {', '.join(MANIFEST_NAMES)}, found {what}")
    return check_inside(found[0], root)


def read_manifest_rows(path: Path) -> list[tuple[str, str, str]]:
    """(path, label, split) rows of a CSV or Parquet manifest, checked."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path).to_pylist()
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                table = list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise TlpipeError(f"{path}: not a readable manifest ({e})") from e
    except Exception as e:  # pyarrow's errors (ArrowInvalid, …) are not OSError / ValueError
        raise TlpipeError(f"{path}: not a readable Parquet manifest ({e})") from e
    rows = []
    for n, row in enumerate(table, start=2):
        missing = {"path", "label"} - {k for k, v in row.items() if v not in (None, "")}
        if missing:
            raise TlpipeError(f"{path}: row {n} has no {' or '.join(sorted(missing))} "
                              "(want columns path,label[,split])")  # fmt: skip
        split = str(row.get("split") or "train").strip().lower()
        if split not in ("train", "test"):
            raise TlpipeError(f"{path}: row {n}: split {split!r} is not train or test")
        rows.append((str(row["path"]), str(row["label"]).strip(), split))
    if not rows:
        raise TlpipeError(f"{path}: the manifest lists no images")
    return rows


# ---------------------------------------------------------------------------- npz


def read_npz_dir(raw_dir: Path, **_: Any) -> RawDataset:
    """Read ``train.npz`` and optionally ``test.npz`` (keys ``x``, ``y``, optional ``classes``)."""
    train_x, train_y, classes = _read_npz(raw_dir / "train.npz", raw_dir)
    parts = [(train_x, train_y)]
    if (raw_dir / "test.npz").exists():
        test_x, test_y, _unused = _read_npz(raw_dir / "test.npz", raw_dir)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise TlpipeError(f"{raw_dir}: test.npz images are {test_x.shape[1:]}, train.npz "
                              f"{train_x.shape[1:]}")  # fmt: skip
        parts.append((test_x, test_y))
    return _array_dataset(parts, classes, raw_dir)


def _read_npz(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    if not path.is_file():
        raise TlpipeError(f"{path} not found: an npz dataset needs train.npz (and test.npz)")
    check_inside(path, root)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error) as e:
        raise TlpipeError(f"{path}: not a readable .npz file ({e})") from e
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise TlpipeError(f"{path}: missing key(s) {sorted(missing)} (want x, y, optional classes)")
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8:
        raise TlpipeError(f"{path}: x must be uint8, got {x.dtype}; save x.astype(np.uint8)")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TlpipeError(f"{path}: y must be 1-d integers, got {y.dtype} {y.shape}")
    _check_counts(x, y, str(path))
    classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else None
    return _channels_first(x, path), y.astype(np.int64), classes


def _channels_first(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise TlpipeError(f"{path}: x must be (N, H, W), (N, C, H, W) or (N, H, W, C); got {x.shape}")


# ---------------------------------------------------------------------------- shared


READERS: dict[str, Callable[..., RawDataset]] = {
    "idx": read_idx_dir,
    "imagefolder": read_imagefolder,
    "npz": read_npz_dir,
    "manifest": read_manifest,
}


def read_raw(
    raw_dir: Path,
    fmt: str,
    dataset: str = "",
    channels: int | None = None,
    size: int | None = None,
    max_pixels: int | None = None,
) -> RawDataset:
    """Read raw data in layout `fmt` (a key of `READERS`); known datasets name their classes.

    `max_pixels` limits the size of an encoded image (imagefolder, manifest), checked before
    decoding.
    """
    if fmt not in READERS:
        raise TlpipeError(f"unknown data format {fmt!r}; known: {', '.join(READERS)}")
    if not Path(raw_dir).is_dir():
        raise TlpipeError(f"{raw_dir} not found: run `tlpipe fetch` first")
    spec = DATASETS.get(dataset)
    classes = spec.classes if spec and spec.format == fmt else None
    raw = READERS[fmt](
        Path(raw_dir), classes=classes, channels=channels, input_size=size, max_pixels=max_pixels
    )
    return _checked(raw, Path(raw_dir))


def _check_counts(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if len(images) != len(labels):
        raise TlpipeError(f"{where}: {len(images)} images but {len(labels)} labels")


def _unnamed_classes(train_y: np.ndarray, test_y: np.ndarray, where: Path) -> tuple[str, ...]:
    """Names "0", "1", … for labels that come without names: they must run 0..n-1 in train.

    Without names there is no class list to check a label against, so a stray label (say 255 in
    a 10-class file) would silently make 246 empty classes; a gap or a test-only label is refused.
    """
    n = int(train_y.max(initial=-1)) + 1
    gaps = np.setdiff1d(np.arange(n), train_y)
    if gaps.size:
        raise TlpipeError(
            f"{where}: train labels go up to {n - 1} but none is {int(gaps[0])} ({gaps.size} "
            "missing): unnamed labels must run 0..n-1 without gaps; fix the stray labels"
        )
    extra = np.setdiff1d(test_y, np.arange(n))
    if extra.size:
        raise TlpipeError(
            f"{where}: test label {int(extra[0])} is not a train label (0..{n - 1}): every test "
            "class must have train images; fix the labels"
        )
    return tuple(str(i) for i in range(n))


def _checked(raw: RawDataset, where: Path) -> RawDataset:
    n = len(raw.classes)
    bad = raw.y[(raw.y < 0) | (raw.y >= n)]
    if bad.size:
        raise TlpipeError(f"{where}: label {int(bad[0])} out of range: the dataset has {n} classes")
    return raw
