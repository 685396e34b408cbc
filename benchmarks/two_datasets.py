"""Two real datasets: Fashion-MNIST (source) → scikit-learn's handwritten digits (target).

    python benchmarks/two_datasets.py [--seeds 0 1 2] [--work DIR] [--params PRESET]
    python benchmarks/two_datasets.py --quick        # a small smoke run (a test runs it)

The scenario is the preset scenarios/fashion-to-digits.yaml: all 10 Fashion-MNIST classes as
the source, the 1 797 digits (written as an ImageFolder by digits_imagefolder.py) as the
target, split by content hash (20 % test, 10 % of the rest validation). One source model is
pretrained (the preset's `pretrain:`). Then for each setting — k = 10 labelled images per
digit (and at most 5 validation images per digit, as a user with 10 labels would have), and
all labels — and each seed (the split hash, which images are labelled, the fine-tune init),
the steps run as the pipeline runs them: prepare, match (for joint), finetune for scratch and
every strategy of the preset, and evaluate, which scores each model on the target test split
and picks the one to ship by target validation (scratch is a candidate). Nothing is tuned on
test.

Prints a Markdown table of target test accuracy (mean ± std over seeds) per strategy and
setting, with what the pipeline would ship ("selected by val"), and ends with one line: the
best strategy's and the shipped model's gain over scratch in each setting. Clothes and digits
share no class, so only low-level features can transfer; the table says whether they do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from digits_imagefolder import write_digits

from tlpipe.fsio import read_json
from tlpipe.params import EvaluateConfig
from tlpipe.params.fields import merge
from tlpipe.params.resolver import read_params, resolve
from tlpipe.steps import evaluate, fetch, finetune, match, prepare, pretrain

REPO = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, dict[str, Any]] = {  # name → prepare.target overrides
    "k = 10": {"k": 10, "val_per_class": 5},
    "all labels": {"k": None, "val_per_class": None},
}
SELECTED = "selected by val (ships)"
QUICK = {  # --quick: small enough for a test, every part still run
    "prepare": {"source": {"max_per_class": 100}},
    "pretrain": {"train": {"epochs": 1}},
    "finetune": {"train": {"epochs": 2}, "probe": {"epochs": 2}},
    "match": {"plots": False},
    "strategies": ["linear_probe", "joint"],
}


def run_setting(
    params: dict, raw: Path, source: Path, work: Path, setting: str, seed: int
) -> dict[str, Any]:
    """Prepare, match, fine-tune every strategy and evaluate, for one setting and seed."""
    seeded = {"train": {"seed": seed}, "probe": {"seed": seed}}
    params = merge(
        params, {"prepare": {"target": SETTINGS[setting], "seed": seed}, "finetune": seeded}
    )
    resolved = resolve(params)
    tag = f"{setting.replace(' ', '').replace('=', '')}-s{seed}"
    prep, matched, models = work / f"prep-{tag}", work / f"match-{tag}", work / f"models-{tag}"
    if not prep.exists():
        prepare.run(raw, prep, resolved["prepare"])
    if "joint" in resolved.strategies and not matched.exists():
        match.run(prep, source, matched, resolved["match"])
    paths = {}
    for name in ("scratch", *resolved.strategies):
        paths[name] = models / f"{name}.pt"
        if not paths[name].exists():  # --work of an interrupted run: keep what it finished
            cfg = resolved["finetune"].for_strategy(name)
            finetune.run(
                prep, source, paths[name], cfg, match_dir=matched if matched.exists() else None
            )
    out = work / f"eval-{tag}"
    evaluate.run(prep, paths, out, EvaluateConfig(plots=False))
    return read_json(out / "metrics.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", type=Path, default=REPO / "scenarios/fashion-to-digits.yaml")
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    ap.add_argument("--quick", action="store_true", help="tiny epochs, 2 strategies, seed 0")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-two-datasets-"))
    work.mkdir(parents=True, exist_ok=True)
    params = read_params(args.params)
    if args.quick:
        params, args.seeds = merge(params, QUICK), [0]
    write_digits(work / "digits")  # idempotent
    params = merge(params, {"fetch": {"target": {"sources": [str(work / "digits")]}}})
    raw = work / "raw"
    if not raw.exists():
        fetch.run(resolve(params)["fetch"], raw)
    source = work / "source.pt"
    if not source.exists():  # the source split does not depend on the target setting
        prepare.run(raw, work / "prep-source", resolve(params)["prepare"])
        pretrain.run(work / "prep-source", source, resolve(params)["pretrain"])
        print(f"pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
    names = ["scratch", *resolve(params).strategies, SELECTED]
    results: dict[str, dict[str, list[float]]] = {n: {s: [] for s in SETTINGS} for n in names}
    for setting in SETTINGS:
        for seed in args.seeds:
            metrics = run_setting(params, raw, source, work, setting, seed)
            for name, m in metrics["models"].items():
                results[name][setting].append(m["accuracy"])
            results[SELECTED][setting].append(metrics["models"][metrics["selected"]]["accuracy"])
            print(
                f"{setting}, seed {seed}: "
                + ", ".join(f"{n} {100 * m['accuracy']:.1f}" for n, m in metrics["models"].items())
                + f"; ships {metrics['selected']}",
                flush=True,
            )
    print_table(results, len(args.seeds))
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")
    print(final_line(results))


def _mean_sd(v: list[float]) -> str:
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.mean(v):.1f} ± {100 * sd:.1f}"


def print_table(results: dict[str, dict[str, list[float]]], n_seeds: int) -> None:
    print(f"\nDigits test accuracy (%), Fashion-MNIST source, mean ± std over {n_seeds} seeds\n")
    print("| model | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for name, by_setting in results.items():
        print(f"| {name} | " + " | ".join(_mean_sd(by_setting[s]) for s in SETTINGS) + " |")


def final_line(results: dict[str, dict[str, list[float]]]) -> str:
    """Per setting: the best transfer strategy's mean gain over scratch, and the shipped one's."""
    parts = []
    for s in SETTINGS:
        mean = {n: statistics.mean(v[s]) for n, v in results.items()}
        best = max((n for n in mean if n not in ("scratch", SELECTED)), key=mean.get)
        parts.append(
            f"{s}: best transfer {best} {100 * (mean[best] - mean['scratch']):+.1f}, "
            f"shipped {100 * (mean[SELECTED] - mean['scratch']):+.1f}"
        )
    return "gain over scratch (points) — " + "; ".join(parts)


if __name__ == "__main__":
    main()
