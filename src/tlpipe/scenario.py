"""Scenario building: target-domain shifts and the source / target splits.

A scenario takes a labelled dataset and splits its classes into a *source* task (lots of labels)
and a *target* task (k labels per class), optionally making the target a different domain with a
`shift` (a list of `ShiftOp`, applied in order). A fraction of the source images can get the same
shift (`source_shift_fraction`): a "mixed source" whose target-like part is known, ground truth for
sample matching (the `shifted` flags).

Every random choice draws from its own generator seeded with ``(seed, purpose)``, so changing one
setting (say `k`) does not reshuffle unrelated splits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from tlpipe.data import RawDataset, Split
from tlpipe.errors import TlpipeError
from tlpipe.params import PrepareConfig, ShiftOp

ShiftFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
_CHUNK = 4096


# ---------------------------------------------------------------------------- shifts


def _invert(x: np.ndarray, _value: float, _rng: np.random.Generator) -> np.ndarray:
    return 255.0 - x


def _rotate(x: np.ndarray, degrees: float, _rng: np.random.Generator) -> np.ndarray:
    """Rotate every image counter-clockwise by `degrees` about its centre (bilinear, black fill)."""
    n, c, h, w = x.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = u - (w - 1) / 2, v - (h - 1) / 2
    # Inverse map: the output pixel (u, v) samples the input at R(-theta)·(u, v) (y points down).
    src_c = u * cos - v * sin + (w - 1) / 2
    src_r = u * sin + v * cos + (h - 1) / 2
    r0, c0 = np.floor(src_r), np.floor(src_c)
    fr, fc = src_r - r0, src_c - c0
    flat = x.reshape(n * c, h * w)
    out = np.zeros_like(flat)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                           (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):  # fmt: skip
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        idx = (np.clip(rr, 0, h - 1) * w + np.clip(cc, 0, w - 1)).astype(np.intp).ravel()
        wgt = np.where(inside, weight, 0.0).astype(np.float32).ravel()
        out += flat[:, idx] * wgt
    return out.reshape(x.shape)


def _gaussian_blur(x: np.ndarray, sigma: float, _rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian blur with standard deviation `sigma` pixels (edge padding)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()

    def band(n: int) -> np.ndarray:  # (n, n): row i averages pixels i-radius..i+radius
        m = np.zeros((n, n))
        for t, k in zip(taps, kernel, strict=True):
            np.add.at(m, (np.arange(n), np.clip(np.arange(n) + t, 0, n - 1)), k)
        return m.astype(np.float32)

    return _separable(x, band(x.shape[2]), band(x.shape[3]))


def _noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian noise; `std` is on the 0–1 intensity scale (0.1 ≈ 25 grey levels)."""
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std * 255.0)


# op name → function(images, the op's parameter, rng); parameter names: params.SHIFT_PARAMS
SHIFTS: dict[str, ShiftFn] = {
    "invert": _invert,
    "rotate": _rotate,
    "gaussian_blur": _gaussian_blur,
    "noise": _noise,
}


def apply_shift(x: np.ndarray, ops: tuple[ShiftOp, ...], rng: np.random.Generator) -> np.ndarray:
    """Apply `ops` in order to uint8 images (N, C, H, W); returns new uint8 images."""

    def shift(chunk: np.ndarray) -> np.ndarray:
        for op in ops:
            chunk = np.clip(SHIFTS[op.op](chunk, op.value, rng), 0.0, 255.0)
        return chunk

    return _map_chunks(x, shift)


def conform_images(x: np.ndarray, channels: int | None, size: int | None) -> np.ndarray:
    """Convert uint8 (N, C, H, W) to `channels` (1 ↔ 3) and resize to `size` (None = keep).

    Resizing is bilinear with PIL's antialiasing when shrinking (to within one grey level).
    """
    channels = channels or x.shape[1]
    if x.shape[1] not in (1, 3) or channels not in (1, 3):
        raise TlpipeError(f"cannot convert {x.shape[1]} channels to {channels}")
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        x = _map_chunks(x, lambda c: np.einsum("k,nkhw->nhw", luma, c)[:, None])
    if size is not None and x.shape[2:] != (size, size):
        rows, cols = _resize_matrix(x.shape[2], size), _resize_matrix(x.shape[3], size)
        x = _map_chunks(x, lambda c: _separable(c, rows, cols))
    return np.repeat(x, 3, axis=1) if channels == 3 and x.shape[1] == 1 else x


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear resampling weights; a triangle filter widened when shrinking."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in) + 0.5 - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply linear maps along H (rows: H' x H) and W (cols: W' x W) to float (N, C, H, W)."""
    return rows @ x @ cols.T


def _map_chunks(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 → float32 chunks → `fn` → rounded uint8; chunks bound the temporaries' memory."""
    done = (fn(x[i : i + _CHUNK].astype(np.float32)) for i in range(0, max(len(x), 1), _CHUNK))
    return np.concatenate([np.rint(np.clip(c, 0, 255)).astype(np.uint8) for c in done])


# ---------------------------------------------------------------------------- splits


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose.encode()])


def validate(cfg: PrepareConfig, classes: tuple[str, ...]) -> None:
    """Check the scenario settings against the dataset's classes."""
    for name in ("source_classes", "target_classes"):
        ids = getattr(cfg, name)
        if not ids:
            raise TlpipeError(f"prepare.{name} is empty: list at least one class id")
        if len(set(ids)) != len(ids):
            raise TlpipeError(f"prepare.{name} lists a class twice: {list(ids)}")
        for cid in ids:
            if not 0 <= cid < len(classes):
                raise TlpipeError(
                    f"prepare.{name}: class id {cid} is not in the dataset "
                    f"({len(classes)} classes: 0={classes[0]} … {len(classes) - 1}={classes[-1]})"
                )
    if cfg.source_shift_fraction > 0 and not cfg.shift:
        raise TlpipeError("prepare.source_shift_fraction > 0 needs a prepare.shift to apply")


def _class_indices(y: np.ndarray, cid: int, classes: tuple[str, ...], where: str) -> np.ndarray:
    idx = np.flatnonzero(y == cid)
    if idx.size == 0:
        raise TlpipeError(f"class {cid} ({classes[cid]}) has no images in the {where} set")
    return idx


def _pick_target(raw: RawDataset, cfg: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per target class: k train + val_per_class val indices from the official train set."""
    rng = _rng(cfg.seed, "target")
    train, val = [], []
    need = cfg.k + cfg.val_per_class
    for cid in cfg.target_classes:
        idx = rng.permutation(_class_indices(raw.train_y, cid, raw.classes, "train"))
        if idx.size < need:
            raise TlpipeError(
                f"class {cid} ({raw.classes[cid]}) has {idx.size} train images, fewer than "
                f"k + val_per_class = {cfg.k} + {cfg.val_per_class}; lower k or val_per_class"
            )
        train.append(idx[: cfg.k])
        val.append(idx[cfg.k : need])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _pick_source(
    raw: RawDataset, cfg: PrepareConfig, taken: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per source class: shuffle, cap, hold out source_val_fraction; skips target-taken images."""
    rng = _rng(cfg.seed, "source")
    train, val = [], []
    for cid in cfg.source_classes:
        idx = _class_indices(raw.train_y, cid, raw.classes, "train")
        idx = rng.permutation(np.setdiff1d(idx, taken))
        if idx.size == 0:
            raise TlpipeError(f"class {cid} ({raw.classes[cid]}): no train images left for source")
        idx = idx[: cfg.max_source_per_class]
        n_val = round(idx.size * cfg.source_val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _pick_test(raw: RawDataset, cfg: PrepareConfig) -> np.ndarray:
    """The official test set restricted to the target classes (optionally capped per class)."""
    rng = _rng(cfg.seed, "test")
    picked = []
    for cid in cfg.target_classes:
        idx = _class_indices(raw.test_y, cid, raw.classes, "test")
        if cfg.max_test_per_class is not None and idx.size > cfg.max_test_per_class:
            idx = rng.choice(idx, cfg.max_test_per_class, replace=False)
        picked.append(idx)
    return np.sort(np.concatenate(picked))


def _make_split(
    x: np.ndarray, y: np.ndarray, ids: tuple[int, ...], cfg: PrepareConfig, shift_fraction: float,
    purpose: str,
) -> Split:  # fmt: skip
    """Relabel to domain indices, conform size/channels, shift a `shift_fraction` of the images."""
    x = conform_images(x, cfg.channels, cfg.input_size)
    position = np.zeros(max(ids) + 1, np.int64)
    position[list(ids)] = np.arange(len(ids))
    y = position[y]  # dataset class id → index within this domain's class list
    rng = _rng(cfg.seed, purpose)
    shifted = np.zeros(len(y), bool)
    if cfg.shift and shift_fraction > 0:
        n_shift = round(len(y) * shift_fraction)
        shifted[rng.choice(len(y), n_shift, replace=False)] = True
        x = x.copy()
        x[shifted] = apply_shift(x[shifted], cfg.shift, rng)
    return Split(x=x, y=y, shifted=shifted)


def build_splits(raw: RawDataset, cfg: PrepareConfig) -> dict[str, Split]:
    """Build the five prepared splits (see `tlpipe.data.SPLITS`) from a raw dataset."""
    validate(cfg, raw.classes)
    target_train, target_val = _pick_target(raw, cfg)
    taken = np.concatenate([target_train, target_val])
    source, source_val = _pick_source(raw, cfg, taken)
    test = _pick_test(raw, cfg)
    src, tgt, frac = cfg.source_classes, cfg.target_classes, cfg.source_shift_fraction
    parts = {
        "source": (raw.train_x, raw.train_y, source, src, frac),
        "source_val": (raw.train_x, raw.train_y, source_val, src, frac),
        "target_train": (raw.train_x, raw.train_y, target_train, tgt, 1.0),
        "target_val": (raw.train_x, raw.train_y, target_val, tgt, 1.0),
        "target_test": (raw.test_x, raw.test_y, test, tgt, 1.0),
    }
    return {
        name: _make_split(x[idx], y[idx], ids, cfg, fraction, name)
        for name, (x, y, idx, ids, fraction) in parts.items()
    }


def per_class_counts(split: Split, n_classes: int) -> list[int]:
    """Number of images of each domain class in a split."""
    return np.bincount(split.y, minlength=n_classes).tolist()


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the 0–1 scale."""
    if len(x) == 0:
        raise TlpipeError("the source split is empty: nothing to compute mean/std from")
    mean, std = [], []
    for c in range(x.shape[1]):
        # A 256-bin histogram gives exact moments without a float copy of the images.
        hist = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        levels = np.arange(256) / 255.0
        m = float(hist @ levels / hist.sum())
        mean.append(round(m, 6))
        std.append(round(math.sqrt(max(float(hist @ levels**2 / hist.sum()) - m * m, 0.0)), 6))
    return mean, std
