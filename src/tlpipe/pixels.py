"""One opened image → the model's uint8 pixels: the conversion prepare and the edge share.

Training (`tlpipe.data.image_files`) and the edge runtime (`tlpipe.edge`) must turn a file into
the same pixels, or the edge sees images unlike the ones the model learned on; this module is
that one conversion (numpy and PIL only, so the torch-free edge can import it). In order:

1. the EXIF orientation is applied: a phone photo stored sideways with an Orientation tag is
   turned upright, as every viewer shows it;
2. samples of more than 8 bits are scaled to 8 (16-bit PNG or TIFF: value / 257; 32-bit float
   in [0, 1]: value × 255), where PIL's own conversion would clip everything above 255 to
   white; an integer image outside 0–65535 or a float image outside [0, 1] has no agreed
   scale and is refused (ValueError, which callers report as an unreadable image, by name);
3. grey (PIL mode L) or RGB, then a bilinear resize to the model's size.

A JPEG that is not decoded yet (a file just opened) and at least twice the output size is
decoded by libjpeg at 1/2, 1/4 or 1/8 of its size first (`Image.draft`): a 12-megapixel photo
then costs a fraction of a full decode (benchmarks/decode.py), and the pixels differ from a
full decode by about one level in 255 on average (more along sharp edges). An image object a
caller still holds (the edge's Python API) is not drafted, as drafting shrinks the object: it
is resized from full size, so it can differ from its file by that much.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ORIENTATION = 0x0112  # the EXIF tag
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # > 8 bits: scaled, not clipped


def to_chw(img: Any, channels: int, width: int, height: int, draft: bool = True) -> np.ndarray:
    """PIL image → uint8 (C, H, W), C = 1 (L) or 3 (RGB); see the module docstring.

    `draft=False` for an image the caller still holds: drafting shrinks the image object itself.
    """
    from PIL import Image, ImageOps

    orientation = img.getexif().get(_ORIENTATION, 1)
    if draft:  # a JPEG not yet decoded is decoded at 1/2, 1/4 or 1/8 scale by libjpeg when it
        # stays at least the output size (a no-op for other formats and for decoded images)
        img.draft(None, (height, width) if orientation in (5, 6, 7, 8) else (width, height))
    if orientation != 1:  # else no copy: most files have no rotation
        img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY:
        img = Image.fromarray(_eight_bit(np.asarray(img), img.mode), "L")
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _eight_bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey samples of a 16-bit integer or 32-bit float image → uint8 on a fixed scale."""
    if mode == "F":
        top, scale = 1.0, 255.0
    else:
        top, scale = 65535, 1 / 257
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if lo < 0 or hi > top:
        kind = "float" if mode == "F" else "integer"
        raise ValueError(
            f"a {kind} image (PIL mode {mode}) with values {lo} … {hi}, outside 0 … {top}: "
            "no scale to 8 bits is implied; convert it to an 8- or 16-bit PNG"
        )
    return np.rint(a.astype(np.float64) * scale).astype(np.uint8)
