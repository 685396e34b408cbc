"""Scenario building: the source / target splits and target-domain shifts.

A scenario has a *source* task (lots of labels; or none, only a pretrained backbone) and a
*target* task (the user's labelled images). They are two datasets, or one dataset split by class
(the benchmark: Fashion-MNIST 0-4 → 5-9). The target can be made a different domain with a
`shift` (a list of `ShiftOp`, applied in order); a fraction of the source images can get the same
shift (`source_shift_fraction`): a "mixed source" whose target-like part is known, ground truth
for sample matching (the `shifted` flags).

Images are assigned to splits by a hash of their content key (`RawDataset.keys`) and the seed,
never by their position: adding images to a dataset moves no existing image to another split,
and the previous test set stays a subset of the new one. The one exception is a class so small
that no hash fell in its validation or test range: its smallest-hash image is promoted there
(`class_masks`) until the class grows one of its own. Caps (`k`, `max_per_class`, …) take
the images with the smallest hash. Images are written split by split, chunk by chunk, so memory
stays flat however large the data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlpipe.data.prepared import (
    KEY_DTYPE,
    ArrayWriter,
    RawDataset,
    Split,
    chunks,
    read_rows,
    take_rows,
)
from tlpipe.errors import TlpipeError
from tlpipe.params import PrepareConfig, ShiftOp, SourceSplit, TargetSplit, caps

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
    for dr, dc, weight in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
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


def _contrast(x: np.ndarray, factor: float, _rng: np.random.Generator) -> np.ndarray:
    """Scale each image's deviation from its own mean intensity by `factor` (per channel)."""
    mean = x.mean(axis=(2, 3), keepdims=True)
    return mean + np.float32(factor) * (x - mean)


# op name → function(images, the op's parameter, rng); parameter names: params.SHIFT_PARAMS
SHIFTS: dict[str, ShiftFn] = {
    "invert": _invert,
    "rotate": _rotate,
    "gaussian_blur": _gaussian_blur,
    "noise": _noise,
    "contrast": _contrast,
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


@dataclass(frozen=True)
class Selection:
    """One split before its images are written: rows of a raw dataset and their labels."""

    raw: RawDataset | None  # None: an empty split (no source dataset)
    rows: np.ndarray  # indices into raw, ascending
    y: np.ndarray  # labels within the side's class list
    shifted: np.ndarray  # rows that get `prepare.shift`

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> np.ndarray:
        return self.raw.keys[self.rows] if self.raw is not None else np.empty(0, KEY_DTYPE)


def unit_hash(keys: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """A number in [0, 1) per content key, fixed by (key, seed, purpose): the split draw."""
    salt = f"{seed}:{purpose}".encode()
    out = np.empty(len(keys), np.float64)
    for i, key in enumerate(keys.tolist()):
        digest = hashlib.blake2b(salt + b"\0" + key, digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def class_ids(wanted: tuple[int | str, ...], classes: tuple[str, ...], where: str) -> list[int]:
    """The dataset's ids of `wanted` (ids or names; empty = every class), checked."""
    if not wanted:
        return list(range(len(classes)))
    ids = []
    for c in wanted:
        if isinstance(c, str) and c in classes:
            ids.append(classes.index(c))
        elif isinstance(c, int) and 0 <= c < len(classes):
            ids.append(c)
        else:
            shown = ", ".join(f"{i}={n}" for i, n in enumerate(classes[:12]))
            more = " …" if len(classes) > 12 else ""
            raise TlpipeError(
                f"{where}: no class {c!r} in the dataset ({len(classes)} classes: {shown}{more})"
            )
    if len(set(ids)) != len(ids):
        raise TlpipeError(f"{where} names a class twice: {list(wanted)}")
    return ids


def class_names(ids: list[int], part: SourceSplit | TargetSplit, raw: RawDataset) -> list[str]:
    """The display names of classes `ids`: `part.names` when given, else the dataset's."""
    if part.names and len(part.names) != len(ids):
        raise TlpipeError(
            f"{len(part.names)} names for {len(ids)} classes: give one name per class, in the "
            "order of classes (or of the dataset's classes)"
        )
    return list(part.names) if part.names else [raw.classes[i] for i in ids]


def select_target(
    raw: RawDataset, ids: list[int], cfg: PrepareConfig, one_dataset: bool
) -> dict[str, Selection]:
    """target_train / target_val / target_test, by content hash, per class (see module doc)."""
    t = cfg.target
    k, val_cap = caps(t, one_dataset)
    u = unit_hash(raw.keys, cfg.seed, "target")
    own_test = raw.test.any()
    parts: dict[str, list[np.ndarray]] = {"target_train": [], "target_val": [], "target_test": []}
    for cid in ids:
        rows = np.flatnonzero(raw.y == cid)
        train, val, test = class_masks(u[rows], raw.test[rows] if own_test else None, t)
        masks = {"training": train, "validation": val, "test": test}
        lacking = [what for what, mask in masks.items() if not mask.any()]
        if lacking:  # a typo'd label (`sneakre`) makes such a class: it cannot be measured
            raise TlpipeError(
                f"target class {raw.classes[cid]!r} has no {' and no '.join(lacking)} image "
                f"({len(rows)} in all: {int(train.sum())} train, {int(val.sum())} val, "
                f"{int(test.sum())} test): add images of it, fix its label if it is a typo, "
                "or leave it out of prepare.target.classes"
            )
        for name, mask, cap in (
            ("target_train", train, k),
            ("target_val", val, val_cap),
            ("target_test", test, t.max_test_per_class),
        ):
            chosen = rows[mask][np.argsort(u[rows[mask]], kind="stable")][:cap]
            parts[name].append(chosen)
    return {name: _selection(raw, chunks_, ids, cfg.shift != ()) for name, chunks_ in parts.items()}


def class_masks(
    u: np.ndarray, own_test: np.ndarray | None, t: TargetSplit
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) masks of one target class from its images' hashes `u`.

    The dataset's own test flags (`own_test`) are the test split when it has them, else the
    hashes below `test_fraction`; the next `val_fraction` of hash range is validation. A small
    class whose hashes all missed the val (or test) range still gets one image there: the one
    with the smallest hash (`_promote`), so the run is measurable. It stays put until the class
    grows an image of its own in that range; then the promoted one goes back to training.
    A split may still be empty (fewer than 3 images): the caller refuses that class."""
    if own_test is not None:
        test = own_test.copy()
        val = ~test & (u < t.val_fraction)
    else:
        test = u < t.test_fraction
        val = ~test & (u < t.test_fraction + t.val_fraction)
        if not test.any() and len(u) >= 3:
            test = _promote(test, u, ~test)
            val &= ~test  # the smallest hash may have been a val image
    if not val.any() and (~test).sum() >= 2:
        val = _promote(val, u, ~test)
    return ~(test | val), val, test


def _promote(mask: np.ndarray, u: np.ndarray, among: np.ndarray) -> np.ndarray:
    """`mask` plus the row of `among` with the smallest hash."""
    out = mask.copy()
    out[np.flatnonzero(among)[np.argmin(u[among])]] = True
    return out


def select_source(
    raw: RawDataset, ids: list[int], cfg: PrepareConfig, one_dataset: bool, taken: np.ndarray
) -> dict[str, Selection]:
    """source / source_val, by content hash; images whose key is in `taken` are left out.

    On one dataset the source draws from its train set only (its test set is the target's);
    a source dataset of its own gives every labelled image, its test set included.
    """
    s = cfg.source
    u = unit_hash(raw.keys, cfg.seed, "source")  # the order caps keep
    held_out = unit_hash(raw.keys, cfg.seed, "source_val") < s.val_fraction
    usable = ~np.isin(raw.keys, taken) & (~raw.test if one_dataset else True)
    train, val = [], []
    for cid in ids:
        rows = np.flatnonzero((raw.y == cid) & usable)
        if rows.size == 0:
            raise TlpipeError(f"source class {raw.classes[cid]!r} has no images left for source")
        rows = rows[np.argsort(u[rows], kind="stable")][: s.max_per_class]
        train.append(rows[~held_out[rows]])
        val.append(rows[held_out[rows]])
    shift = unit_hash(raw.keys, cfg.seed, "shift") < cfg.source_shift_fraction
    return {
        "source": _selection(raw, train, ids, shift if cfg.shift else False),
        "source_val": _selection(raw, val, ids, shift if cfg.shift else False),
    }


def _selection(
    raw: RawDataset, per_class: list[np.ndarray], ids: list[int], shift: np.ndarray | bool
) -> Selection:
    rows = np.sort(np.concatenate(per_class)) if per_class else np.empty(0, np.int64)
    position = np.zeros(max(ids) + 1, np.int64)
    position[ids] = np.arange(len(ids))
    shifted = shift[rows] if isinstance(shift, np.ndarray) else np.full(len(rows), bool(shift))
    return Selection(raw, rows, position[raw.y[rows]], shifted)


def empty_selection() -> Selection:
    none = np.empty(0, np.int64)
    return Selection(None, none, none, np.empty(0, bool))


def duplicates(selections: dict[str, Selection]) -> dict[str, int]:
    """Images with the same bytes: repeated within a split, and in more than one split."""
    where: dict[bytes, set[str]] = {}
    within = 0
    for name, sel in selections.items():
        keys = sel.ids.tolist()
        within += len(keys) - len(set(keys))
        for key in set(keys):
            where.setdefault(key, set()).add(name)
    across = [names for names in where.values() if len(names) > 1]
    in_target = sum(1 for names in across if len(names - {"source", "source_val"}) > 1)
    return {
        "within_splits": within,
        "across_splits": len(across),
        "across_target_splits": in_target,
    }


def write_split(
    out_dir: Path, name: str, sel: Selection, cfg: PrepareConfig, shape: tuple[int, int, int]
) -> Split:
    """Write `sel`'s images (conformed to `shape`, shifted where flagged) chunk by chunk."""
    from tlpipe.data.prepared import load_split, save_labels

    c, h, w = shape
    x_path = out_dir / f"{name}.x.npy"
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, c * h * w * 4))
    with ArrayWriter(x_path, (len(sel), c, h, w), np.uint8) as out:
        for n, start in enumerate(range(0, len(sel), rows_per_chunk)):
            rows = sel.rows[start : start + rows_per_chunk]
            x = conform_images(take_rows(sel.raw.x, rows), c, h)
            flagged = sel.shifted[start : start + rows_per_chunk]
            if cfg.shift and flagged.any():
                rng = _rng(cfg.seed, f"{name}:{n}")
                x[flagged] = apply_shift(x[flagged], cfg.shift, rng)
            out.write(x)
    save_labels(out_dir, name, sel.y, sel.shifted, sel.ids)
    return load_split(out_dir, name)


_CHUNK_BYTES = 16 << 20  # float32 bytes of one chunk of images being conformed / shifted


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose.encode()])


def per_class_counts(split: Split, n_classes: int) -> list[int]:
    """Number of images of each domain class in a split."""
    return np.bincount(split.y, minlength=n_classes).tolist()


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the 0–1 scale, chunk by chunk."""
    if len(x) == 0:
        raise TlpipeError("no images to compute mean/std from")
    hist = np.zeros((x.shape[1], 256), np.float64)
    for start, stop in chunks(x, 2 << 20):  # small: bincount makes an int64 copy of a chunk
        rows = read_rows(x, start, stop)
        for c in range(x.shape[1]):  # a 256-bin histogram: exact moments, no float copy
            hist[c] += np.bincount(rows[:, c].ravel(), minlength=256)
    levels = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        m = float(hist[c] @ levels / hist[c].sum())
        mean.append(round(m, 6))
        std.append(
            round(math.sqrt(max(float(hist[c] @ levels**2 / hist[c].sum()) - m * m, 0.0)), 6)
        )
    return mean, std


def size_summary(sizes: np.ndarray) -> dict:
    """The distribution of stored image sizes (width, height): min, median, max, commonest."""
    if len(sizes) == 0:
        return {}
    area = sizes[:, 0].astype(np.int64) * sizes[:, 1]
    order = np.argsort(area, kind="stable")
    pick = lambda i: sizes[order[i]].tolist()  # noqa: E731
    uniq, counts = np.unique(sizes, axis=0, return_counts=True)
    top = np.argsort(-counts, kind="stable")[:5]
    return {
        "min": pick(0),
        "median": pick(len(order) // 2),
        "max": pick(-1),
        "commonest": [[f"{w}x{h}", int(counts[i])] for i, (w, h) in ((i, uniq[i]) for i in top)],
    }
