"""Target test accuracy of every transfer strategy vs the from-scratch baseline.

    python benchmarks/transfer_table.py [--ks 5 20 100] [--seeds 0 1 2] [--params params.yaml]

One source model is pretrained (params.yaml `pretrain:`) on the default scenario. Then, for
each k (labelled target images per class) and seed (which target images are labelled, and
the fine-tune seed), the source is matched to that target (params.yaml `match:`, for
`joint`), every strategy is fine-tuned with params.yaml `finetune:` and scored on the target
test split. Hyperparameters are never chosen on test: `finetune:` was set by
target-validation accuracy only. Prints a Markdown table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.params.fields import build
from tlpipe.params.resolver import read_params, resolve
from tlpipe.steps import fetch, finetune, match, prepare, pretrain
from tlpipe.train.loop import accuracy
from tlpipe.train.models import load_checkpoint

STRATEGIES = {  # name → (strategy, extra finetune params)
    "scratch": ("scratch", {}),
    "linear_probe": ("linear_probe", {}),
    "partial": ("partial", {}),
    "full": ("full", {}),
    "lp_ft": ("lp_ft", {}),
    "full + L2-SP": ("full", {"l2sp": 0.01}),
    "joint": ("joint", {}),  # co-trains on the matched source (`match` output)
}


def scores(prepared: Path, model_path: Path) -> tuple[float, float]:
    """(target test accuracy, target validation accuracy)."""
    model, meta = load_checkpoint(model_path)
    test, val = load_split(prepared, "target_test"), load_split(prepared, "target_val")
    acc = lambda s: accuracy(model, s.x, s.y, mean=meta.mean, std=meta.std)  # noqa: E731
    return acc(test), acc(val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 20, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    args = ap.parse_args()
    params = read_params(args.params)
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-transfer-"))
    raw = work / "raw"
    if not raw.exists():
        fetch.run(resolve(params)["fetch"], raw)
    base = resolve(params)["prepare"]
    t0 = time.perf_counter()
    source = work / "source.pt"
    if source.exists():  # --work of an earlier run: reuse its source model
        print(f"reusing {source}", flush=True)
    else:
        prepare.run(raw, work / "prep-source", base)
        cfg = resolve(params)["pretrain"]
        pretrain.run(work / "prep-source", source, cfg)
        print(f"pretrained in {time.perf_counter() - t0:.0f} s", flush=True)
    ft = params.get("finetune") or {}
    names = [*STRATEGIES, "selected by val"]
    results: dict[str, dict[int, list[float]]] = {n: {k: [] for k in args.ks} for n in names}
    for k in args.ks:
        for seed in args.seeds:
            prep = work / f"prep-k{k}-s{seed}"
            over = [
                f"prepare.target.k={k}",
                "prepare.target.val_per_class=5",
                f"prepare.seed={seed}",
            ]
            prepare.run(raw, prep, resolve(params, over)["prepare"])
            assert (
                load_manifest(prep).source_classes
                == load_manifest(work / "prep-source").source_classes
            )
            matched = work / f"match-k{k}-s{seed}"
            if not (matched / "report.json").exists():
                match.run(prep, source, matched, resolve(params)["match"])
            val_acc: dict[str, float] = {}
            for name, (strategy, extra) in STRATEGIES.items():
                seeded = {**ft, **extra, "strategy": strategy}
                for section in ("train", "probe"):
                    seeded[section] = {**(ft.get(section) or {}), "seed": seed}
                cfg = build(finetune.FinetuneConfig, seeded).for_strategy(strategy)
                out = work / f"k{k}-s{seed}-{name}.pt"
                if not out.exists():  # --work of an interrupted run: keep what it finished
                    finetune.run(prep, source, out, cfg, match_dir=matched)
                test_acc, val_acc[name] = scores(prep, out)
                results[name][k].append(test_acc)
                print(f"k={k} seed={seed} {name}: test {test_acc:.4f} val {val_acc[name]:.3f}")
            # what the pipeline ships: the transfer strategy with the best validation accuracy
            chosen = max((n for n in STRATEGIES if n != "scratch"), key=lambda n: val_acc[n])
            results["selected by val"][k].append(results[chosen][k][-1])
    print_table(results, args.ks, len(args.seeds))
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")


def print_table(results: dict[str, dict[int, list[float]]], ks: list[int], n_seeds: int) -> None:
    def fmt(v: list[float]) -> str:
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{100 * statistics.mean(v):.1f} ± {100 * sd:.1f}"

    print(f"\nTarget test accuracy (%), mean ± std over {n_seeds} seeds\n")
    print("| strategy | " + " | ".join(f"k = {k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name, by_k in results.items():
        print(f"| {name} | " + " | ".join(fmt(by_k[k]) for k in ks) + " |")
    scratch = {k: statistics.mean(results["scratch"][k]) for k in ks}
    for label in ("selected by val", None):
        names = (
            [label] if label else [n for n in results if n not in ("scratch", "selected by val")]
        )
        best = {k: max(names, key=lambda n: statistics.mean(results[n][k])) for k in ks}
        cells = [f"{100 * (statistics.mean(results[best[k]][k]) - scratch[k]):+.1f}" for k in ks]
        if not label:
            cells = [f"{c} ({best[k]})" for c, k in zip(cells, ks, strict=True)]
        title = "selected by val − scratch" if label else "best (by test mean) − scratch"
        print(f"| {title} (points) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
