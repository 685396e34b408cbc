"""Image files (ImageFolder, manifest): untrusted files in, decoded on disk, keyed by content.

- ``imagefolder``: ``<class>/<image>``, or ``train/<class>/<image>`` and ``test/<class>/<image>``
  when the data has its own test set; the class of an image is its folder name, class ids follow
  the sorted folder names (of ``train/``).
- ``manifest``: ``manifest.csv`` or ``manifest.parquet`` with columns ``path`` (relative to the
  manifest), ``label`` (a class name) and optionally ``split`` (train or test), for data that is
  not laid out by class folders.

Any PIL-readable image of any size and mode is decoded once, to `channels` and `input_size`,
into an on-disk array; its content key is a hash of the file's bytes. Refused: symlinks that
lead out of the dataset folder (`check_inside`), image files over a size limit (before they are
read) or a pixel limit (from the header, before decoding), paths in a manifest that leave its
folder, and a manifest that lists one path twice (refused, not merged: which label is right
is the user's call).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data.prepared import KEY_DTYPE, RawDataset
from tlpipe.errors import TlpipeError
from tlpipe.pixels import to_chw


def content_key(data: bytes | memoryview) -> bytes:
    """The key an image is split by: 32 hex digits of a hash of its bytes (as `_decode`)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


# ---------------------------------------------------------------------------- ImageFolder


def read_imagefolder(
    raw_dir: Path,
    channels: int | None = None,
    input_size: int | None = None,
    max_pixels: int | None = None,
    max_image_bytes: int | None = None,
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
    return _image_dataset(
        items, test, classes, channels, input_size, max_pixels, max_image_bytes, raw_dir
    )


def _image_dataset(
    items: list[tuple[str, int]],
    test: np.ndarray,
    classes: tuple[str, ...],
    channels: int | None,
    size: int | None,
    max_pixels: int | None,
    max_bytes: int | None,
    raw_dir: Path,
) -> RawDataset:
    if size is None:
        raise TlpipeError("set prepare.input_size for image files (images differ in size)")
    x, keys, sizes = _load_images(
        [path for path, _ in items], channels or 3, size, max_pixels, max_bytes, raw_dir
    )
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
        raise TlpipeError(
            f"{root}: class folder(s) {unknown} are not in the train classes ({list(classes)})"
        )
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
    paths: list[str],
    channels: int,
    size: int,
    max_pixels: int | None,
    max_bytes: int | None,
    raw_dir: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode `paths` into one uint8 array on disk (memory-mapped), written chunk by chunk.

    Returns the images, their content keys (a hash of each file) and their stored sizes
    (width, height). The decoded images go to a temporary .npy file under ``$TMPDIR`` whose
    name is removed as soon as it is mapped (the mapping keeps the data until the array is
    freed, and a killed prepare leaves nothing behind), so reading a folder larger than RAM
    keeps memory flat. A progress bar on a terminal, else one summary line on stdout (stderr
    is for errors: a refused file is its one line there). Files are decoded on
    `decode_threads()` threads, a buffer's worth at a time, and stored in their order.
    """
    from tqdm import tqdm

    from tlpipe.data.prepared import ArrayWriter, open_array

    tty = sys.stderr.isatty()
    start = time.perf_counter()
    keys = np.empty(len(paths), KEY_DTYPE)
    sizes = np.empty((len(paths), 2), np.int32)
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-decoded-"))
    try:
        path = tmp / "x.npy"
        rows = max(1, (16 << 20) // (channels * size * size))  # a 16 MB buffer of images
        buf = np.empty((rows, channels, size, size), np.uint8)
        bar = tqdm(total=len(paths), desc=f"reading {raw_dir}", unit=" images", disable=not tty)
        pool = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
        try:
            with ArrayWriter(path, (len(paths), channels, size, size), np.uint8) as out:
                for first in range(0, len(paths), rows):  # a buffer's worth at a time
                    chunk = paths[first : first + rows]
                    decoded = pool.map(
                        lambda p: _decode(p, channels, size, max_pixels, max_bytes), chunk
                    )
                    for j, (pixels, key, stored) in enumerate(decoded):  # in order
                        buf[j], keys[first + j], sizes[first + j] = pixels, key, stored
                        bar.update()
                    out.write(buf[: len(chunk)])
        finally:  # a refused file or Ctrl-C: the queued files are dropped, not decoded
            pool.shutdown(cancel_futures=True)
            bar.close()
        x = open_array(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not tty and paths:  # CI, pod logs, DVC stages: one line instead of a bar
        seconds = max(time.perf_counter() - start, 1e-9)
        print(
            f"read {len(paths)} images from {raw_dir} in {seconds:.1f} s "
            f"({len(paths) / seconds:.0f} images/s)",
            flush=True,
        )
    return x, keys, sizes


def decode_threads() -> int:
    """Threads that decode image files: PIL's decoders and resize and hashlib release the GIL,
    so threads scale over the cores this process may use (at most 8) without pickling pixels."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def _decode(
    path: str, channels: int, size: int, max_pixels: int | None, max_bytes: int | None
) -> tuple[np.ndarray, bytes, tuple[int, int]]:
    """One image file → (pixels, content key, stored (width, height)).

    The file's size is checked before a byte is read; it is hashed in blocks and decoded from
    the open file, so a huge file never sits in memory whole.
    """
    try:
        with open(path, "rb") as f:
            n_bytes = os.fstat(f.fileno()).st_size
            if max_bytes is not None and n_bytes > max_bytes:
                raise TlpipeError(
                    f"{path}: {n_bytes:,} bytes is over prepare.max_image_bytes = {max_bytes:,} "
                    "(not an image, or one to shrink): remove it or raise the limit"
                )
            h = hashlib.blake2b(digest_size=16)
            while block := f.read(1 << 20):
                h.update(block)
            f.seek(0)
            pixels, stored = load_image(f, channels, size, max_pixels, name=path)
    except OSError as e:
        raise TlpipeError(f"{path}: cannot read ({e})") from e
    return pixels, h.hexdigest().encode(), stored


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
    path: Path | io.BytesIO,
    channels: int,
    size: int,
    max_pixels: int | None = None,
    name: Path | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Load one image as uint8 (C, size, size), converted to L (1 channel) or RGB (3) by
    `tlpipe.pixels.to_chw` (upright by its EXIF orientation, 16-bit scaled to 8), as the edge does.

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
            arr = to_chw(img, channels, size, size)
    except Image.DecompressionBombError as e:
        raise TlpipeError(f"{name}: refused, too many pixels to decode safely ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        why = _FILE_OBJECT.sub("", " ".join(str(e).split())) or type(e).__name__
        raise TlpipeError(f"{name}: not a readable image ({why}); remove or replace it") from e
    return arr, stored


_FILE_OBJECT = re.compile(r" ?<_io\.\w+ [^>]*>")  # PIL names the file object in its errors


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
    max_image_bytes: int | None = None,
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
    return _image_dataset(
        items, test_mask, classes, channels, input_size, max_pixels, max_image_bytes, raw_dir
    )


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
    rows, seen = [], {}
    for n, row in enumerate(table, start=2):
        missing = {"path", "label"} - {k for k, v in row.items() if v not in (None, "")}
        if missing:
            raise TlpipeError(
                f"{path}: row {n} has no {' or '.join(sorted(missing))} "
                "(want columns path,label[,split])"
            )
        split = str(row.get("split") or "train").strip().lower()
        if split not in ("train", "test"):
            raise TlpipeError(f"{path}: row {n}: split {split!r} is not train or test")
        rel = str(row["path"])
        if (first := seen.setdefault(os.path.normpath(rel), n)) != n:
            raise TlpipeError(
                f"{path}: row {n} lists {rel!r} again (first in row {first}): an image listed "
                "twice would count twice, or under two labels; remove the duplicate row"
            )
        rows.append((rel, str(row["label"]).strip(), split))
    if not rows:
        raise TlpipeError(f"{path}: the manifest lists no images")
    return rows
