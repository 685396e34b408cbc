"""The linear probe: trained by SGD (`probe_solver: sgd`) or solved (`lbfgs`), side by side.

    python benchmarks/probe_solver.py --work W     # W: transferability.py's work folder
    python benchmarks/probe_solver.py --quick      # a smoke run: 1 draw, 2 starts, tiny

For every draw of benchmarks/transferability.py's targets (`default`: 5 labelled images a
class, `fashion-k20`: 20) and every start that has a source model, `linear_probe` and `lp_ft`
are fine-tuned with each solver (everything else as the scenario sets it; selection by target
val, no CV). Prints mean target-val accuracy (what a choice between the solvers may look at)
and test accuracy (reported, never used to choose), and the draws where the solved probe was
better / worse on val. Results: benchmarks/README.md, "The linear probe, solved".
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from tlpipe.fsio import read_json, write_json
from tlpipe.steps import finetune

sys.path.insert(0, str(Path(__file__).parent))
from transferability import (  # noqa: E402
    STARTS,
    source_model,
    target_draw,
    test_accuracy,
    zoo_arguments,
)

SOLVERS = ("sgd", "lbfgs")
STRATEGIES = ("linear_probe", "lp_ft")


def run(work: Path, targets, seeds, starts, budget: str) -> dict[str, dict[str, float]]:
    """{"target|seed|start|strategy|solver": {val, test, seconds}} (cached under `work`)."""
    cache = work / "probe-solver" / "results.json"
    results = read_json(cache) if cache.exists() else {}
    for target in targets:
        for seed in seeds:
            prep, cfg = target_draw(work, target, seed, budget)
            for start in (s for s in starts if STARTS[s] is not None):
                source = source_model(work, start, budget)
                for strategy in STRATEGIES:
                    for solver in SOLVERS:
                        key = f"{target}|{seed}|{start}|{strategy}|{solver}"
                        if key in results:
                            continue
                        c = dataclasses.replace(cfg.for_strategy(strategy), probe_solver=solver)
                        out = cache.parent / f"{key.replace('|', '-')}.pt"
                        r = finetune.run(prep, source, out, c)
                        results[key] = {
                            "val": r.metrics["target_val_accuracy"],
                            "test": test_accuracy(prep, out),
                            "seconds": r.metrics["train_seconds"],
                        }
                        write_json(cache, results)
    return results


def table(results: dict[str, dict[str, float]], targets) -> list[str]:
    rows = [
        "| target | strategy | draws × starts | val SGD | val solved | Δ val | test SGD |"
        " test solved | Δ test | solved better / worse on val |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in (*targets, None) if len(targets) > 1 else targets:
        for strategy in STRATEGIES:
            pairs = [
                (v, results[k.replace("|sgd", "|lbfgs")])
                for k, v in results.items()
                if k.endswith(f"|{strategy}|sgd")
                and k.replace("|sgd", "|lbfgs") in results
                and (target is None or k.startswith(f"{target}|"))
            ]
            if not pairs:
                continue

            def mean(split: str, i: int, pairs=pairs) -> float:
                return 100 * statistics.mean(p[i][split] for p in pairs)

            better = sum(b["val"] > a["val"] for a, b in pairs)
            worse = sum(b["val"] < a["val"] for a, b in pairs)
            rows.append(
                f"| {target or 'both'} | {strategy} | {len(pairs)} | {mean('val', 0):.1f} | "
                f"{mean('val', 1):.1f} | {mean('val', 1) - mean('val', 0):+.1f} | "
                f"{mean('test', 0):.1f} | {mean('test', 1):.1f} | "
                f"{mean('test', 1) - mean('test', 0):+.1f} | {better} / {worse} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = zoo_arguments(__doc__, "1 draw, 2 starts, budget quick")
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.seeds = ["default"], [0]
        args.starts, args.budget = ["fashion-0-4", "fashion-0-1"], "quick"
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-probe-solver-"))
    results = run(work, args.targets, args.seeds, args.starts, args.budget)
    print("\n".join(table(results, args.targets)))
    print(f"files in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
