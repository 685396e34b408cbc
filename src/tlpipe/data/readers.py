"""Raw readers (IDX, ImageFolder, npz, manifest): untrusted files in, a checked `RawDataset` out.

Raw data comes in one of four layouts (`READERS`):

- ``idx``: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-…`` (MNIST
  style, gzipped or raw).
- ``npz``: ``train.npz`` (and optionally ``test.npz``) with ``x`` (uint8 images) and ``y`` (int
  labels), and optionally ``classes`` (names).
- ``imagefolder`` and ``manifest``: image files, read by `tlpipe.data.image_files`.

Every reader returns every labelled image as uint8 ``(N, C, H, W)``, a flag for the images of the
dataset's own test set, and a content key per image (a hash of its file, or of its pixels for
array formats) that the splits are drawn from. Raw data is untrusted: readers refuse symlinks
that lead out of the dataset folder, images over a pixel limit (checked from the header, before
decoding), labels outside the class list and unnamed labels with gaps (a stray label).

The raw folder that `fetch` writes holds one folder per side (``source``, ``target``) and its
description (``source.json``, ``target.json``: dataset and format); `write_side` and
`read_sides` are the two ends of that layout.
"""

from __future__ import annotations

import contextlib
import gzip
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tlpipe import fsio
from tlpipe.data.image_files import check_inside, content_key, read_imagefolder, read_manifest
from tlpipe.data.prepared import DATASETS, KEY_DTYPE, RawDataset
from tlpipe.errors import TlpipeError

SIDES = ("source", "target")

# ---------------------------------------------------------------------------- the raw folder


def write_side(raw_dir: Path, side: str, desc: dict[str, Any]) -> None:
    """Describe side `side` of a raw folder: {"dataset", "format"}, {"dataset": None} (no
    source dataset) or {"same_as": "source"} (the target is the source's dataset)."""
    fsio.write_json(Path(raw_dir) / f"{side}.json", desc)


def read_sides(raw_dir: Path) -> dict[str, Any]:
    """What fetch wrote: {"source": description or None, "target": …, "one_dataset": bool}."""
    found = {}
    for side in SIDES:
        path = Path(raw_dir) / f"{side}.json"
        if not path.is_file():
            raise TlpipeError(
                f"{path} not found: {raw_dir} is not fetch's output; run `tlpipe fetch` first"
            )
        found[side] = fsio.read_json(path)
    one = found["target"].get("same_as") == "source"
    if one:
        found["target"] = found["source"]
    source = found["source"] if found["source"].get("dataset") else None
    return {"source": source, "target": found["target"], "one_dataset": one}


# ---------------------------------------------------------------------------- IDX


_IDX_DTYPES = {0x08: np.uint8}
# A gzipped IDX (or an npz member) may inflate to at most this many times its compressed size
# (its header's dims say so before a byte is inflated). MNIST-style data gzips 2-5x; a bomb 1000x.
MAX_UNPACK_RATIO = 200
_SLACK = 1 << 20  # a tiny file may always declare this much


def read_idx(path: Path, max_ratio: float = MAX_UNPACK_RATIO) -> np.ndarray:
    """Read an IDX file (gzipped or raw), checking the magic number, dims and data length.

    The file is streamed: its header is read first, and the data it declares must fit the file
    (raw) or `max_ratio` times the file (gzipped) before anything is allocated; the data may
    not inflate past what the header declares (a gzip bomb stops at the first extra byte).
    """
    try:
        with _open_maybe_gzip(path) as (f, gzipped):
            dims, dtype = parse_idx_header(f.read(4), f.read, path)
            want = int(np.prod(dims, dtype=object))
            size = path.stat().st_size
            if not gzipped and want > size - 4 - 4 * len(dims):
                raise _wrong_length(path, dims, want, size - 4 - 4 * len(dims))
            if gzipped and want > max_ratio * size + _SLACK:
                raise TlpipeError(
                    f"{path}: its header declares dims {dims} = {want:,} bytes, more than "
                    f"prepare.max_unpack_ratio = {max_ratio:g} x its {size:,} gzipped bytes "
                    "(a decompression bomb?); raise the ratio if the file is genuine"
                )
            data = np.empty(want, dtype)
            got = f.readinto(memoryview(data).cast("B"))
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as e:
        raise TlpipeError(f"{path}: cannot read ({e}); the file is damaged, fetch it again") from e
    if got != want or extra:
        raise _wrong_length(path, dims, want, got + extra)
    return data.reshape(dims)


def _wrong_length(path: Path, dims: tuple[int, ...], want: int, got: int) -> TlpipeError:
    what, found = ("truncated", f"{got}") if got < want else ("too long", "more")
    return TlpipeError(f"{path}: {what}: dims {dims} need {want} bytes of data, found {found}")


def parse_idx_header(
    head: bytes, read: Callable[[int], bytes], path: Path | str
) -> tuple[tuple[int, ...], type]:
    """(dims, dtype) from an IDX header: `head` is its first 4 bytes, `read` gives the rest."""
    if len(head) < 4 or head[0:2] != b"\x00\x00":
        raise TlpipeError(
            f"{path}: bad magic number {head[:4].hex() or '(empty)'}, not an IDX file"
        )
    dtype_code, ndim = head[2], head[3]
    if dtype_code not in _IDX_DTYPES:
        raise TlpipeError(f"{path}: unsupported IDX data type 0x{dtype_code:02x} (want 0x08 uint8)")
    raw_dims = read(4 * ndim) if ndim else b""
    if ndim == 0 or len(raw_dims) < 4 * ndim:
        raise TlpipeError(f"{path}: truncated IDX header ({4 + len(raw_dims)} bytes, {ndim} dims)")
    return tuple(int(d) for d in np.frombuffer(raw_dims, ">u4", ndim)), _IDX_DTYPES[dtype_code]


@contextlib.contextmanager
def _open_maybe_gzip(path: Path) -> Iterator[tuple[BinaryIO, bool]]:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if not gzipped:
            yield raw, False
            return
        with gzip.GzipFile(fileobj=raw) as f:
            yield f, True  # type: ignore[misc]


def _idx_file(raw_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (raw_dir / name).is_file():
            return check_inside(raw_dir / name, raw_dir)
    raise TlpipeError(f"{raw_dir}: missing {stem}[.gz]; run `tlpipe fetch` first")


def _read_idx_pair(raw_dir: Path, prefix: str, max_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    images_path = _idx_file(raw_dir, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(raw_dir, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, max_ratio), read_idx(labels_path, max_ratio)
    if images.ndim != 3:
        raise TlpipeError(f"{images_path}: images must have 3 dims (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise TlpipeError(f"{labels_path}: labels must have 1 dim (N,), got {labels.shape}")
    _check_counts(images, labels, f"{images_path} / {labels_path}")
    return images[:, None], labels.astype(np.int64)


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


def read_idx_dir(
    raw_dir: Path,
    classes: tuple[str, ...] | None = None,
    max_ratio: float = MAX_UNPACK_RATIO,
    **_: Any,
) -> RawDataset:
    """Read an MNIST-style IDX directory; `classes` names the labels (default "0", "1", …)."""
    parts = [_read_idx_pair(raw_dir, p, max_ratio) for p in ("train", "t10k")]
    return _array_dataset(parts, classes, raw_dir)


# ---------------------------------------------------------------------------- npz


def read_npz_dir(raw_dir: Path, max_ratio: float = MAX_UNPACK_RATIO, **_: Any) -> RawDataset:
    """Read ``train.npz`` and optionally ``test.npz`` (keys ``x``, ``y``, optional ``classes``)."""
    train_x, train_y, classes = _read_npz(raw_dir / "train.npz", raw_dir, max_ratio)
    parts = [(train_x, train_y)]
    if (raw_dir / "test.npz").exists():
        test_x, test_y, _unused = _read_npz(raw_dir / "test.npz", raw_dir, max_ratio)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise TlpipeError(
                f"{raw_dir}: test.npz images are {test_x.shape[1:]}, train.npz {train_x.shape[1:]}"
            )
        parts.append((test_x, test_y))
    return _array_dataset(parts, classes, raw_dir)


def _read_npz(
    path: Path, root: Path, max_ratio: float
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    if not path.is_file():
        raise TlpipeError(f"{path} not found: an npz dataset needs train.npz (and test.npz)")
    check_inside(path, root)
    try:
        _check_npz_sizes(path, max_ratio)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error, zipfile.BadZipFile) as e:
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


def _check_npz_sizes(path: Path, max_ratio: float) -> None:
    """Refuse an npz member whose header declares more than `max_ratio` x its compressed size.

    np.load allocates what a member's .npy header declares, then inflates into it: a few MB of
    zeros can declare (and fill) gigabytes. The headers are read first, from the zip stream.
    """
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
                shape, _fortran, dtype = read_header(f)
            want = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if want > max_ratio * info.compress_size + _SLACK:
                raise TlpipeError(
                    f"{path}: member {info.filename} declares {shape} {dtype} = {want:,} bytes, "
                    f"more than prepare.max_unpack_ratio = {max_ratio:g} x its "
                    f"{info.compress_size:,} compressed bytes (a decompression bomb?)"
                )


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
    max_image_bytes: int | None = None,
    max_ratio: float = MAX_UNPACK_RATIO,
) -> RawDataset:
    """Read raw data in layout `fmt` (a key of `READERS`); known datasets name their classes.

    `max_pixels` limits the size of an encoded image (imagefolder, manifest), checked before
    decoding, `max_image_bytes` its file size, checked before reading; `max_ratio` how far a
    compressed array (gzipped IDX, npz member) may inflate.
    """
    if fmt not in READERS:
        raise TlpipeError(f"unknown data format {fmt!r}; known: {', '.join(READERS)}")
    if not Path(raw_dir).is_dir():
        raise TlpipeError(f"{raw_dir} not found: run `tlpipe fetch` first")
    spec = DATASETS.get(dataset)
    classes = spec.classes if spec and spec.format == fmt else None
    raw = READERS[fmt](
        Path(raw_dir),
        classes=classes,
        channels=channels,
        input_size=size,
        max_pixels=max_pixels,
        max_image_bytes=max_image_bytes,
        max_ratio=max_ratio,
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
