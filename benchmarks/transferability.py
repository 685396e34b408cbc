"""Does LogME rank pretrained starting points? Kendall τ across a small model zoo, per target.

    python benchmarks/transferability.py --work W     # W may be selection.py's work folder
    python benchmarks/transferability.py --quick      # a smoke run: 1 draw, 2 starts, tiny

LogME (You et al., 2021) was made to rank *pretrained* models for a target before fine-tuning
them. This asks that question on the selection benchmark's data: targets = the `default`
(Fashion-MNIST 5-9, 5 labelled a class) and `fashion-k20` (20 a class) scenarios, seeds 0-4
(the same labelled draws as benchmarks/selection.py); starting points, all small_cnn at 28 px:
the source models of the scenarios `default` (Fashion-MNIST 0-4, 4 epochs), `mixed-source`
(0-4 with a shifted part) and `digits-to-fashion` (scikit-learn's digits), Fashion-MNIST 0-4
pretrained for 1 epoch only, and random init. For each draw and start: LogME of the starting
features on the labelled images (what the finetune step logs), and the test accuracy after
`linear_probe` and after `full` fine-tuning (the reduced budget of selection.py, trained on
target train, no CV; random init's `full` is scratch; it has no probe). Prints per draw
τ(LogME, test accuracy) across the starts, per strategy, and the mean over draws. Sources are
pretrained (or reused) under W as selection.py does. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tlpipe.data.prepared import load_split
from tlpipe.fsio import read_json, write_json
from tlpipe.params.fields import merge
from tlpipe.params.resolver import resolve
from tlpipe.steps import fetch, finetune, prepare, pretrain
from tlpipe.train.loop import accuracy
from tlpipe.train.models import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from selection import BUDGETS, kendall_tau, scenario_params  # noqa: E402

TARGETS = ("default", "fashion-k20")
# start → (scenario whose source model it is, pretrain overrides); None: random init
STARTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "fashion-0-4": ("default", {}),
    "fashion-0-4-1-epoch": ("default", {"pretrain": {"train": {"epochs": 1}}}),
    "mixed-source": ("mixed-source", {}),
    "digits": ("digits-to-fashion", {}),
    "random-init": None,
}
STRATEGIES = ("linear_probe", "full")


def source_model(work: Path, start: str, budget: str) -> Path | None:
    """The start's pretrained checkpoint under `work` (pretrained here when absent)."""
    if STARTS[start] is None:
        return None
    scenario, over = STARTS[start]
    sdir = work / scenario
    sdir.mkdir(parents=True, exist_ok=True)
    params = merge(scenario_params(scenario, budget, sdir), over)
    raw = sdir / "raw"
    out = sdir / ("source.pt" if not over else f"source-{start}.pt")
    if not raw.exists():
        fetch.run(resolve(params)["fetch"], raw)
    if not out.exists():
        if not (sdir / "prep-source").exists():
            prepare.run(raw, sdir / "prep-source", resolve(params)["prepare"])
        pretrain.run(sdir / "prep-source", out, resolve(params)["pretrain"])
    return out


def target_draw(work: Path, target: str, seed: int, budget: str) -> tuple[Path, Any]:
    """The prepared target draw `seed` of scenario `target` and its finetune settings."""
    sdir = work / target
    sdir.mkdir(parents=True, exist_ok=True)
    params = scenario_params(target, budget, sdir)
    seeded = {"train": {"seed": seed}, "probe": {"seed": seed}, "selection": {"min_val": 0}}
    resolved = resolve(merge(params, {"prepare": {"seed": seed}, "finetune": seeded}))
    raw, prep = sdir / "raw", sdir / f"prep-s{seed}"
    if not raw.exists():
        fetch.run(resolved["fetch"], raw)
    if not prep.exists():
        prepare.run(raw, prep, resolved["prepare"])
    return prep, resolved["finetune"]


def test_accuracy(prepared: Path, model_path: Path) -> float:
    """The checkpoint's accuracy on the draw's target test split."""
    model, meta = load_checkpoint(model_path)
    test = load_split(prepared, "target_test")
    return accuracy(model, test.x, test.y, mean=meta.mean, std=meta.std)


def run_draw(work: Path, target: str, seed: int, starts: list[str], budget: str) -> dict:
    """{start: {"logme": …, strategy: test accuracy}} for one target draw (cached)."""
    prep, cfg = target_draw(work, target, seed, budget)
    out_dir = work / "zoo" / f"{target}-s{seed}"
    cache = out_dir / "results.json"
    results = read_json(cache) if cache.exists() else {}
    for start in starts:
        source = source_model(work, start, budget)
        row = results.setdefault(start, {})
        for strategy in STRATEGIES:
            if strategy in row or (source is None and strategy == "linear_probe"):
                continue
            name = "scratch" if source is None else strategy
            out = out_dir / f"{start}-{strategy}.pt"
            res = finetune.run(prep, source, out, cfg.for_strategy(name))
            row["logme"] = res.metrics["logme"]
            row[strategy] = test_accuracy(prep, out)
            write_json(cache, results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--budget", choices=list(BUDGETS), default="reduced")
    ap.add_argument("--work", type=Path, default=None, help="sources and draws (reused)")
    ap.add_argument("--quick", action="store_true", help="1 draw, 2 starts, budget quick")
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.seeds = ["default"], [0]
        args.starts, args.budget = ["fashion-0-4", "random-init"], "quick"
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-transferability-"))
    t0 = time.perf_counter()
    print(f"budget: {args.budget}; starts: {', '.join(args.starts)}")
    print("| target | seed | start | LogME | " + " | ".join(STRATEGIES) + " |")
    print("|---|---:|---|---:|" + "---:|" * len(STRATEGIES))
    taus: dict[str, dict[str, list[float]]] = {t: {s: [] for s in STRATEGIES} for t in args.targets}
    for target in args.targets:
        for seed in args.seeds:
            rows = run_draw(work, target, seed, args.starts, args.budget)
            for start in args.starts:
                r = rows[start]
                accs = " | ".join(f"{100 * r[s]:.1f}" if s in r else "–" for s in STRATEGIES)
                print(f"| {target} | {seed} | {start} | {r['logme']:+.3f} | {accs} |", flush=True)
            for strategy in STRATEGIES:
                have = [rows[s] for s in args.starts if strategy in rows[s]]
                if len(have) > 1:
                    tau = kendall_tau([r["logme"] for r in have], [r[strategy] for r in have])
                    taus[target][strategy].append(tau)
    print()
    for target, per in taus.items():
        for strategy, ts in per.items():
            finite = [t for t in ts if t == t]
            if finite:
                print(
                    f"{target}, {strategy}: Kendall τ(LogME, test accuracy) across starting "
                    f"points, mean {statistics.mean(finite):+.2f} over {len(finite)} draws "
                    f"(per draw: {' '.join(f'{t:+.2f}' for t in ts)})"
                )
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
