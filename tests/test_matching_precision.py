"""Selection precision on real images: a small mixed-source scenario through prepare, pretrain
and match, the path `make run` takes (issue 22: a drop went unseen while only synthetic
embeddings were tested).

Fashion-MNIST classes 0-4 as source (300 images each, half inverted like the target), 5-9 as
target (50 images for matching), small_cnn pretrained for 2 epochs: seconds per seed on a quiet
machine. The floor is derived from measured runs at exactly this setting (the refined
discriminator's mean over seeds 0-4 less two standard deviations; main 2152335 falls below it):
the numbers are in benchmarks/README.md, "Sample matching precision (issue 22)".
The full-size benchmark (14 250 source images, seeds 0-2, the shifts: about an hour on 2 cores)
is `make bench-matching`, not a test: it would take most of CI's 90 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlpipe.params.resolver import resolve
from tlpipe.steps import fetch, match, prepare, pretrain

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FLOOR = 0.93  # the mean over SEEDS; see the module docstring
SEEDS = (0, 1)

needs_fmnist = pytest.mark.skipif(
    not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


def mixed_source_report(work: Path, seed: int) -> dict:
    """prepare → pretrain → match on the small mixed-source scenario; match's report."""
    cfg = resolve(
        REPO / "scenarios/mixed-source.yaml",
        [
            f"prepare.seed={seed}",
            "prepare.source.max_per_class=300",
            f"pretrain.train.seed={seed}",
            "pretrain.train.epochs=2",
            f"match.seed={seed}",
            "match.plots=false",
        ],
    )
    raw, prepared, model = work / "raw", work / f"prepared{seed}", work / f"source{seed}.pt"
    if not raw.exists():
        fetch.run(cfg["fetch"], raw)
    prepare.run(raw, prepared, cfg["prepare"])
    pretrain.run(prepared, model, cfg["pretrain"])
    result = match.run(prepared, model, work / f"match{seed}", cfg["match"])
    return json.loads(result.report.read_text())


@needs_fmnist
def test_mixed_source_selection_precision(tmp_path: Path) -> None:
    reports = [mixed_source_report(tmp_path, seed) for seed in SEEDS]
    precision = [r["selection_precision"] for r in reports]
    assert all(r["n_target"] == 50 and 0.45 < r["shifted_fraction"] < 0.55 for r in reports)
    assert sum(precision) / len(precision) >= FLOOR, precision
