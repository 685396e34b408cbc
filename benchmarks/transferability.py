"""Do LogME and five other transferability estimators rank starting points? Kendall τ.

    python benchmarks/transferability.py --work W     # W may be selection.py's work folder
    python benchmarks/transferability.py --quick      # a smoke run: 1 draw, 3 starts, tiny

LogME (You et al., 2021) was made to rank *pretrained* models for a target before fine-tuning
them. This asks that question on the selection benchmark's data: targets = the `default`
(Fashion-MNIST 5-9, 5 labelled a class) and `fashion-k20` (20 a class) scenarios, seeds 0-4
(the same labelled draws as benchmarks/selection.py); starting points, all small_cnn at 28 px:
the source models of the scenarios `default` (Fashion-MNIST 0-4, 4 epochs), `mixed-source`
(0-4 with a shifted part) and `digits-to-fashion` (scikit-learn's digits), Fashion-MNIST 0-4
pretrained for 1 epoch only, and random init; and, for a zoo with a wider spread of quality,
three weaker sources of the same dataset: Fashion-MNIST classes 0-1 only, classes 2-4 only,
and 0-4 with 50 images a class (`--starts` picks a subset: the first five are the first zoo,
measured alone before). For each draw and start: LogME of the starting
features on the labelled images (what the finetune step logs), and the test accuracy after
`linear_probe` and after `full` fine-tuning (the reduced budget of selection.py, trained on
target train, no CV; random init's `full` is scratch; it has no probe; the probe is solved,
`finetune.probe_solver`, as the pipeline's default). Prints τ(score, test
accuracy) across the starts, per strategy, as the mean over draws. Sources are pretrained (or
reused) under W as selection.py does.

Besides LogME (what the pipeline logs), six other estimators score the same features, so the
question is not LogME's alone: LEEP (Nguyen et al., 2020; the start's own head as the "source
labels"), NLEEP (Li et al., 2021; a Gaussian mixture on PCA'd features instead of the head),
H-score with shrinkage (Bao et al., 2019; Ibrahim et al., 2022), two plain baselines:
leave-one-out 1-nearest-neighbour and nearest-class-mean accuracy (cosine), and a
cross-validated linear probe (logistic regression on the fixed features, Kornblith et al.,
2019). Each gets its τ.

Across runs (the issue's reading): where W also holds benchmarks/selection.py's runs
(`<scenario>/eval-s<seed>/metrics.json`), each estimator's Δ (source − the scratch model's
random init, on the run's labelled images) is set against Δaccuracy (best transfer − scratch on
test): Kendall τ over the runs and how often the signs agree. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import Labelled, load_split
from tlpipe.fsio import read_json, write_json
from tlpipe.params.fields import merge
from tlpipe.params.resolver import resolve
from tlpipe.steps import fetch, finetune, prepare, pretrain
from tlpipe.train.logme import logme
from tlpipe.train.loop import accuracy, embed, predict
from tlpipe.train.models import build_model, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from selection import BUDGETS, kendall_tau, scenario_params, transfer_gaps  # noqa: E402

TARGETS = ("default", "fashion-k20")
# start → (scenario whose source model it is, pretrain overrides); None: random init
STARTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "fashion-0-4": ("default", {}),
    "fashion-0-4-1-epoch": ("default", {"pretrain": {"train": {"epochs": 1}}}),
    "mixed-source": ("mixed-source", {}),
    "digits": ("digits-to-fashion", {}),
    "random-init": None,
    # a wider zoo: weaker sources of the same dataset (fewer classes, fewer images)
    "fashion-0-1": ("default", {"prepare": {"source": {"classes": [0, 1]}}}),
    "fashion-2-4": ("default", {"prepare": {"source": {"classes": [2, 3, 4]}}}),
    "fashion-0-4-50-a-class": ("default", {"prepare": {"source": {"max_per_class": 50}}}),
}
STRATEGIES = ("linear_probe", "full")
ARCH = "small_cnn"  # every start of the zoo
ESTIMATORS = ("LogME", "LEEP", "NLEEP", "H-score", "kNN", "NCM", "probe-CV")  # `estimates`' keys


# ------------------------------------------------------------------ the estimators


def leep(probs: np.ndarray, y: np.ndarray) -> float:
    """LEEP: mean log p(y | x) through the empirical p(target label | "source label") of the
    soft labels `probs` (N, Z)."""
    classes = np.unique(y)
    joint = np.stack([probs[y == c].sum(0) for c in classes], 1)  # (Z, C)
    conditional = joint / np.maximum(joint.sum(1, keepdims=True), 1e-12)
    p = probs @ conditional
    return float(np.mean(np.log(p[np.arange(len(y)), np.searchsorted(classes, y)] + 1e-12)))


def nleep(f: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """NLEEP: LEEP with a diagonal Gaussian mixture (5 components a class) on the features'
    PCA (80 % of the variance, whitened) in place of the source head. Whitened: a random
    init's features are ~1e-4 in scale, where the mixture's regularisation swamps them."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    reduced = PCA(n_components=0.8, whiten=True, random_state=seed).fit_transform(f)
    k = min(5 * len(np.unique(y)), len(y) // 2)
    gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-3, random_state=seed)
    return leep(gmm.fit(reduced).predict_proba(reduced), y)


def h_score(f: np.ndarray, y: np.ndarray) -> float:
    """H-score tr(cov(f)⁻¹ cov(E[f | y])), the covariance shrunk (Ledoit-Wolf): few images."""
    from sklearn.covariance import LedoitWolf

    f = f - f.mean(0)
    class_means = np.zeros_like(f)
    for c in np.unique(y):
        class_means[y == c] = f[y == c].mean(0)
    between = class_means.T @ class_means / len(f)
    return float(np.trace(np.linalg.pinv(LedoitWolf().fit(f).covariance_) @ between))


def _unit(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def loo_knn(f: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine)."""
    sim = _unit(f) @ _unit(f).T
    np.fill_diagonal(sim, -np.inf)
    return float((y[sim.argmax(1)] == y).mean())


def loo_ncm(f: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out nearest-class-mean accuracy (cosine features, each image left out of
    its own class's mean)."""
    u, classes = _unit(f), np.unique(y)
    sums = np.stack([u[y == c].sum(0) for c in classes])
    counts = np.array([(y == c).sum() for c in classes], float)
    own = np.searchsorted(classes, y)
    means = np.repeat(sums[None], len(y), 0)  # (N, C, D): the class means each image sees
    means[np.arange(len(y)), own] -= u
    sizes = np.repeat(counts[None], len(y), 0)
    sizes[np.arange(len(y)), own] -= 1
    scores = np.einsum("nd,ncd->nc", u, means) / np.maximum(sizes, 1)
    scores[sizes == 0] = -np.inf
    return float((classes[scores.argmax(1)] == y).mean())


def probe_cv(f: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Cross-validated linear-probe accuracy: L2 logistic regression (C = 1) on the
    standardised features, stratified 5-fold (fewer where a class has fewer images) repeated
    4 times, mean held-out accuracy. The proxy of Kornblith et al. (2019): logistic regression
    on fixed features, which they found to track fine-tuned accuracy across backbones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(5, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=4, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    return float(cross_val_score(probe, f, y, cv=cv).mean())


def estimates(model: Any, mean: Any, std: Any, x: np.ndarray, y: np.ndarray) -> dict:
    """Every estimator of `model` (the starting point, its own head kept) on images `x`."""
    from scipy.special import softmax

    f = embed(model, x, mean, std).astype(np.float64)
    probs = softmax(predict(model, x, mean, std).astype(np.float64), axis=1)
    return {
        "LogME": logme(f, y),
        "LEEP": leep(probs, y),
        "NLEEP": nleep(f, y),
        "H-score": h_score(f, y),
        "kNN": loo_knn(f, y),
        "NCM": loo_ncm(f, y),
        "probe-CV": probe_cv(f, y),
    }


def start_estimates(prepared: Path, source: Path | None, arch: str, seed: int) -> dict:
    """Estimators of a start on a draw: the source checkpoint, or `arch` at random init as
    scratch starts (seed `seed`, the draw's normalisation)."""
    both = Labelled.of(load_split(prepared, "target_train"), load_split(prepared, "target_val"))
    x, y = both.x, both.y
    if source is not None:
        model, meta = load_checkpoint(source)
        return estimates(model, meta.mean, meta.std, x, y)
    m = load_manifest(prepared)
    model = build_model(arch, len(m.target_classes), m.in_chans, m.input_size, seed=seed)
    return estimates(model, m.mean, m.std, x, y)


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
    prep = sdir / ("prep-source" if "prepare" not in over else f"prep-source-{start}")
    if not out.exists():
        if not prep.exists():
            prepare.run(raw, prep, resolve(params)["prepare"])
        pretrain.run(prep, out, resolve(params)["pretrain"])
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


def run_draw(
    work: Path, target: str, seed: int, starts: list[str], budget: str, reseed: int = 0
) -> dict:
    """{start: {"scores": {estimator: …}, strategy: test accuracy}} for one draw (cached).
    `reseed` > 0: the fine-tunings again with every training seed moved by `reseed` (the same
    images; own cache, no scores), to measure how well the accuracies rank themselves."""
    prep, cfg = target_draw(work, target, seed, budget)
    out_dir = work / "zoo" / f"{target}-s{seed}"
    tag = f"-reseed{reseed}" if reseed else ""
    cache = out_dir / f"results{tag}.json"
    results = read_json(cache) if cache.exists() else {}
    for start in starts:
        source = source_model(work, start, budget)
        row = results.setdefault(start, {})
        for strategy in STRATEGIES:
            if strategy in row or (source is None and strategy == "linear_probe"):
                continue
            name = "scratch" if source is None else strategy
            out = out_dir / f"{start}-{strategy}{tag}.pt"
            finetune.run(prep, source, out, finetune.reseeded(cfg.for_strategy(name), reseed))
            row[strategy] = test_accuracy(prep, out)
            write_json(cache, results)
        if not reseed and not set(ESTIMATORS) <= set(row.get("scores", {})):
            row["scores"] = start_estimates(prep, source, ARCH, seed)
            write_json(cache, results)
    return results


def across_runs(work: Path) -> list[tuple[str, int, dict[str, float], float]]:
    """(scenario, seed, {estimator: source − random init}, Δaccuracy pt) for every run of
    benchmarks/selection.py under `work` (cached in each run's eval folder)."""
    runs = []
    for metrics_path in sorted(work.glob("*/eval-s*/metrics.json")):
        scenario, seed = metrics_path.parts[-3], int(metrics_path.parts[-2].removeprefix("eval-s"))
        cache = metrics_path.parent / "estimators.json"
        metrics = read_json(metrics_path)
        if not cache.exists() or not set(ESTIMATORS) <= set(read_json(cache)):
            prep = work / scenario / f"prep-s{seed}"
            arch = metrics["models"][metrics["baseline"]]["arch"]
            source = start_estimates(prep, work / scenario / "source.pt", arch, seed)
            random_init = start_estimates(prep, None, arch, seed)
            write_json(cache, {k: source[k] - random_init[k] for k in ESTIMATORS})
        runs.append((scenario, seed, read_json(cache), 100 * transfer_gaps(metrics)[1]))
    return runs


def zoo_arguments(doc: str, quick: str) -> argparse.ArgumentParser:
    """The options of the scripts that fine-tune the zoo's starts on target draws (this one and
    probe_solver.py, which reuses its work folder); `quick` says what --quick runs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--budget", choices=list(BUDGETS), default="reduced")
    ap.add_argument("--work", type=Path, default=None, help="sources and draws (reused)")
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = zoo_arguments(__doc__, "1 draw, 3 starts, budget quick")
    ap.add_argument(
        "--reseed",
        type=int,
        default=0,
        help="fine-tune every start again with the training seeds moved by this much and print\n"
        "τ(accuracy, accuracy again): how well the ranking reproduces itself, the ceiling of\n"
        "any estimator's τ (twice the fine-tuning time)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.seeds = ["default"], [0]
        args.starts, args.budget = ["fashion-0-4", "fashion-0-1", "random-init"], "quick"
    work = args.work or Path(tempfile.mkdtemp(prefix="tlpipe-transferability-"))
    t0 = time.perf_counter()
    print(f"budget: {args.budget}; starts: {', '.join(args.starts)}")
    print("| target | seed | start | " + " | ".join((*ESTIMATORS, *STRATEGIES)) + " |")
    print("|---|---:|---|" + "---:|" * (len(ESTIMATORS) + len(STRATEGIES)))
    taus: dict[tuple[str, str, str], list[float]] = {}  # (target, strategy, estimator)
    for target in args.targets:
        for seed in args.seeds:
            rows = run_draw(work, target, seed, args.starts, args.budget)
            for start in args.starts:
                r = rows[start]
                cells = [f"{r['scores'][e]:+.3f}" for e in ESTIMATORS]
                cells += [f"{100 * r[s]:.1f}" if s in r else "–" for s in STRATEGIES]
                print(f"| {target} | {seed} | {start} | " + " | ".join(cells) + " |", flush=True)
            for strategy in STRATEGIES:
                have = [rows[s] for s in args.starts if strategy in rows[s]]
                for e in ESTIMATORS if len(have) > 1 else ():
                    tau = kendall_tau([r["scores"][e] for r in have], [r[strategy] for r in have])
                    taus.setdefault((target, strategy, e), []).append(tau)
            if args.reseed:
                again = run_draw(work, target, seed, args.starts, args.budget, args.reseed)
                for strategy in STRATEGIES:
                    have = [s for s in args.starts if strategy in rows[s]]
                    first = [rows[s][strategy] for s in have]
                    tau = kendall_tau(first, [again[s][strategy] for s in have])
                    taus.setdefault((target, strategy, "reseeded"), []).append(tau)
    columns = (*ESTIMATORS, "reseeded") if args.reseed else ESTIMATORS
    print("\nKendall τ(estimator, test accuracy) across starting points, mean over draws")
    if args.reseed:
        print("(reseeded: the accuracies of the same fine-tunings with other seeds, the ceiling)")
    print("\n| target | strategy | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for target in args.targets:
        for strategy in STRATEGIES:
            cells = [_mean(taus.get((target, strategy, e), [])) for e in columns]
            print(f"| {target} | {strategy} | " + " | ".join(cells) + " |")
    runs = across_runs(work)
    if runs:
        gains = [r[3] for r in runs]
        print(f"\nAcross the {len(runs)} runs of benchmarks/selection.py under {work}:")
        print("Kendall τ(Δestimator source − random init, Δaccuracy best transfer − scratch):\n")
        print("| estimator | τ | sign agrees |\n|---|---:|---:|")
        for e in ESTIMATORS:
            deltas = [r[2][e] for r in runs]
            agree = sum((d > 0) == (g > 0) for d, g in zip(deltas, gains, strict=True))
            print(f"| {e} | {kendall_tau(deltas, gains):+.2f} | {agree} of {len(runs)} |")
    print(f"total {time.perf_counter() - t0:.0f} s; files in {work}")
    return 0


def _mean(ts: list[float]) -> str:
    finite = [t for t in ts if t == t]  # a draw whose accuracies all tie has no τ
    return f"{statistics.mean(finite):+.2f}" if finite else "–"


if __name__ == "__main__":
    raise SystemExit(main())
