"""prepare: raw data → the scenario's five splits + manifest.json (see `tlpipe.scenario`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tlpipe import config, fsio
from tlpipe.data import SPLITS, dataset_sha256, save_split, split_sha256
from tlpipe.params import PrepareConfig
from tlpipe.readers import read_raw
from tlpipe.scenario import build_splits, channel_stats, per_class_counts
from tlpipe.steps import StepResult

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareResult(StepResult):
    """What prepare wrote: the prepared dir, its manifest, and split sizes as metrics."""

    out_dir: Path
    manifest: Path
    dataset_sha256: str


def run(raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> PrepareResult:
    """Read the raw data in `raw_dir`, build the scenario and write it to `out_dir`.

    Everything is validated before anything is written, and the directory is written to a
    temporary sibling and renamed, so a failure never leaves a partial `out_dir`.
    """
    start = time.perf_counter()
    raw = read_raw(
        Path(raw_dir), cfg.format, cfg.dataset, cfg.channels, cfg.input_size, cfg.max_image_pixels
    )
    splits = build_splits(raw, cfg)
    manifest = _manifest(splits, raw.classes, cfg)
    out_dir = Path(out_dir)
    with fsio.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in SPLITS:
            save_split(tmp, name, splits[name])
        fsio.write_json(tmp / "manifest.json", manifest)
    metrics: dict[str, float] = {f"n_{name}": float(len(splits[name])) for name in SPLITS}
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return PrepareResult(
        out_dir=out_dir,
        manifest=out_dir / "manifest.json",
        dataset_sha256=manifest["dataset_sha256"],
        metrics=metrics,
        artifacts=(out_dir / "manifest.json",),
        summary=f"prepared {out_dir}: "
        + ", ".join(f"{name} {int(metrics[f'n_{name}'])}" for name in SPLITS),
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
