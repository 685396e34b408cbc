"""Does the pipeline ship the right model? Selection regret over seeds and scenarios.

    python benchmarks/selection.py --scenarios default --seeds 0 1 2 3 4 --budget reduced
    python benchmarks/selection.py --quick          # a smoke run: 1 scenario, 1 seed, tiny

For each scenario and seed the steps run as the pipeline runs them: prepare (the seed draws
which target images are labelled), finetune for scratch and every strategy (with the default
selection: k-fold cross-validation over target train + val when validation is small), and
evaluate, which picks the model to ship without looking at test. The source model is
pretrained once per scenario (its source split does not depend on the target draw).

Prints, per run, the shipped model's test accuracy against the hindsight-best model's (the
best on test, which no pipeline can know) and against scratch; per scenario the mean regret;
the Kendall τ (tau-b) between each model's LogME score (computed before fine-tuning: the
source features for the transfer strategies, the random init for scratch) and its fine-tuned
test accuracy; and ends with the line

    selection regret mean = X pt; shipped below scratch by > 1 pt in N of M runs

Budgets: `full` = the scenario's own params; `reduced` = pretrain 1 epoch on at most 1 000
source images per class, fine-tune 10 epochs (probe 5), strategies linear_probe, full and
lp_ft; the table states which was used. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tlpipe.fsio import read_json
from tlpipe.params import EvaluateConfig
from tlpipe.params.fields import merge
from tlpipe.params.resolver import read_params, resolve
from tlpipe.steps import evaluate, fetch, finetune, prepare, pretrain

REPO = Path(__file__).resolve().parents[1]
# name → (preset, overrides): the presets, and the problems that need only Fashion-MNIST
SCENARIOS: dict[str, tuple[Path, dict[str, Any]]] = {
    "default": (REPO / "params.yaml", {}),  # Fashion-MNIST 0-4 → 5-9, k = 5
    "mixed-source": (REPO / "scenarios/mixed-source.yaml", {}),
    "fashion-k20": (REPO / "params.yaml", {"prepare": {"target": {"k": 20}}}),
}
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {},
    "reduced": {
        "prepare": {"source": {"max_per_class": 1000}},
        "pretrain": {"train": {"epochs": 1}},
        "finetune": {"train": {"epochs": 10}, "probe": {"epochs": 5}},
        "strategies": ["linear_probe", "full", "lp_ft"],
    },
    "quick": {
        "prepare": {"source": {"max_per_class": 100}},
        "pretrain": {"train": {"epochs": 1}},
        "finetune": {"train": {"epochs": 2}, "probe": {"epochs": 1}},
        "strategies": ["linear_probe"],
    },
}


def run_once(params: dict, raw: Path, source: Path, work: Path, seed: int) -> dict[str, Any]:
    """Prepare with `seed`, fine-tune scratch and every strategy, evaluate: metrics.json."""
    seeded = {"train": {"seed": seed}, "probe": {"seed": seed}}
    resolved = resolve(merge(params, {"prepare": {"seed": seed}, "finetune": seeded}))
    prep = work / f"prep-s{seed}"
    if not prep.exists():
        prepare.run(raw, prep, resolved["prepare"])
    paths = {}
    for name in ("scratch", *resolved.strategies):
        paths[name] = work / f"models-s{seed}" / f"{name}.pt"
        if not paths[name].exists():
            finetune.run(prep, source, paths[name], resolved["finetune"].for_strategy(name))
    out = work / f"eval-s{seed}"
    evaluate.run(prep, paths, out, EvaluateConfig(plots=False))
    return read_json(out / "metrics.json")


def kendall_tau(metrics: dict[str, Any]) -> float:
    """tau-b between the models' LogME scores and their test accuracies (nan if undefined)."""
    from scipy.stats import kendalltau

    models = [m for m in metrics["models"].values() if m.get("logme") is not None]
    tau = kendalltau([m["logme"] for m in models], [m["accuracy"] for m in models]).statistic
    return float(tau)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--budget", choices=list(BUDGETS), default="reduced")
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    ap.add_argument("--quick", action="store_true", help="budget quick, default scenario, seed 0")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.scenarios, args.seeds = "quick", ["default"], [0]
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-selection-"))
    t0 = time.perf_counter()
    rows, taus = [], []
    print(f"budget: {args.budget} {BUDGETS[args.budget]}", flush=True)
    print(
        "| scenario | seed | shipped | shipped acc | best (hindsight) | best acc | scratch acc "
        "| regret pt | vs scratch pt | verdict | LogME τ |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|")
    for scenario in args.scenarios:
        preset, over = SCENARIOS[scenario]
        params = merge(merge(read_params(preset), over), BUDGETS[args.budget])
        sdir = work / scenario
        sdir.mkdir(parents=True, exist_ok=True)
        raw, source = sdir / "raw", sdir / "source.pt"
        if not raw.exists():
            fetch.run(resolve(params)["fetch"], raw)
        if not source.exists():
            prepare.run(raw, sdir / "prep-source", resolve(params)["prepare"])
            pretrain.run(sdir / "prep-source", source, resolve(params)["pretrain"])
        for seed in args.seeds:
            m = run_once(params, raw, source, sdir, seed)
            acc = {n: v["accuracy"] for n, v in m["models"].items()}
            best = max(acc, key=acc.get)
            shipped, scratch = acc[m["selected"]], acc[m["baseline"]]
            regret, vs = 100 * (acc[best] - shipped), 100 * (shipped - scratch)
            tau = kendall_tau(m)
            rows.append({"scenario": scenario, "regret": regret, "vs_scratch": vs})
            taus.append(tau)
            verdict = "helped" if m["transfer_helped"] else "tie" if m.get("tie") else "scratch"
            print(
                f"| {scenario} | {seed} | {m['selected']} | {100 * shipped:.1f} | {best} "
                f"| {100 * acc[best]:.1f} | {100 * scratch:.1f} | {regret:.1f} | {vs:+.1f} "
                f"| {verdict} | {tau:+.2f} |",
                flush=True,
            )
    print()
    for scenario in args.scenarios:
        r = [row["regret"] for row in rows if row["scenario"] == scenario]
        print(f"{scenario}: mean regret {statistics.mean(r):.2f} pt over {len(r)} seeds")
    finite = [t for t in taus if t == t]
    if finite:
        print(
            f"Kendall τ(LogME, fine-tuned test accuracy) over the models of each run: mean "
            f"{statistics.mean(finite):+.2f} ({len(finite)} runs; goal ≥ 0.6)"
        )
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")
    below = sum(row["vs_scratch"] < -1 for row in rows)
    regret = statistics.mean(row["regret"] for row in rows)
    print(
        f"selection regret mean = {regret:.2f} pt; shipped below scratch by > 1 pt in "
        f"{below} of {len(rows)} runs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
