"""prepare: raw data → the scenario's five splits + manifest.json (see `tlpipe.data.splitting`).

Reads what `fetch` wrote (``data/raw/source``, ``data/raw/target`` and their descriptions),
picks each side's classes, assigns images to splits by content hash, and writes the splits
chunk by chunk: peak memory does not grow with the dataset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe import fsio
from tlpipe.data.manifest import Manifest, Side, SplitRecord, write_manifest
from tlpipe.data.prepared import SPLITS, RawDataset, dataset_sha256, split_sha256
from tlpipe.data.readers import read_raw, read_sides
from tlpipe.data.splitting import (
    channel_stats,
    class_ids,
    class_names,
    duplicates,
    empty_selection,
    per_class_counts,
    select_source,
    select_target,
    size_summary,
    write_split,
)
from tlpipe.errors import TlpipeError
from tlpipe.params import PrepareConfig, fields
from tlpipe.steps import StepResult


@dataclass(frozen=True)
class PrepareResult(StepResult):
    """What prepare wrote: the prepared dir, its manifest, and split sizes as metrics."""

    out_dir: Path
    manifest: Path
    dataset_sha256: str


def run(raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> PrepareResult:
    """Read the raw data in `raw_dir` (fetch's output), build the scenario, write `out_dir`.

    Everything is validated before anything is written, and the directory is written to a
    temporary sibling and renamed, so a failure never leaves a partial `out_dir`.
    """
    start = time.perf_counter()
    raw_dir = Path(raw_dir)
    sides = read_sides(raw_dir)
    one = sides["one_dataset"]
    target = _read(raw_dir, "source" if one else "target", sides["target"], cfg)
    source = (
        target
        if one
        else (_read(raw_dir, "source", sides["source"], cfg) if sides["source"] else None)
    )
    if cfg.source_shift_fraction > 0 and not cfg.shift:
        raise TlpipeError("prepare.source_shift_fraction > 0 needs a prepare.shift to apply")
    tgt_ids = class_ids(cfg.target.classes, target.classes, "prepare.target.classes")
    if len(tgt_ids) < 2:
        raise TlpipeError(
            f"the target has {len(tgt_ids)} class ({', '.join(target.classes[i] for i in tgt_ids)})"
            ": a classifier needs at least 2; add a class folder (or label), or list more in "
            "prepare.target.classes"
        )
    selections = select_target(target, tgt_ids, cfg, one)
    taken = np.concatenate([s.ids for s in selections.values()])
    src_ids: list[int] = []
    if source is None:
        selections |= {"source": empty_selection(), "source_val": empty_selection()}
    else:
        src_ids = class_ids(cfg.source.classes, source.classes, "prepare.source.classes")
        selections |= select_source(source, src_ids, cfg, one, taken)
    for name in ("target_val", "target_test"):
        if not len(selections[name]):
            raise TlpipeError(
                f"{name} is empty: add target images or raise "
                "prepare.target.val_fraction / test_fraction"
            )
    shape = _shape(source, target, cfg)
    out_dir = Path(out_dir)
    with fsio.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        splits = {name: write_split(tmp, name, selections[name], cfg, shape) for name in SPLITS}
        hashes = {name: split_sha256(splits[name]) for name in SPLITS}
        stats_from = splits["source"] if len(splits["source"]) else splits["target_train"]
        mean, std = channel_stats(stats_from.x)
        target_rows = [target.sizes[selections[n].rows] for n in SPLITS if n.startswith("target")]
        source_sizes = source.sizes[selections["source"].rows] if source else None
        found = duplicates(selections)
        manifest = Manifest(
            dataset=sides["target"]["dataset"],
            one_dataset=one,
            source=_side(sides["source"], source, src_ids, cfg.source) if source else None,
            target=_side(sides["target"], target, tgt_ids, cfg.target),
            scenario=fields.to_dict(cfg),
            source_classes=tuple(class_names(src_ids, cfg.source, source) if source else []),
            target_classes=tuple(class_names(tgt_ids, cfg.target, target)),
            input_shape=shape,
            mean=tuple(mean),
            std=tuple(std),
            image_sizes={
                "target": size_summary(np.concatenate(target_rows)),
                "source": size_summary(source_sizes) if source else {},
            },
            duplicates=found,
            splits={
                name: SplitRecord(
                    count=len(splits[name]),
                    sha256=hashes[name],
                    per_class=tuple(
                        per_class_counts(
                            splits[name], len(src_ids if name.startswith("source") else tgt_ids)
                        )
                    ),
                )
                for name in SPLITS
            },
            dataset_sha256=dataset_sha256(hashes),
        )
        source_sha256 = dataset_sha256({n: hashes[n] for n in ("source", "source_val")})
        write_manifest(tmp, manifest, source_sha256)
    metrics: dict[str, float] = {f"n_{name}": float(len(splits[name])) for name in SPLITS}
    dups = found["across_splits"]
    metrics["duplicates_across_splits"] = float(dups)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return PrepareResult(
        out_dir=out_dir,
        manifest=out_dir / "manifest.json",
        dataset_sha256=manifest.dataset_sha256,
        metrics=metrics,
        artifacts=(out_dir / "manifest.json",),
        summary=f"prepared {out_dir}: "
        + ", ".join(f"{name} {int(metrics[f'n_{name}'])}" for name in SPLITS)
        + (f"; {dups} image(s) in more than one split (same bytes)" if dups else ""),
    )


def _read(raw_dir: Path, side: str, desc: dict[str, Any], cfg: PrepareConfig) -> RawDataset:
    return read_raw(
        raw_dir / side,
        desc["format"],
        desc["dataset"],
        cfg.channels,
        cfg.input_size,
        cfg.max_image_pixels,
        cfg.max_image_bytes,
        cfg.max_unpack_ratio,
    )


def _shape(
    source: RawDataset | None, target: RawDataset, cfg: PrepareConfig
) -> tuple[int, int, int]:
    """(C, H, W) of the prepared images: `channels` / `input_size`, else as stored (both sides
    must then agree)."""
    raws = [r for r in (source, target) if r is not None]
    stored = {r.x.shape[1] for r in raws}, {r.x.shape[2:] for r in raws}
    if cfg.channels is None and len(stored[0]) > 1:
        raise TlpipeError(
            f"source and target images have {sorted(stored[0])} channels: set "
            "prepare.channels to 1 or 3"
        )
    if cfg.input_size is None and len(stored[1]) > 1:
        raise TlpipeError(
            f"source and target images differ in size {sorted(stored[1])}: set prepare.input_size"
        )
    h, w = target.x.shape[2:]
    if cfg.input_size is None and h != w:
        raise TlpipeError(f"images are {w}x{h}, not square: set prepare.input_size")
    return cfg.channels or target.x.shape[1], cfg.input_size or h, cfg.input_size or w


def _side(desc: dict, raw: RawDataset, ids: list[int], part: Any) -> Side:
    return Side(
        dataset=desc["dataset"],
        format=desc["format"],
        class_ids=tuple(ids),
        classes=tuple(raw.classes[i] for i in ids),
        names=tuple(class_names(ids, part, raw)),
        images=len(raw),
        own_test_set=bool(raw.test.any()),
    )
