"""Does the pipeline ship the right model? Selection regret over seeds and scenarios.

    python benchmarks/selection.py --seeds 0 1 2 3 4 --budget reduced   # every scenario
    python benchmarks/selection.py --scenarios default --seeds 0 1
    python benchmarks/selection.py --quick          # a smoke run: 1 scenario, 1 seed, tiny

Scenarios: the presets (`default`: Fashion-MNIST 0-4 → 5-9 with 5 labelled a class;
`fashion-k20`: 20 a class; `mixed-source`; `fashion-to-digits`: Fashion-MNIST → scikit-learn's
digits as an ImageFolder) and issue 21's other problems: `digits-to-fashion` (Fashion-MNIST 5-9,
200 labelled a class, from a digits source), `tinted-digits-resnet18` (the digits in colour at
64 px RGB, 20 a class, resnet18 pretrained on Fashion-MNIST) and `fashion-png-60` /
`fashion-png-100` (Fashion-MNIST 5-9 as a user's PNG folder, 60 then 100 labelled a class).
Their image folders are written under the work folder first.

For each scenario and seed the steps run as the pipeline runs them: prepare (the seed draws
which target images are labelled), finetune for scratch and every strategy (with the default
selection: k-fold cross-validation over target train + val when validation is small, then
each model refit on all of them), and evaluate, which picks the model to ship without looking
at test. The source model is pretrained once per scenario (its source split does not depend
on the target draw). The same models and the same per-image evidence (evidence.json) are then
chosen from under every rule, `evaluate.on_tie` × `evaluate.select_by` (and one
`evaluate.guard`), and each rule's regret is printed next to the params' own.

Prints, per run, the shipped model's test accuracy against the hindsight-best model's (the
best on test, which no pipeline can know) and against scratch, and the Kendall τ (tau-b)
between each model's LogME score (computed before fine-tuning: the source features for the
transfer strategies, the random init for scratch) and its test accuracy; per scenario the
mean regret and what LogME said; over all runs the τ between "source − random init" in LogME
and "best transfer − scratch" in test accuracy (across scenarios and backbones), and what the
opt-in skip rule (`finetune.skip: logme`) would have skipped and saved, from the same scores.
It ends with the line

    selection regret mean = X pt; shipped below scratch by > 1 pt in N of M runs

Budgets: `full` = the scenario's own params; `reduced` = pretrain as the scenario does (4
epochs) on at most 1 000 source images per class (300 for resnet18), fine-tune 10 epochs
(probe 5) scoring at most 500 validation images an epoch, strategies linear_probe, partial,
full and lp_ft (joint and specialist need the match step, which this script does not run);
the table states which was used. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.fsio import atomic_path, read_json
from tlpipe.params.fields import merge
from tlpipe.params.resolver import read_params, resolve
from tlpipe.steps import evaluate, fetch, finetune, prepare, pretrain

sys.path.insert(0, str(Path(__file__).parent))
from digits_imagefolder import png_bytes, write_digits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Scenario:
    """A preset and what it changes; `data` writes the scenario's own image folders under its
    work folder and returns the overrides that point at them (absolute paths)."""

    preset: Path
    over: dict[str, Any] = field(default_factory=dict)
    data: Callable[[Path], dict[str, Any]] | None = None
    reduced: dict[str, Any] = field(default_factory=dict)  # on top of BUDGETS["reduced"]


def digits(sdir: Path, side: str = "target", tint: bool = False) -> dict[str, Any]:
    """scikit-learn's 1 797 digits (grey, or tinted RGB) as the `side` ImageFolder."""
    folder = sdir / ("digits-rgb" if tint else "digits")
    if not folder.exists():
        write_digits(folder, tint=tint)
    spec = {"dataset": "digits", "format": "imagefolder", "sources": [str(folder)]}
    return {"fetch": {side: spec}}


def fashion_pngs(sdir: Path, per_class: int = 600) -> dict[str, Any]:
    """Fashion-MNIST 5-9 as a user's PNG ImageFolder: train/<class name>/ holds the first
    `per_class` training images of each class, test/<class name>/ all 1 000 test images."""
    from tlpipe.data.prepared import FASHION_MNIST_CLASSES
    from tlpipe.data.readers import read_idx

    folder = sdir / "fashion-pngs"
    if not folder.exists():
        with atomic_path(folder) as tmp:
            for split, stem, cap in (("train", "train", per_class), ("test", "t10k", None)):
                x = read_idx(FASHION_MNIST / f"{stem}-images-idx3-ubyte.gz")
                y = read_idx(FASHION_MNIST / f"{stem}-labels-idx1-ubyte.gz")
                for c in range(5, 10):
                    d = tmp / split / FASHION_MNIST_CLASSES[c]
                    d.mkdir(parents=True)
                    for i in np.flatnonzero(y == c)[:cap]:
                        (d / f"{i:05d}.png").write_bytes(png_bytes(x[i]))
    return {
        "fetch": {
            "target": {"dataset": "fashion-pngs", "format": "imagefolder", "sources": [str(folder)]}
        }
    }


# the presets, then the issue's four problems (issue 21's table): same data, same settings
PNG_TARGET = {"prepare": {"target": {"classes": []}, "channels": 1, "input_size": 28}}
SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(REPO / "params.yaml"),  # Fashion-MNIST 0-4 → 5-9, k = 5
    "fashion-k20": Scenario(REPO / "params.yaml", {"prepare": {"target": {"k": 20}}}),
    "mixed-source": Scenario(REPO / "scenarios/mixed-source.yaml"),
    "fashion-to-digits": Scenario(REPO / "scenarios/fashion-to-digits.yaml", data=digits),
    # Fashion-MNIST 5-9, 200 labelled a class, from a digits source
    "digits-to-fashion": Scenario(
        REPO / "params.yaml",
        {
            "prepare": {
                "source": {"classes": []},
                "target": {"k": 200},
                "channels": 1,
                "input_size": 28,
            }
        },
        data=partial(digits, side="source"),
    ),
    # tinted RGB digits at 64 px (20 labelled a class), resnet18 pretrained on Fashion-MNIST
    "tinted-digits-resnet18": Scenario(
        REPO / "params.yaml",
        {
            "prepare": {
                "source": {"classes": list(range(10))},
                "target": {"classes": [], "k": 20},
                "channels": 3,
                "input_size": 64,
            },
            "pretrain": {"model": "resnet18"},
        },
        data=partial(digits, tint=True),
        reduced={"prepare": {"source": {"max_per_class": 300}}},  # resnet18 on 2 CPU cores
    ),
    # Fashion-MNIST 5-9 as the user's PNGs, 60 then 100 labelled a class
    "fashion-png-60": Scenario(
        REPO / "params.yaml", merge(PNG_TARGET, {"prepare": {"target": {"k": 60}}}), fashion_pngs
    ),
    "fashion-png-100": Scenario(
        REPO / "params.yaml", merge(PNG_TARGET, {"prepare": {"target": {"k": 100}}}), fashion_pngs
    ),
}
# evaluate.on_tie (what ships when the interval includes 0) × evaluate.select_by (the per-image
# score it chooses by), and one evaluate.guard: every rule is applied to the same models and
# the same evidence. A rule reads on_tie/select_by[/guard].
RULES = (
    *(
        f"{tie}/{by}"
        for by in ("accuracy", "probability", "log_likelihood")
        for tie in ("best", "baseline")
    ),
    "baseline/probability/accuracy",
)


def rule_args(rule: str) -> tuple[str, str, str | None]:
    """A rule's (on_tie, select_by, guard)."""
    on_tie, by, *guard = rule.split("/")
    return on_tie, by, guard[0] if guard else None


def rule_words(rule: str) -> str:
    """A rule as the params that choose it."""
    on_tie, by, guard = rule_args(rule)
    return f"evaluate.on_tie: {on_tie}, select_by: {by}" + (f", guard: {guard}" if guard else "")


BUDGETS: dict[str, dict[str, Any]] = {
    "full": {},
    "reduced": {
        "prepare": {"source": {"max_per_class": 1000}},
        "finetune": {"train": {"epochs": 10, "val_max_images": 500}, "probe": {"epochs": 5}},
        "strategies": ["linear_probe", "partial", "full", "lp_ft"],
    },
    "quick": {
        "prepare": {"source": {"max_per_class": 100}},
        "pretrain": {"train": {"epochs": 1}},
        "finetune": {"train": {"epochs": 2}, "probe": {"epochs": 1}},
        "strategies": ["linear_probe"],
    },
}


def scenario_params(name: str, budget: str, sdir: Path) -> dict[str, Any]:
    """The scenario's params under `budget`, its data written under `sdir`."""
    sc = SCENARIOS[name]
    params = merge(merge(read_params(sc.preset), sc.over), BUDGETS[budget])
    if budget == "reduced":
        params = merge(params, sc.reduced)
    return merge(params, sc.data(sdir)) if sc.data else params


def run_once(params: dict, raw: Path, source: Path, work: Path, seed: int) -> dict[str, dict]:
    """Prepare with `seed`, fine-tune scratch and every strategy, evaluate, and choose again
    from the same evidence under every rule (`on_tie/select_by[/guard]`): rule → metrics.json with
    that rule's choice, and each model's fine-tuning wall time (CV fits included) under
    "seconds"."""
    seeded = {"train": {"seed": seed}, "probe": {"seed": seed}}
    resolved = resolve(merge(params, {"prepare": {"seed": seed}, "finetune": seeded}))
    prep = work / f"prep-s{seed}"
    if not prep.exists():
        prepare.run(raw, prep, resolved["prepare"])
    models = work / f"models-s{seed}"
    times_file = models / "seconds.json"
    seconds = read_json(times_file) if times_file.exists() else {}
    paths = {}
    for name in ("scratch", *resolved.strategies):
        paths[name] = models / f"{name}.pt"
        if not paths[name].exists():
            t0 = time.perf_counter()
            finetune.run(prep, source, paths[name], resolved["finetune"].for_strategy(name))
            seconds[name] = time.perf_counter() - t0
            times_file.write_text(json.dumps(seconds, indent=1))
    out = work / f"eval-s{seed}"
    evaluate.run(prep, paths, out, replace(resolved["evaluate"], plots=False))
    metrics, evidence = read_json(out / "metrics.json"), read_json(out / "evidence.json")
    results = {}
    for rule in RULES:
        choice = evaluate.select(metrics["models"], metrics["baseline"], evidence, *rule_args(rule))
        results[rule] = metrics | {
            "selected": choice.selected,
            "transfer_helped": choice.helped,
            "tie": choice.tie,
            "seconds": seconds,
        }
    return results


def outcome(m: dict[str, Any]) -> tuple[float, float]:
    """(regret, shipped − scratch), in test-accuracy points, of one evaluate run."""
    acc = {n: v["accuracy"] for n, v in m["models"].items()}
    shipped = acc[m["selected"]]
    return 100 * (max(acc.values()) - shipped), 100 * (shipped - acc[m["baseline"]])


def last_line(rows: list[dict[str, Any]], rule: str) -> str:
    """The summary line of the issue, for the runs chosen under `rule` (RULES)."""
    below = sum(r[rule][1] < -1 for r in rows)
    regret = statistics.mean(r[rule][0] for r in rows)
    return (
        f"selection regret mean = {regret:.2f} pt; shipped below scratch by > 1 pt in "
        f"{below} of {len(rows)} runs"
    )


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall tau-b of two lists (nan when undefined, e.g. all of one list tied)."""
    from scipy.stats import kendalltau

    return float(kendalltau(xs, ys).statistic)


def run_tau(metrics: dict[str, Any]) -> float:
    """τ between the run's models' LogME scores and their test accuracies."""
    models = [m for m in metrics["models"].values() if m.get("logme") is not None]
    return kendall_tau([m["logme"] for m in models], [m["accuracy"] for m in models])


def transfer_gaps(metrics: dict[str, Any]) -> tuple[float, float]:
    """(LogME of the source features − LogME at random init, best transfer model's test
    accuracy − scratch's): does the score say whether transfer pays at all?"""
    models, base = metrics["models"], metrics["baseline"]
    transfer = {n: m for n, m in models.items() if n != base}
    source_logme = max(m["logme"] for m in transfer.values())  # one source model: all equal
    best = max(m["accuracy"] for m in transfer.values())
    return source_logme - models[base]["logme"], best - models[base]["accuracy"]


SKIP_RULES = {
    "logme": "finetune.skip: logme",
    "probe": "not built: the linear probe's estimate below scratch's skips the other transfers",
}


def skipped_by(metrics: dict[str, Any], rule: str) -> list[str]:
    """The strategies a skip rule would have skipped in this run, from its scores. `logme`
    (`finetune.skip: logme`): every transfer strategy when the source features score no higher
    than scratch's random init (same architecture, same seed). `probe` (a counterfactual, not
    in the pipeline): every transfer strategy but the probe itself when the linear probe's
    selection estimate (CV accuracy, else validation accuracy) is below scratch's."""
    models, base = metrics["models"], metrics["baseline"]
    if rule == "logme":
        return [n for n, m in models.items() if n != base and m["logme"] <= models[base]["logme"]]
    probe = models.get("linear_probe")

    def estimate(m: dict[str, Any]) -> float:
        return m["cv_accuracy"] if "cv_accuracy" in m else m["val_accuracy"]

    if probe is None or estimate(probe) >= estimate(models[base]):
        return []
    return [n for n in models if n not in (base, "linear_probe")]


def skip_savings(metrics: dict[str, Any], rule: str = "logme") -> tuple[int, float, float]:
    """What skip rule `rule` (`skipped_by`) would have saved in this run: (fits skipped,
    fine-tuning seconds skipped, the best skipped model's test accuracy − the shipped one's, in
    pt; nan when nothing is skipped)."""
    models = metrics["models"]
    skipped = skipped_by(metrics, rule)
    fits = len(skipped) * (1 + metrics["extra_fits"] // len(models))
    secs = sum(metrics["seconds"].get(n, 0.0) for n in skipped)
    shipped = models[metrics["selected"]]["accuracy"]
    lost = max((models[n]["accuracy"] - shipped for n in skipped), default=float("nan"))
    return fits, secs, 100 * lost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", choices=list(BUDGETS), default="reduced")
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    ap.add_argument("--quick", action="store_true", help="budget quick, default scenario, seed 0")
    ap.add_argument(
        "--cv-repeats",
        type=int,
        default=None,
        metavar="R",
        help="finetune.selection.repeats for every scenario (repeated k-fold CV)",
    )
    ap.add_argument(
        "--cv-folds",
        type=int,
        default=None,
        metavar="K",
        help="finetune.selection.folds for every scenario (k of the k-fold CV)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.scenarios, args.seeds = "quick", ["default"], [0]
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-selection-"))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cv = {"repeats": args.cv_repeats, "folds": args.cv_folds}
    cv = {k: v for k, v in cv.items() if v}
    print(f"budget: {args.budget} {BUDGETS[args.budget]}; CV {cv or 'as the scenario says'}")
    print(
        "| scenario | seed | shipped | shipped acc | best (hindsight) | best acc | scratch acc "
        "| regret pt | vs scratch pt | verdict | regret per rule pt (" + ", ".join(RULES) + ") "
        "| LogME τ |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|---|---:|")
    for scenario in args.scenarios:
        sdir = work / scenario
        sdir.mkdir(parents=True, exist_ok=True)
        params = scenario_params(scenario, args.budget, sdir)
        if cv:
            params = merge(params, {"finetune": {"selection": cv}})
        raw, source = sdir / "raw", sdir / "source.pt"
        if not raw.exists():
            fetch.run(resolve(params)["fetch"], raw)
        if not source.exists():
            prepare.run(raw, sdir / "prep-source", resolve(params)["prepare"])
            pretrain.run(sdir / "prep-source", source, resolve(params)["pretrain"])
        ev = resolve(params)["evaluate"]
        rule = f"{ev.on_tie}/{ev.select_by}" + (f"/{ev.guard}" if ev.guard else "")
        if rule not in RULES:  # what this scenario's params ship by
            raise SystemExit(f"{scenario}: its rule {rule_words(rule)} is not one of RULES")
        for seed in args.seeds:
            runs = run_once(params, raw, source, sdir, seed)
            m = runs[rule]
            acc = {n: v["accuracy"] for n, v in m["models"].items()}
            best = max(acc, key=acc.get)
            row = {
                "scenario": scenario,
                **{r: outcome(runs[r]) for r in RULES},
                "tau": run_tau(m),
                "gaps": transfer_gaps(m),
                "skip": {k: skip_savings(m, k) for k in SKIP_RULES},
                "seconds": sum(m["seconds"].get(n, 0.0) for n in acc),
                "arch": m["models"][best]["arch"],
            }
            rows.append(row)
            regret, vs = row[rule]
            verdict = "helped" if m["transfer_helped"] else "tie" if m.get("tie") else "scratch"
            print(
                f"| {scenario} | {seed} | {m['selected']} | {100 * acc[m['selected']]:.1f} "
                f"| {best} | {100 * acc[best]:.1f} | {100 * acc[m['baseline']]:.1f} "
                f"| {regret:.1f} | {vs:+.1f} | {verdict} "
                f"| {' '.join(f'{row[r][0]:.1f}' for r in RULES)} | {row['tau']:+.2f} |",
                flush=True,
            )
    report(rows, rule)
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")
    for r in RULES:
        if r != rule:
            print(f"with {rule_words(r)}: {last_line(rows, r)}")
    print(last_line(rows, rule))
    return 0


def report(rows: list[dict[str, Any]], rule: str) -> None:
    """Per scenario: mean regret (under the params' rule `rule`, and under every rule), and
    what LogME said before fine-tuning; then over all runs: the τ of the models within a run,
    the τ of "does transfer pay" across runs, and what each skip rule would have saved."""
    print()
    print(
        "| scenario | runs | mean regret pt | mean vs scratch pt | mean regret per rule pt ("
        + ", ".join(RULES)
        + ") | ΔLogME source − random | Δacc best transfer − scratch pt "
        + "| skip rule fires (logme / probe) |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        rs = [r for r in rows if r["scenario"] == scenario]
        print(
            f"| {scenario} | {len(rs)} | {statistics.mean(r[rule][0] for r in rs):.2f} "
            f"| {statistics.mean(r[rule][1] for r in rs):+.2f} "
            f"| {' '.join(f'{statistics.mean(r[x][0] for r in rs):.2f}' for x in RULES)} "
            f"| {statistics.mean(r['gaps'][0] for r in rs):+.3f} "
            f"| {100 * statistics.mean(r['gaps'][1] for r in rs):+.1f} "
            f"| {' / '.join(str(sum(r['skip'][k][0] > 0 for r in rs)) for k in SKIP_RULES)} "
            f"of {len(rs)} |"
        )
    finite = [r["tau"] for r in rows if r["tau"] == r["tau"]]
    if finite:
        print(
            f"Kendall τ(LogME, test accuracy) among the models of a run (strategies share the "
            f"source's score): mean {statistics.mean(finite):+.2f} over {len(finite)} runs"
        )
    dl, da = [r["gaps"][0] for r in rows], [r["gaps"][1] for r in rows]
    if len(rows) > 1:
        agree = sum((a > 0) == (b > 0) for a, b in zip(dl, da, strict=True))
        archs = sorted({r["arch"] for r in rows})
        print(
            f"Kendall τ(ΔLogME, Δaccuracy) across runs, scenarios and backbones "
            f"({', '.join(archs)}): {kendall_tau(dl, da):+.2f} over {len(rows)} runs "
            f"(goal ≥ 0.6); the sign of "
            f"ΔLogME matches whether transfer beat scratch on test in {agree} of {len(rows)}"
        )
    total = sum(r["seconds"] for r in rows)
    for skip, what in SKIP_RULES.items():
        fits = sum(r["skip"][skip][0] for r in rows)
        secs = sum(r["skip"][skip][1] for r in rows)
        lost = [r["skip"][skip][2] for r in rows if r["skip"][skip][0]]
        worst = f"; best skipped model vs shipped: max {max(lost):+.1f} pt" if lost else ""
        print(
            f"skip rule {skip} ({what}) from these runs' scores: fires in {len(lost)} of "
            f"{len(rows)} runs, {fits} fits skipped, {secs:.0f} of {total:.0f} s of fine-tuning "
            f"saved{worst}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
