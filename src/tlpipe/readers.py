"""Raw readers (IDX, ImageFolder, npz): untrusted files in, a checked `RawDataset` out.

Raw data comes in one of three layouts (`READERS`):

- ``idx``: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…`` (MNIST
  style, gzipped or raw).
- ``imagefolder``: ``train/<class>/<image>`` and ``test/<class>/<image>``; the class of an image is
  its folder name, class ids follow the sorted folder names of ``train/``.
- ``npz``: ``train.npz`` and ``test.npz`` with ``x`` (uint8 images) and ``y`` (int labels), and
  optionally ``classes`` (names).

Every reader returns uint8 ``(N, C, H, W)`` images. Raw data is untrusted: readers refuse
symlinks that lead out of the dataset folder, images over a pixel limit (checked from the
header, before decoding), and unnamed labels with gaps (a stray label).
"""

from __future__ import annotations

import gzip
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

from tlpipe.data import DATASETS, RawDataset
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


def read_idx_dir(raw_dir: Path, classes: tuple[str, ...] | None = None, **_: Any) -> RawDataset:
    """Read an MNIST-style IDX directory; `classes` names the labels (default "0", "1", …)."""
    train_x, train_y = _read_idx_pair(raw_dir, "train")
    test_x, test_y = _read_idx_pair(raw_dir, "t10k")
    classes = classes or _unnamed_classes(train_y, test_y, raw_dir)
    return RawDataset(train_x, train_y, test_x, test_y, classes)


# ---------------------------------------------------------------------------- ImageFolder


def read_imagefolder(
    raw_dir: Path,
    channels: int | None = None,
    input_size: int | None = None,
    max_pixels: int | None = None,
    **_: Any,
) -> RawDataset:
    """Read ``train/<class>/*`` and ``test/<class>/*``: any PIL-readable image, any size.

    Args:
        raw_dir: Holds ``train/`` and ``test/``.
        channels: 1 (grey, PIL mode L) or 3 (RGB); default 3.
        input_size: Side of the square the images are resized to (required).
        max_pixels: Images with more pixels are refused before decoding (None = no limit).
    """
    if input_size is None:
        raise TlpipeError("set prepare.input_size for imagefolder data (images differ in size)")
    channels = channels or 3
    classes = _class_dirs(raw_dir / "train")
    train = _list_images(raw_dir, "train", classes)
    test = _list_images(raw_dir, "test", classes)
    x = _load_images([path for path, _ in train + test], channels, input_size, max_pixels, raw_dir)
    y = np.asarray([label for _, label in train + test], np.int64)
    n = len(train)
    return RawDataset(x[:n], y[:n], x[n:], y[n:], classes)


def _class_dirs(root: Path) -> tuple[str, ...]:
    if not root.is_dir():
        raise TlpipeError(f"{root} not found: an imagefolder dataset needs train/ and test/")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p)))
    if not names:
        raise TlpipeError(f"{root} has no class subfolders")
    return names


def _list_images(raw_dir: Path, split: str, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(path, label) of every image under ``raw_dir/split``, in class then file-name order.

    Class ids are positions in the sorted ``train/`` folder names, so an empty train class folder
    is refused: DVC stores no empty folders, it would vanish from a restored data/raw and every
    class after it would change id.
    """
    root = raw_dir / split
    unknown = sorted(set(_class_dirs(root)) - set(classes))
    if unknown:
        raise TlpipeError(f"{root}: class folder(s) {unknown} are not in train/ ({list(classes)})")
    items = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if _visible(p)) if folder.is_dir() else []
        if not files and split == "train":
            raise TlpipeError(
                f"{folder} is an empty class folder: DVC drops empty folders, which would shift "
                "the ids of the classes after it; add its images or delete the folder"
            )
        items += [(check_inside(path, raw_dir), label) for path in files]
    return items


def _load_images(
    paths: list[Path], channels: int, size: int, max_pixels: int | None, raw_dir: Path
) -> np.ndarray:
    """Decode `paths` into one uint8 array on disk (memory-mapped), written chunk by chunk.

    The decoded images go to a temporary .npy file under ``$TMPDIR`` whose name is removed as
    soon as it is mapped (the mapping keeps the data until the array is freed, and a killed
    prepare leaves nothing behind), so reading a folder larger than RAM keeps memory flat. A
    progress bar on a terminal, else one summary line.
    """
    from tqdm import tqdm

    from tlpipe.data import ArrayWriter, open_array

    tty = sys.stderr.isatty()
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-decoded-"))
    try:
        path = tmp / "x.npy"
        rows = max(1, (16 << 20) // (channels * size * size))  # a 16 MB buffer of images
        buf = np.empty((rows, channels, size, size), np.uint8)
        with ArrayWriter(path, (len(paths), channels, size, size), np.uint8) as out:
            bar = tqdm(paths, desc=f"reading {raw_dir}", unit=" images", disable=not tty)
            for i, image in enumerate(bar):
                buf[i % rows] = load_image(image, channels, size, max_pixels)
                if i % rows == rows - 1 or i == len(paths) - 1:
                    out.write(buf[: i % rows + 1])
        x = open_array(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not tty and paths:  # CI, pod logs, DVC stages: one line instead of a bar
        seconds = max(time.perf_counter() - start, 1e-9)
        print(f"read {len(paths)} images from {raw_dir} in {seconds:.1f} s "
              f"({len(paths) / seconds:.0f} images/s)", file=sys.stderr, flush=True)  # fmt: skip
    return x


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


def load_image(path: Path, channels: int, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Load one image as uint8 (C, size, size), converted to L (1 channel) or RGB (3).

    The pixel count is read from the header and checked against `max_pixels` before anything is
    decoded: a small file can declare a huge image (a decompression bomb).
    """
    from PIL import Image

    if channels not in (1, 3):
        raise TlpipeError(f"channels must be 1 or 3, got {channels}")
    try:
        with warnings.catch_warnings():  # PIL warns above 89 MP; the limit below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_pixels(path, img.size, max_pixels)
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, np.uint8)
    except Image.DecompressionBombError as e:
        raise TlpipeError(f"{path}: refused, too many pixels to decode safely ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise TlpipeError(f"{path}: not a readable image ({e}); remove or replace it") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise TlpipeError(
            f"{path}: {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is over "
            f"prepare.max_image_pixels = {max_pixels:,} (a decompression bomb, or a photo to "
            "shrink): downscale or remove it, or raise the limit"
        )


# ---------------------------------------------------------------------------- npz


def read_npz_dir(raw_dir: Path, **_: Any) -> RawDataset:
    """Read ``train.npz`` and ``test.npz`` (keys ``x``, ``y``, optional ``classes``)."""
    train_x, train_y, classes = _read_npz(raw_dir / "train.npz", raw_dir)
    test_x, test_y, _unused = _read_npz(raw_dir / "test.npz", raw_dir)
    classes = classes or _unnamed_classes(train_y, test_y, raw_dir)
    return RawDataset(train_x, train_y, test_x, test_y, classes)


def _read_npz(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    if not path.is_file():
        raise TlpipeError(f"{path} not found: an npz dataset needs train.npz and test.npz")
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

    `max_pixels` limits the size of an encoded image (imagefolder), checked before decoding.
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
    for name, y in (("train", raw.train_y), ("test", raw.test_y)):
        bad = y[(y < 0) | (y >= n)]
        if bad.size:
            raise TlpipeError(
                f"{where}: {name} label {int(bad[0])} out of range: the dataset has {n} classes"
            )
    return raw
