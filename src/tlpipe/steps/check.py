"""check: this run's prepared data against the data the current champion was trained on.

Runs after prepare and before any training (`tlpipe run` and the Kubeflow DAG order it so). It
always writes a report — class counts per split old vs new, classes that appeared or vanished,
the change of mean/std, of the stored image sizes and of the input shape, images that stand in
two target splits at once — and
stops with one line on the failures listed in `check.fail_on`:

- ``vanished_class``: a class the champion knew has no images now;
- ``label_set_changed``: the class list differs while the scenario's settings did not (new
  labels slipped into the data; change the config to accept them);
- ``input_shape_changed``: images of another shape or channel count;
- ``image_size_changed``: the images as stored (before resizing) have another median or
  commonest size (say a new camera): reported, not a failure unless listed;
- ``duplicates_across_splits``: the same image in two of target train / val / test (the test
  split would leak);
- ``few_images``: a target class with fewer than `check.min_images_per_class` images in a
  split (named with its counts; reported, not a failure unless listed).

The champion's data is the `manifest.json` that `register` stored with it; with no champion
(a first run) there is nothing to compare and the check passes with a report saying so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data.manifest import Manifest
from tlpipe.errors import TlpipeError
from tlpipe.params import CheckConfig
from tlpipe.release import registry
from tlpipe.steps import StepResult

TARGET_SPLITS = ("target_train", "target_val", "target_test")


@dataclass(frozen=True)
class CheckResult(StepResult):
    """The report's path and the failures found (empty: the data may be trained on)."""

    report_path: Path
    failures: tuple[str, ...]


def run(
    prepared_dir: Path, out_dir: Path, cfg: CheckConfig, model_name: str = "tlpipe"
) -> CheckResult:
    """Compare `prepared_dir` with the champion of registered model `model_name`; write
    `out_dir/report.json`; raise a TlpipeError on a failure listed in `cfg.fail_on`."""
    from tlpipe.data.manifest import load_manifest
    from tlpipe.fsio import write_json

    new = load_manifest(prepared_dir)
    old, version = registry.champion_manifest(model_name)
    report = compare(old, new) if old is not None else {"findings": {}}
    report["champion"] = version
    report["findings"]["duplicates_across_splits"] = duplicates_across_splits(Path(prepared_dir))
    report["findings"]["few_images"] = few_images(new, cfg.min_images_per_class)
    found = {name: value for name, value in report["findings"].items() if value}
    failures = tuple(f"{name}: {found[name]}" for name in cfg.fail_on if name in found)
    report["failures"] = list(failures)
    path = write_json(Path(out_dir) / "report.json", report)
    if failures:
        against = f"champion v{version}" if version else "itself"
        raise TlpipeError(f"data check failed against {against} ({path}): " + "; ".join(failures))
    what = f"vs champion v{version}" if old is not None else "(no champion to compare with)"
    seen = ", ".join(f"{k}: {v}" for k, v in found.items()) or "nothing to report"
    metrics = {f"found_{k}": float(bool(found.get(k))) for k in report["findings"]}
    return CheckResult(
        path, failures, metrics=metrics, artifacts=(path,), summary=f"data check {what}: {seen}"
    )


def compare(old: Manifest, new: Manifest) -> dict[str, Any]:
    """What changed between two prepared-data manifests (champion's, this run's)."""
    old_cls, new_cls = old.target_classes, new.target_classes
    counts = {
        split: {"champion": _per_class(old, split), "now": _per_class(new, split)}
        for split in TARGET_SPLITS
    }
    same_settings = old.requested() == new.requested()
    sizes = {
        "champion": old.image_sizes.get("target", {}),
        "now": new.image_sizes.get("target", {}),
    }
    findings = {  # a class the settings still ask for but the data no longer has
        "vanished_class": sorted(set(old_cls) - set(new_cls)) if same_settings else [],
        "new_class": sorted(set(new_cls) - set(old_cls)),
        "label_set_changed": (old_cls != new_cls) and same_settings,
        "input_shape_changed": old.input_shape != new.input_shape,
        "image_size_changed": bool(sizes["champion"]) and _size_moved(**sizes),
    }
    drift = {
        "mean": [round(b - a, 6) for a, b in zip(old.mean, new.mean, strict=False)],
        "std": [round(b - a, 6) for a, b in zip(old.std, new.std, strict=False)],
        "image_sizes": sizes,
    }
    return {
        "findings": findings,
        "class_counts": counts,
        "drift": drift,
        "same_scenario_settings": same_settings,
    }


def _size_moved(champion: dict[str, Any], now: dict[str, Any]) -> bool:
    """The images' stored sizes moved: another median, or another commonest size."""
    top = lambda d: d.get("commonest", [[None]])[0][0]  # noqa: E731
    return champion.get("median") != now.get("median") or top(champion) != top(now)


def _per_class(manifest: Manifest, split: str) -> dict[str, int]:
    counts = manifest.splits[split].per_class
    return dict(zip(manifest.target_classes, counts, strict=False))


def few_images(manifest: Manifest, at_least: int) -> dict[str, dict[str, int]]:
    """Target classes with fewer than `at_least` images in a split: {class: {split: count}}."""
    found: dict[str, dict[str, int]] = {}
    for split in TARGET_SPLITS:
        for name, count in _per_class(manifest, split).items():
            if count < at_least:
                found.setdefault(name, {})[split] = count
    return found


def duplicates_across_splits(prepared_dir: Path) -> list[dict[str, Any]]:
    """Images (same pixels) that stand in two target splits at once."""
    from tlpipe.data.prepared import load_split

    seen: dict[str, str] = {}
    found = []
    for split in TARGET_SPLITS:
        x = load_split(prepared_dir, split).x
        for i in range(len(x)):
            digest = hashlib.sha256(np.ascontiguousarray(x[i]).tobytes()).hexdigest()
            other = seen.setdefault(digest, f"{split}[{i}]")
            if not other.startswith(split + "["):
                found.append({"image": f"{split}[{i}]", "same_as": other})
    return found
