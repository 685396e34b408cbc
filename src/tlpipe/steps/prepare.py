"""prepare: raw data → the scenario's five splits + manifest.json (see `tlpipe.scenario`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tlpipe import config, fsio
from tlpipe.data import SPLITS, dataset_sha256, read_raw, save_split, split_sha256
from tlpipe.errors import TlpipeError
from tlpipe.scenario import ShiftOp, build_splits, channel_stats, per_class_counts

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareConfig:
    """The `prepare` section of params.yaml.

    Attributes:
        dataset: Dataset name, recorded in the manifest; a known one (`tlpipe.data.DATASETS`)
            names its classes.
        format: Raw layout: idx, imagefolder (train/, test/ of class folders) or npz.
        source_classes: Dataset class ids of the source task.
        target_classes: Dataset class ids of the target task (may overlap the source ones; an
            image is then never in both).
        k: Labelled target images per class, sampled from the official train set.
        val_per_class: Target validation images per class, from the train set, disjoint from k.
        source_val_fraction: Fraction of each source class held out as source validation.
        max_source_per_class: Cap on source images per class (None = all).
        max_test_per_class: Cap on test images per target class (None = all).
        shift: Target-domain shift, ops applied in order, e.g. ``[{op: invert}]``.
        source_shift_fraction: Fraction of source images (random, seeded) also shifted.
        channels: Output channels, 1 or 3 (None = as stored; imagefolder: 3).
        input_size: Output side length in pixels (None = as stored; imagefolder needs it).
        seed: Seed of every random choice.
    """

    dataset: str = "fashion-mnist"
    format: Literal["idx", "imagefolder", "npz"] = "idx"
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    k: int = 5
    val_per_class: int = 5
    source_val_fraction: float = 0.05
    max_source_per_class: int | None = None
    max_test_per_class: int | None = None
    shift: tuple[ShiftOp, ...] = ()
    source_shift_fraction: float = 0.0
    channels: int | None = None
    input_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "k must be >= 1": self.k >= 1,
            "val_per_class must be >= 1": self.val_per_class >= 1,
            "source_val_fraction must be in [0, 1)": 0 <= self.source_val_fraction < 1,
            "source_shift_fraction must be in [0, 1]": 0 <= self.source_shift_fraction <= 1,
            "max_source_per_class must be >= 1": (self.max_source_per_class or 1) >= 1,
            "max_test_per_class must be >= 1": (self.max_test_per_class or 1) >= 1,
            "channels must be 1 or 3": self.channels in (None, 1, 3),
            "input_size must be >= 8": (self.input_size or 8) >= 8,
            "seed must be >= 0": self.seed >= 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise TlpipeError(f"bad prepare parameters: {'; '.join(bad)}")


@dataclass(frozen=True)
class PrepareResult:
    """What prepare wrote: the prepared dir, its manifest, and split sizes as metrics."""

    out_dir: Path
    manifest: Path
    dataset_sha256: str
    metrics: dict[str, float]


def run(raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> PrepareResult:
    """Read the raw data in `raw_dir`, build the scenario and write it to `out_dir`.

    Everything is validated before anything is written, and the directory is written to a
    temporary sibling and renamed, so a failure never leaves a partial `out_dir`.
    """
    start = time.perf_counter()
    raw = read_raw(Path(raw_dir), cfg.format, cfg.dataset, cfg.channels, cfg.input_size)
    splits = build_splits(raw, cfg)
    manifest = _manifest(splits, raw.classes, cfg)
    out_dir = Path(out_dir)
    with fsio.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in SPLITS:
            save_split(tmp / f"{name}.npz", splits[name])
        fsio.write_json(tmp / "manifest.json", manifest)
    metrics: dict[str, float] = {f"n_{name}": float(len(splits[name])) for name in SPLITS}
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return PrepareResult(
        out_dir=out_dir,
        manifest=out_dir / "manifest.json",
        dataset_sha256=manifest["dataset_sha256"],
        metrics=metrics,
    )


def _manifest(splits: dict, classes: tuple[str, ...], cfg: PrepareConfig) -> dict:
    n_source, n_target = len(cfg.source_classes), len(cfg.target_classes)
    hashes = {name: split_sha256(splits[name]) for name in SPLITS}
    mean, std = channel_stats(splits["source"].x)
    return {
        "version": MANIFEST_VERSION,
        "dataset": cfg.dataset,
        "scenario": config.to_dict(cfg),
        "source_classes": [classes[c] for c in cfg.source_classes],
        "target_classes": [classes[c] for c in cfg.target_classes],
        "input_shape": list(splits["source"].x.shape[1:]),
        "mean": mean,
        "std": std,
        "splits": {
            name: {
                "count": len(splits[name]),
                "sha256": hashes[name],
                "per_class": per_class_counts(
                    splits[name], n_source if name.startswith("source") else n_target
                ),
            }
            for name in SPLITS
        },
        "dataset_sha256": dataset_sha256(hashes),
    }
