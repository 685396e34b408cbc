"""Export scikit-learn's handwritten digits as an ImageFolder of PNGs: a real target dataset.

    python benchmarks/digits_imagefolder.py data/digits             # all 1 797 images
    python benchmarks/digits_imagefolder.py data/digits --first 1000   # the first 1 000 ...
    python benchmarks/digits_imagefolder.py data/digits                # ... then the rest arrive
    python benchmarks/digits_imagefolder.py data/digits-rgb --tint     # colour: RGB PNGs

`sklearn.datasets.load_digits` holds 1 797 real handwritten digits (UCI "optdigits", 43
writers), 8x8 pixels with values 0-16 (16 = most ink). Each is written once as
OUT/<digit>/<index>.png, an 8x8 greyscale PNG, where <index> is the image's position in
`load_digits` (4 digits, zero-padded): file names never depend on which images were written
before, so writing more images later adds files and changes none (the growth of a target
folder that tlpipe's splits survive; prepare resizes to `prepare.input_size`).

Pixel values: v in 0..16 becomes round(255 * v / 16), halves rounded up, i.e.
(255 * v + 8) // 16: 0 → 0, 1 → 16, 8 → 128, 15 → 239, 16 → 255. Exact and invertible (17
distinct levels), ink bright on black like MNIST and Fashion-MNIST.

There is no train/ and test/ folder: the digits have no official test split, so tlpipe splits
them by `prepare.target.test_fraction` on a content hash of each image, which keeps every
image in its split when the folder grows (a fixed test/ folder written here would be the same
split done twice, and one that cannot grow).

Atomic and idempotent: a new OUT is written in a temporary folder and renamed into place; into
an existing OUT only the missing files are written, each through a temporary file, and a file
already there with other bytes is an error (the folder is not this script's output).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.fsio import atomic_path

N_IMAGES = 1797  # len(load_digits().target)


def load() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 images (1797, 8, 8) on the 0-255 scale, and their labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = digits.images.astype(np.int64)  # exactly 0..16: float64 holding integers
    return ((255 * levels + 8) // 16).astype(np.uint8), digits.target.astype(np.int64)


def tints() -> np.ndarray:
    """One colour per digit image, (1797, 3) float32 in [0.4, 1): the channel factors of
    `--tint` (and of `benchmarks/inference.py --arch`), the same for every run."""
    return np.random.default_rng(0).uniform(0.4, 1.0, (N_IMAGES, 3)).astype(np.float32)


def tinted(images: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) with each one's ink in its colour: (N, H, W, 3) uint8."""
    return (images[..., None] * colours[:, None, None, :]).clip(0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG file of one uint8 image (PIL writes no timestamp: same pixels, same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def relative_path(index: int, label: int) -> Path:
    """Where image `index` of `load_digits` goes under OUT."""
    return Path(str(label)) / f"{index:04d}.png"


def write_digits(out: Path, indices: Iterable[int] | None = None, tint: bool = False) -> list[Path]:
    """Write digits `indices` (positions in `load_digits`; None = all) under `out`, grey or,
    with `tint`, in colour (see `tints`).

    Returns the files that were written (empty when all were there already).
    """
    images, labels = load()
    if tint:
        images = tinted(images, tints())
    wanted = sorted(set(range(N_IMAGES) if indices is None else (int(i) for i in indices)))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < N_IMAGES:
        raise TlpipeError(f"digit indices must be in 0..{N_IMAGES - 1}")
    files = {relative_path(i, labels[i]): png_bytes(images[i]) for i in wanted}
    out = Path(out)
    if not out.exists():  # all or nothing: a killed export leaves no half-written OUT
        with atomic_path(out) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        return [out / rel for rel in files]
    written = []
    for rel, data in files.items():
        path = out / rel
        if path.exists():
            if path.read_bytes() != data:
                raise TlpipeError(
                    f"{path} exists with other content: {out} is not this "
                    "script's output; write into a new folder"
                )
            continue
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="the ImageFolder to write (OUT/<digit>/<index>.png)")
    ap.add_argument(
        "--first",
        type=int,
        default=N_IMAGES,
        metavar="N",
        help=f"write only images 0..N-1 (default: all {N_IMAGES}); run again with a "
        "larger N, or none, to add the next ones",
    )
    ap.add_argument("--tint", action="store_true", help="RGB PNGs, each digit in a colour")
    args = ap.parse_args(argv)
    if not 0 < args.first <= N_IMAGES:
        ap.error(f"--first must be in 1..{N_IMAGES}")
    try:
        written = write_digits(args.out, range(args.first), tint=args.tint)
    except TlpipeError as e:
        print(f"digits_imagefolder: error: {e}", file=sys.stderr)
        return 1
    total = sum(1 for _ in args.out.glob("*/*.png"))
    print(f"{args.out}: wrote {len(written)} PNGs, {total} digits in the folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
