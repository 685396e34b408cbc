"""Decoding photos: tlpipe's image conversion vs a plain full decode, per JPEG, same files.

    python benchmarks/decode.py [--work /tmp/tlpipe-decode] [--repeats 7]
    python benchmarks/decode.py --quick        # one small photo, for a test

`tlpipe prepare` and `tlpipe-edge predict` turn each image file into the model's pixels with
`tlpipe.pixels.to_chw`, which lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale
(`Image.draft`) before the bilinear resize. The reference, timed in the same run on the same
bytes, is what tlpipe did before and what `torchvision.datasets.ImageFolder`'s default loader
does: decode at full size, convert to RGB, resize (PIL, bilinear). The photos are synthetic
(smooth colour fields with sensor-like noise, JPEG quality 90, 4:2:0), at 0.3, 3 and 12
megapixels, written once under --work; each output size is timed `--repeats` times per
method, interleaved, and the median is kept (one thread: decoding is single-threaded).

Prints a Markdown table (ms per image, speed-up, mean and largest pixel difference in 0–255)
and ends with `JPEG decode speed-up, 12 MP photo to 224 px: X.XX× the full decode`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tlpipe.pixels import to_chw

PHOTOS = {"0.3 MP": (640, 480), "3 MP": (2000, 1500), "12 MP": (4000, 3000)}
SIZES = (64, 224)


def photo(work: Path, name: str, size: tuple[int, int]) -> bytes:
    """A deterministic photo-like JPEG of `size` (cached in `work`)."""
    path = work / f"photo-{size[0]}x{size[1]}.jpg"
    if not path.exists():
        w, h = size
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        channels = [
            128 + 90 * np.sin(x / (w / 23) + c) * np.cos(y / (h / 17) - c) for c in range(3)
        ]
        img = np.stack(channels, -1) + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        work.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return path.read_bytes()


def reference(data: bytes, size: int) -> np.ndarray:
    """Full decode, RGB, bilinear resize: tlpipe before, torchvision's default loader."""
    with Image.open(io.BytesIO(data)) as img:
        out = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(out, np.uint8).transpose(2, 0, 1)


def tlpipe(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return to_chw(img, 3, size, size)


def ms(fn, data: bytes, size: int) -> float:
    start = time.perf_counter()
    fn(data, size)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlpipe-decode"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one small photo, 2 repeats")
    args = ap.parse_args(argv)
    photos = {"0.3 MP": PHOTOS["0.3 MP"]} if args.quick else PHOTOS
    repeats = 2 if args.quick else args.repeats

    print("| photo | output px | full decode ms | tlpipe ms | speed-up | mean diff | max diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    last = 0.0
    for name, dims in photos.items():
        data = photo(args.work, name, dims)
        for size in SIZES:
            ref, ours = [], []
            for _ in range(repeats):  # interleaved: load drifts hit both
                ref.append(ms(reference, data, size))
                ours.append(ms(tlpipe, data, size))
            r, t = statistics.median(ref), statistics.median(ours)
            diff = np.abs(reference(data, size).astype(int) - tlpipe(data, size).astype(int))
            print(
                f"| {name} | {size} | {r:.1f} | {t:.1f} | {r / t:.2f}× | "
                f"{diff.mean():.2f} | {diff.max()} |"
            )
            last = r / t
    label = "12 MP photo to 224 px" if not args.quick else "0.3 MP photo to 224 px (--quick)"
    print(f"JPEG decode speed-up, {label}: {last:.2f}× the full decode")


if __name__ == "__main__":
    sys.exit(main())
