"""Sample matching: selection precision, weighting speed, and what joint fine-tuning gains.

    .venv/bin/python benchmarks/matching.py [--seeds 0 1 2] [--work DIR] [--quick]
        [--scenarios default mixed-source] [--pretrain-epochs N] [--finetune-epochs N]
        [--threads 1] [--no-skada]
    .venv/bin/python benchmarks/matching.py --precision-only    # selection precision only

--precision-only: mixed-source and shifts no preset names (`SHIFTS`: blur + noise, rotation
by 90° and 30°, low contrast; half of the source shifted like the target, the presets'
defaults otherwise), each seed prepared, pretrained and embedded; every matcher's selection
precision per seed. No fine-tuning (`make bench-matching`; timings in benchmarks/README.md).

For each scenario (params.yaml = default, scenarios/mixed-source.yaml) and seed (the
prepare seed, the pretrain seed and the fine-tune seed): prepare, pretrain, embed once, weight
the source with every matcher, then fine-tune `full`, `joint` (+uniform, +discriminator, +knn
weights) and `specialist` (+uniform, +discriminator) and score each on the target *test*
split. On mixed-source the ground truth (which source images are shifted) also serves as a
selection, `+oracle`: the ceiling any matcher could reach; `+anti` selects the clean half
instead, the control that shows whether the selection matters at all. Nothing is chosen on
test: the presets' settings were picked on target-validation accuracy of separate seeds.

Then, on the mixed-source embeddings (seed 0): selection precision and time of our matchers
beside skada's reweighting estimators (`pip install skada`, the `bench` extra) on the same
embeddings, KMM at 5 000 source samples; and the time to weight the full-size source
(prepare.source.max_per_class: null, about 28 500 images), embedding timed separately.

Everything is cached under --work (default /tmp/tlpipe-matching-bench): a re-run skips what
is done, so scenarios and seeds can run as separate processes (`--scenarios default`,
`--scenarios mixed-source --seeds 3 4`); each run prints its accuracy and matcher tables, and
a plain run (both scenarios) adds skada and the full-size timing. --quick is a smoke run (1
seed, 300 source images per class, 1-2 epochs). --threads 1 (default): on a shared 2-core box
one torch thread per process trains much faster than two (measured: benchmarks/README.md).
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.fsio import write_json
from tlpipe.match import matchers, ratio
from tlpipe.params.fields import merge
from tlpipe.params.resolver import read_params, resolve
from tlpipe.steps import fetch, finetune, match, prepare, pretrain
from tlpipe.train.loop import accuracy
from tlpipe.train.models import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"default": ROOT / "params.yaml", "mixed-source": ROOT / "scenarios/mixed-source.yaml"}
# Shifts no preset names: mixed-source (half of the source shifted like the whole target) with
# another `prepare.shift`; the presets' defaults otherwise. The first three were picked before
# any was measured; rotate-30 was added after rotate-90 missed (benchmarks/README.md: a 90°
# turn makes the target's wide shoes and bags as tall as the clean source's dresses).
SHIFTS = {
    "blur+noise": [{"op": "gaussian_blur", "sigma": 1.5}, {"op": "noise", "std": 0.3}],
    "rotate-90": [{"op": "rotate", "degrees": 90}],
    "low-contrast": [{"op": "contrast", "factor": 0.4}],
    "rotate-30": [{"op": "rotate", "degrees": 30}],
}
VARIANTS = {  # name → (strategy, matcher whose weights joint uses)
    "full": ("full", None),
    "joint+uniform": ("joint", "uniform"),
    "joint+discriminator": ("joint", "discriminator"),
    "joint+knn": ("joint", "knn"),
    "specialist+uniform": ("specialist", "uniform"),
    "specialist+discriminator": ("specialist", "discriminator"),
    # the ceiling: the ground-truth shifted images as the selection (mixed-source only)
    "joint+oracle": ("joint", "oracle"),
    "specialist+oracle": ("specialist", "oracle"),
    # the control: the *wrong* half, only the clean source images (mixed-source only)
    "joint+anti": ("joint", "anti"),
}
MATCHER_NAMES = ("discriminator", "knn", "class", "uniform")


def section(params: dict, name: str, over: dict) -> dict:
    return {**params, name: merge(dict(params.get(name) or {}), over)}


def prepared_and_model(work: Path, params: dict, seed: int, args) -> tuple[Path, Path]:
    """Prepare + pretrain one (scenario, seed), cached."""
    prep_over = {"seed": seed} | ({"source": {"max_per_class": 300}} if args.quick else {})
    prepared, model = work / "prepared", work / "source.pt"
    if not prepared.exists():
        cfg = resolve(section(params, "prepare", prep_over))["prepare"]
        prepare.run(args.raw, prepared, cfg)
    if not model.exists():
        over = {"train": {"seed": seed}}
        if args.pretrain_epochs:
            over["train"]["epochs"] = args.pretrain_epochs
        cfg = resolve(section(params, "pretrain", over))["pretrain"]
        t0 = time.perf_counter()
        pretrain.run(prepared, model, cfg)
        print(f"  pretrained {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    return prepared, model


def embeddings(prepared: Path, model_path: Path, cfg: match.MatchConfig, cache: Path) -> dict:
    """Source + target (train+val) embeddings, as the match step makes them; cached."""
    if not cache.exists():
        model, meta = load_checkpoint(model_path)
        source = load_split(prepared, "source")
        target_x = np.concatenate(
            [load_split(prepared, s).x for s in ("target_train", "target_val")]
        )
        t0 = time.perf_counter()
        s = match.embed_images(model, source.x, meta.mean, meta.std, cfg.features)
        t = match.embed_images(model, target_x, meta.mean, meta.std, cfg.features)
        np.savez(
            cache,
            source=s,
            target=t,
            y=source.y,
            shifted=source.shifted,
            seconds=time.perf_counter() - t0,
        )
    z = np.load(cache)
    return {k: z[k] for k in z.files}


def weigh(emb: dict, cfg: match.MatchConfig, name: str) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    w = matchers.fit_weights(
        matchers.build_matcher(name, cfg), emb["source"], emb["target"], emb["y"]
    )
    return w, time.perf_counter() - t0


def write_match_dir(out: Path, prepared: Path, w: np.ndarray, selected: np.ndarray) -> None:
    """What `tlpipe match` writes, less the plots (the embeddings are shared across matchers)."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "weights.npy", w.astype(np.float32))
    np.save(out / "selected.npy", selected)
    write_json(out / "report.json", {"dataset_sha256": load_manifest(prepared).dataset_sha256})


def test_accuracy(prepared: Path, model_path: Path) -> float:
    model, meta = load_checkpoint(model_path)
    test = load_split(prepared, "target_test")
    return accuracy(model, test.x, test.y, mean=meta.mean, std=meta.std)


def scenario_params(scenario: str) -> dict:
    if scenario in SHIFTS:
        return section(
            read_params(SCENARIOS["mixed-source"]), "prepare", {"shift": SHIFTS[scenario]}
        )
    return read_params(SCENARIOS[scenario])


def run_seed(scenario: str, params: dict, seed: int, args) -> dict:
    """Everything for one (scenario, seed); results cached in results.json."""
    work = args.work / scenario / f"seed{seed}"
    cache = work / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    prepared, model = prepared_and_model(work, params, seed, args)
    mcfg = resolve(section(params, "match", {"seed": seed}))["match"]
    emb = embeddings(prepared, model, mcfg, work / "emb.npz")
    results["embedding_seconds"] = float(emb["seconds"])
    for name in MATCHER_NAMES:
        w, seconds = weigh(emb, mcfg, name)
        sel = matchers.select_top(w, mcfg.top_fraction, mcfg.seed)
        shifted = emb["shifted"] if emb["shifted"].any() else None
        s = matchers.summary(w, emb["y"], [str(i) for i in range(5)], shifted, sel)
        results[f"match:{name}"] = {
            "seconds": seconds,
            "ess_fraction": s["ess_fraction"],
            "precision": s.get("selection_precision"),
        }
        write_match_dir(work / f"match_{name}", prepared, w, sel)
    if emb["shifted"].any():  # the oracle knows the answer: selected = the shifted images
        shifted = emb["shifted"].astype(bool)
        for name, chosen in (("oracle", shifted), ("anti", ~shifted)):
            w = np.where(chosen, 1.0, 0.01)
            write_match_dir(work / f"match_{name}", prepared, w / w.mean(), np.flatnonzero(chosen))
    write_json(cache, results)
    if args.precision_only:
        return results
    for variant, (strategy, matcher) in VARIANTS.items():
        if variant in results or not (matcher is None or (work / f"match_{matcher}").exists()):
            continue
        over = {
            "strategy": strategy,
            "train": {"seed": seed},
            "specialist": {"seed": seed},
            "selection": {"min_val": 0},  # nothing is chosen here: no CV fits, no refit
        }
        if args.finetune_epochs:
            over["train"]["epochs"] = args.finetune_epochs
        cfg = resolve(section(params, "finetune", over))["finetune"].for_strategy(strategy)
        out = work / f"{variant}.pt"
        t0 = time.perf_counter()
        r = finetune.run(
            prepared, model, out, cfg, match_dir=work / f"match_{matcher}" if matcher else None
        )
        results[variant] = {
            "val": r.metrics["target_val_accuracy"],
            "test": test_accuracy(prepared, out),
            "seconds": time.perf_counter() - t0,
        }
        print(f"  {scenario} seed {seed} {variant}: {results[variant]}", flush=True)
        write_json(cache, results)
    write_json(cache, results)
    return results


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def accuracy_table(all_results: dict[str, list[dict]]) -> str:
    lines = ["| scenario | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for scenario, runs in all_results.items():
        cells = [mean_std([100 * r[v]["test"] for r in runs if v in r]) for v in VARIANTS]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    val = [
        f"| {scenario} (val, for reference) | "
        + " | ".join(mean_std([100 * r[v]["val"] for r in runs if v in r]) for v in VARIANTS)
        + " |"
        for scenario, runs in all_results.items()
    ]
    return "\n".join(lines + val)


def paired_table(all_results: dict[str, list[dict]]) -> str:
    """Per seed, what a selection adds over the uniform one in the same strategy (points)."""
    pairs = [
        (v, v.split("+")[0] + "+uniform")
        for v in VARIANTS
        if v.endswith(("+discriminator", "+oracle", "+anti"))
    ]
    lines = [
        "| scenario | " + " | ".join(f"{a} − uniform" for a, _ in pairs) + " |",
        "|---" * (len(pairs) + 1) + "|",
    ]
    for scenario, runs in all_results.items():
        cells = []
        for a, b in pairs:
            d = [100 * (r[a]["test"] - r[b]["test"]) for r in runs if a in r and b in r]
            cells.append(f"{mean_std(d)} ({', '.join(f'{x:+.1f}' for x in d)})" if d else "–")
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matcher_table(all_results: dict[str, list[dict]], per_seed: bool = False) -> str:
    extra = " per seed |" if per_seed else ""
    lines = [
        "| scenario | matcher | selection precision | ESS fraction | weighting s |" + extra,
        "|---|---|---|---|---|" + ("---|" if per_seed else ""),
    ]
    for scenario, runs in all_results.items():
        for name in MATCHER_NAMES:
            rows = [r[f"match:{name}"] for r in runs]
            seeds = (
                " " + ", ".join(f"{x['precision']:.3f}" for x in rows) + " |" if per_seed else ""
            )
            lines.append(
                f"| {scenario} | {name} | {mean_std([x['precision'] for x in rows])} | "
                f"{mean_std([x['ess_fraction'] for x in rows])} | "
                f"{mean_std([x['seconds'] for x in rows])} |" + seeds
            )
        n = "embedding s (separately)"
        lines.append(
            f"| {scenario} | {n} | | | {mean_std([r['embedding_seconds'] for r in runs])} |"
        )
    return "\n".join(lines)


def skada_table(emb: dict, mcfg: match.MatchConfig, n_sub: int, seed: int = 0) -> str:
    """Our matchers vs skada's reweighting adapters on the same embeddings (a source subset)."""
    import skada

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(emb["y"]), min(n_sub, len(emb["y"])), replace=False))
    s, t, y, shifted = emb["source"][idx], emb["target"], emb["y"][idx], emb["shifted"][idx]
    feats = ratio.Features(dims=s.shape[1], class_neutral=False).fit(s)  # standardise + L2
    x = np.concatenate([feats(s), feats(t)])
    domain = np.r_[np.ones(len(s), int), -2 * np.ones(len(t), int)]  # skada: >0 source, <0 target
    sub = x[rng.choice(len(x), min(len(x), 1000), replace=False)]
    sq = ((sub[:, None] - sub[None]) ** 2).sum(-1)
    gamma = 1.0 / float(np.median(sq[sq > 0]))  # RBF kernels: the median heuristic
    ours = {
        f"tlpipe {n}": lambda n=n: matchers.fit_weights(matchers.build_matcher(n, mcfg), s, t, y)
        for n in ("discriminator", "knn")
    }
    theirs = {
        "skada DiscriminatorReweight": skada.DiscriminatorReweightAdapter(),
        "skada KMMReweight": skada.KMMReweightAdapter(gamma=gamma),
        "skada KLIEPReweight": skada.KLIEPReweightAdapter(
            gamma=[gamma / 10, gamma, gamma * 10], random_state=0
        ),
        "skada NearestNeighborReweight": skada.NearestNeighborReweightAdapter(
            laplace_smoothing=True
        ),
    }
    for name, adapter in theirs.items():
        ours[name] = lambda a=adapter: a.fit(x, sample_domain=domain).compute_weights(
            x, sample_domain=domain
        )[: len(s)]
    lines = [
        f"| method ({len(s)} source, {len(t)} target) | selection precision | AUROC | seconds |",
        "|---|---|---|---|",
    ]
    times = {}
    for name, fn in ours.items():
        t0 = time.perf_counter()
        try:
            w = np.asarray(fn(), np.float64)
        except Exception as e:  # noqa: BLE001 — report a failing estimator, keep the rest
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:60]} | | |")
            continue
        times[name] = time.perf_counter() - t0
        prec = shifted[matchers.select_top(w, 0.5, seed)].mean()
        lines.append(
            f"| {name} | {prec:.3f} | {matchers.auroc(shifted, w):.3f} | {times[name]:.2f} |"
        )
    if "skada KMMReweight" in times:
        speedup = times["skada KMMReweight"] / times["tlpipe discriminator"]
        lines.append(f"\ntlpipe discriminator: {speedup:.0f}× faster than KMM at {len(s)} source.")
    return "\n".join(lines)


def full_size_timing(params: dict, model: Path, args) -> str:
    """Weights for the whole (uncapped) mixed source: ~28 500 images."""
    work = args.work / "mixed-source-full"
    prepared = work / "prepared"
    if not prepared.exists():
        over = {"source": {"max_per_class": None}, "seed": 0}
        cfg = resolve(section(params, "prepare", over))["prepare"]
        prepare.run(args.raw, prepared, cfg)
    mcfg = resolve(params)["match"]
    emb = embeddings(prepared, model, mcfg, work / "emb.npz")
    lines = [
        "| matcher | source samples | weighting s | selection precision | "
        "embedding s (separately) |",
        "|---|---|---|---|---|",
    ]
    for name in ("discriminator", "knn"):
        w, seconds = weigh(emb, mcfg, name)
        prec = emb["shifted"][matchers.select_top(w, mcfg.top_fraction)].mean()
        lines.append(
            f"| {name} | {len(w)} | {seconds:.2f} | {prec:.3f} | {float(emb['seconds']):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlpipe-matching-bench"))
    ap.add_argument("--raw", type=Path, default=None, help="raw Fashion-MNIST (default: fetch)")
    ap.add_argument(
        "--scenarios",
        nargs="+",
        default=None,
        choices=[*SCENARIOS, *SHIFTS],
        help="default: both presets; with --precision-only, mixed-source and the shifts",
    )
    ap.add_argument(
        "--precision-only",
        action="store_true",
        help="matchers' selection precision only: no fine-tuning, skada, full size",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny and 1 seed")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    ap.add_argument("--no-skada", action="store_true")
    args = ap.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    if args.quick:
        args.seeds, args.pretrain_epochs, args.finetune_epochs = [0], 1, 2
        args.work = args.work.with_name(args.work.name + "-quick")
    args.raw = args.raw or args.work / "raw"
    if not args.raw.exists():
        fetch.run(resolve({})["fetch"], args.raw)
    if args.scenarios is None:
        args.scenarios = ["mixed-source", *SHIFTS] if args.precision_only else list(SCENARIOS)
    t0 = time.perf_counter()
    all_results = {}
    for scenario in args.scenarios:
        params = scenario_params(scenario)
        all_results[scenario] = [run_seed(scenario, params, seed, args) for seed in args.seeds]
    if args.precision_only:
        print(
            f"\n## Matchers (top half by weight vs the truly shifted source images), seeds "
            f"{args.seeds}\n"
        )
        print(matcher_table(all_results, per_seed=True))
        print(f"\n(total {time.perf_counter() - t0:.0f} s)")
        return
    print(f"\n## Target test accuracy (%), mean ± std over seeds {args.seeds}\n")
    print(
        f"pretrain epochs {args.pretrain_epochs or 'as in the preset'}, fine-tune epochs "
        f"{args.finetune_epochs or 'as in the preset'}\n"
    )
    print(accuracy_table(all_results))
    print("\n## Paired by seed: a selection minus the uniform one (points; per seed)\n")
    print(paired_table(all_results))
    print("\n## Matchers (top half by weight vs the truly shifted source images)\n")
    print(matcher_table(all_results))
    if args.scenarios != list(SCENARIOS):
        return
    mixed = read_params(SCENARIOS["mixed-source"])
    seed0 = args.work / "mixed-source" / f"seed{args.seeds[0]}"
    mcfg = resolve(mixed)["match"]
    if not args.no_skada:
        print("\n## tlpipe vs skada on the same mixed-source embeddings\n")
        emb = embeddings(seed0 / "prepared", seed0 / "source.pt", mcfg, seed0 / "emb.npz")
        print(skada_table(emb, mcfg, 1000 if args.quick else 5000))
    if not args.quick:
        print("\n## Full-size mixed source\n")
        print(full_size_timing(mixed, seed0 / "source.pt", args))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
