"""Step 5: score every model on the target test split, against the from-scratch baseline.

The test split is read here and nowhere else before this step. Which model ships is chosen
by target *validation* accuracy (`selected`), never by test accuracy, with the baseline as a
candidate like any strategy: a transfer that loses to training from scratch is not shipped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.params import EvaluateConfig
from tlpipe.steps import StepResult


@dataclass(frozen=True)
class EvaluateResult(StepResult):
    """metrics.json's path and the model selected by validation; `summary` is the table."""

    metrics_path: Path
    selected: str


def classification_metrics(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    k = len(classes)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f)}
            for c, p, r, f in zip(classes, precision, recall, f1, strict=True)
        },
        "confusion": cm.tolist(),
    }


def run(
    prepared_dir: Path, models: dict[str, Path], out_dir: Path, cfg: EvaluateConfig
) -> EvaluateResult:
    """Evaluate `models` (name → checkpoint) and write metrics.json, plots and curves.csv."""
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.fsio import atomic_path, write_json

    if cfg.baseline not in models:
        raise TlpipeError(f"baseline model {cfg.baseline!r} missing: train it (finetune scratch)")
    if len(models) < 2:
        raise TlpipeError("nothing to compare: evaluate needs the baseline and ≥ 1 strategy")
    manifest = load_manifest(prepared_dir)
    test, val = load_split(prepared_dir, "target_test"), load_split(prepared_dir, "target_val")
    classes = list(manifest.target_classes)
    report, preds, histories, evidence = _score(models, test, val, classes)
    choice = select(report, cfg.baseline, evidence, cfg.on_tie, cfg.select_by, cfg.guard)
    selected, verdict = choice.selected, choice.verdict
    base = report[cfg.baseline]["accuracy"]
    gain = {
        n: round(100 * (m["accuracy"] - base), 2) for n, m in report.items() if n != cfg.baseline
    }
    out = {
        "selected": selected,
        "selected_by": choice.selected_by,
        "transfer_helped": choice.helped,
        "tie": choice.tie,
        "verdict": verdict,
        "paired": choice.paired,
        "extra_fits": choice.extra_fits,
        "baseline": cfg.baseline,
        "architectures": architectures(report, cfg.baseline),
        "test_sha256": manifest.splits["target_test"].sha256,
        "dataset_sha256": manifest.dataset_sha256,
        "models": report,
        "gain_over_scratch": gain,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "metrics.json", out)
        write_json(tmp / "evidence.json", _jsonable(evidence))
        (tmp / "selected.txt").write_text(selected + "\n")
        (tmp / "plots").mkdir()
        _write_curves(tmp / "plots" / "curves.csv", histories)
        _write_predictions(tmp / "plots" / "predictions.csv", test.y, preds[selected], classes)
        if cfg.plots:
            for name, m in report.items():
                plot_confusion(
                    tmp / "plots" / f"confusion_{name}.png",
                    m["confusion"],
                    classes,
                    f"{name}: accuracy {m['accuracy']:.3f}",
                )
    summary = {
        "selected_accuracy": report[selected]["accuracy"],
        "baseline_accuracy": base,
        "gain_points": gain.get(selected, 0.0),
        "transfer_helped": float(choice.helped),
        "extra_fits": float(choice.extra_fits),
    }
    line = f"selected {selected} (test accuracy {report[selected]['accuracy']:.4f}); {verdict}"
    return EvaluateResult(
        Path(out_dir) / "metrics.json",
        selected,
        metrics=summary,
        artifacts=(Path(out_dir),),
        summary=line,
    )


@dataclass(frozen=True)
class Choice:
    """What ships, on what evidence, and whether transfer demonstrably helped."""

    selected: str
    verdict: str
    selected_by: str
    helped: bool
    tie: bool
    paired: dict[str, Any]
    extra_fits: int


SCORES = {  # evaluate.select_by → (per-image score from (correct, p_true), unit, scale)
    "accuracy": (lambda correct, p: correct, "pt", 100.0),
    "probability": (lambda correct, p: p, "pt", 100.0),
    "log_likelihood": (lambda correct, p: np.log(np.clip(p, 1e-6, 1.0)), "nats", 1.0),
}


def per_image(evidence: dict[str, Any], by: str) -> dict[str, np.ndarray]:
    """Each model's per-image score `by` (a key of SCORES) on the evidence's images."""
    fn = SCORES[by][0]
    p_true = evidence["p_true"]
    return {n: np.asarray(fn(c, p_true[n]), float) for n, c in evidence["correct"].items()}


def select(
    report: dict[str, dict[str, Any]],
    baseline: str,
    evidence: dict[str, Any],
    on_tie: str,
    by: str,
    guard: str | None = None,
) -> Choice:
    """The model to ship, and a sentence saying whether transfer helped.

    Evidence: every model's per-image correctness and probability of the true class on the
    same labelled target images: the out-of-fold predictions of k-fold CV when finetune
    cross-validated (small validation), else target validation. The highest mean score `by`
    ships (`accuracy`: 0/1 correct; `probability`: the probability given to the true class;
    `log_likelihood`: its log); equal scores go to the higher log-likelihood on the same
    images (the lower loss), never to a name.
    The baseline is a candidate like any strategy. "Transfer helped" is said only when the
    paired 95 % bootstrap interval of (best strategy − baseline) in that score excludes 0; when
    it includes 0 the verdict is "tie", and `on_tie` says what ships: the higher estimate
    (`best`), or the baseline (a transfer ships only when it demonstrably helps). `guard`
    (a score of SCORES, or None): a transfer about to ship whose mean `guard` score is below
    the baseline's on the same images does not ship; the baseline does. What each rule costs:
    benchmarks/README.md, "Selection regret".
    """
    values = per_image(evidence, by)
    nan = float("nan")
    score = {n: float(np.mean(values[n])) if n in values else nan for n in report}
    ll = per_image(evidence, "log_likelihood")
    tiebreak = {n: float(np.mean(ll[n])) if n in ll else nan for n in report}

    def key(name: str) -> tuple[float, float, bool]:
        return score[name], tiebreak[name], name == baseline

    candidates = [n for n in report if n == baseline or not report[n].get("skipped")]
    selected = max(candidates, key=key)
    if len(candidates) == 1:
        verdict = f"transfer did NOT help: every strategy was skipped, so {baseline} ships"
        return Choice(
            selected, verdict, evidence["selected_by"], False, False, {}, evidence["extra_fits"]
        )
    best = max((n for n in candidates if n != baseline), key=key)
    _, unit, scale = SCORES[by]
    mean, lo, hi = (scale * v for v in paired_interval(values[best] - values[baseline]))
    paired = {
        "model": best,
        "vs": baseline,
        "score": by,
        "diff": round(mean, 3),
        "ci95": [round(lo, 3), round(hi, 3)],
        "unit": unit,
        "images": len(values[best]),
        "on": evidence["on"],
    }
    on, f = evidence["on"], 1 if unit == "pt" else 3  # decimals
    ci = f"{mean:+.{f}f} {unit} of {by.replace('_', ' ')}, 95% CI {lo:+.{f}f} … {hi:+.{f}f}"
    helped = selected != baseline and lo > 0
    tie = selected != baseline and not helped
    if tie and on_tie == "baseline":
        selected = baseline
    loss = _guard_loss(evidence, selected, baseline, guard)
    if loss is not None:
        verdict = (
            f"transfer did NOT help: {selected} {'beats' if helped else 'ties with'} {baseline} "
            f"({ci}) on {on} but is below it in {guard.replace('_', ' ')} ({loss}), so "
            f"{baseline} ships (evaluate.guard: {guard})"
        )
        selected, helped, tie = baseline, False, False
    elif helped:
        verdict = f"transfer helped: {best} beats {baseline} ({ci}) on {on}"
    elif tie and on_tie == "baseline":
        verdict = (
            f"tie: {best} vs {baseline} {ci} on {on}: the interval includes 0, so "
            f"{baseline} ships (evaluate.on_tie: baseline)"
        )
    elif tie:
        verdict = (
            f"tie: {best} vs {baseline} {ci} on {on}: the interval includes 0; {best} ships, "
            f"the higher estimate (evaluate.on_tie: best), NOT shown to beat {baseline}"
        )
    else:
        verdict = (
            f"transfer did NOT help: no strategy beats {baseline} on {on} (best: "
            f"{best}, {ci}), so {baseline} ships"
        )
    return Choice(
        selected, verdict, evidence["selected_by"], helped, tie, paired, evidence["extra_fits"]
    )


def _guard_loss(
    evidence: dict[str, Any], model: str, baseline: str, guard: str | None
) -> str | None:
    """How far `model` is below `baseline` in the mean `guard` score ("-2.0 pt"), or None when
    it is not below (or there is no guard, or the baseline ships anyway)."""
    if guard is None or model == baseline:
        return None
    values = per_image(evidence, guard)
    _, unit, scale = SCORES[guard]
    diff = scale * float(np.mean(values[model]) - np.mean(values[baseline]))
    return f"{diff:+.{1 if unit == 'pt' else 3}f} {unit}" if diff < 0 else None


def paired_interval(d: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, ...]:
    """Mean of the paired differences `d` and its 95 % percentile-bootstrap interval."""
    if len(d) == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def _val_evidence(
    ids: list[str], correct: dict[str, np.ndarray], p_true: dict[str, np.ndarray]
) -> dict[str, Any]:
    n = len(ids)
    return {
        "ids": ids,
        "correct": {name: np.asarray(c, float) for name, c in correct.items()},
        "p_true": {name: np.asarray(p, float) for name, p in p_true.items()},
        "on": f"target validation ({n} images)",
        "selected_by": f"target validation ({n} images; ties: log-likelihood); "
        "the baseline too; no extra fits",
        "extra_fits": 0,
    }


def _cv_evidence(cvs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Cross-validation evidence when every model has it on the same images and folds."""
    if not cvs or any(cv is None or "p_true" not in cv for cv in cvs.values()):
        return None  # (a checkpoint from before CV kept p_true is scored on validation)
    first = next(iter(cvs.values()))
    same = ("ids", "folds", "seed", "epoch_fraction", "repeats", "refit")
    if any(any(cv.get(k, 1) != first.get(k, 1) for k in same) for cv in cvs.values()):
        return None
    fits = sum(int(cv["fits"]) for cv in cvs.values())
    n, k, r = len(first["ids"]), first["folds"], first.get("repeats", 1)
    how = f"{k}-fold CV" if r == 1 else f"{r}× repeated {k}-fold CV"
    return {
        "ids": first["ids"],
        "correct": {name: np.asarray(cv["correct"], float) for name, cv in cvs.items()},
        "p_true": {name: np.asarray(cv["p_true"], float) for name, cv in cvs.items()},
        "on": f"{how} over {n} labelled target images",
        "selected_by": (
            f"{how.replace('CV', 'stratified cross-validation')} over target_train + "
            f"target_val ({n} labelled images, never test; validation is below "
            f"finetune.selection.min_val), {first['epoch_fraction']:.0%} of the epochs per "
            f"fit; ties: log-likelihood; {fits} extra fits ({k * r} per model × {len(cvs)} "
            "models)" + ("; then each model refit on all of them" if first.get("refit") else "")
        ),
        "extra_fits": fits,
    }


def architectures(report: dict[str, dict[str, Any]], baseline: str) -> str:
    """One line naming the networks compared, and whether the comparison is like for like."""
    transfer = sorted({m["arch"] for n, m in report.items() if n != baseline})
    base = report[baseline]["arch"]
    same = transfer == [base]
    how = "like for like" if same else "NOT like for like (finetune.model set to another one)"
    return f"architectures: transfer {', '.join(transfer)} vs {baseline} {base} ({how})"


def selected_model(eval_dir: Path, finetuned: Path) -> Path:
    """The checkpoint in `finetuned` of the model an evaluate run in `eval_dir` selected."""
    selected = Path(eval_dir) / "selected.txt"
    if not selected.exists():
        raise TlpipeError(f"{selected} not found: run `tlpipe evaluate` first, or pass --model")
    return Path(finetuned) / f"{selected.read_text().strip()}.pt"


def _score(
    models: dict[str, Path], test: Any, val: Any, classes: list[str]
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, list], dict[str, Any]]:
    """Test metrics + validation accuracy and loss of every model; test predictions; histories;
    the selection evidence (cross-validation if every model has it, else validation)."""
    from tlpipe.train.loop import predict, true_class_log_probability
    from tlpipe.train.models import load_checkpoint

    report: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    histories: dict[str, list] = {}
    cvs: dict[str, Any] = {}
    val_correct: dict[str, np.ndarray] = {}
    val_p_true: dict[str, np.ndarray] = {}
    nan = float("nan")
    for name, path in sorted(models.items()):
        model, meta = load_checkpoint(path)
        if list(meta.classes) != classes:
            raise TlpipeError(f"{path} predicts {list(meta.classes)}, not the target classes")
        preds[name] = predict(model, test.x, meta.mean, meta.std).argmax(1)
        val_logits = predict(model, val.x, meta.mean, meta.std)
        m = classification_metrics(test.y, preds[name], classes)
        val_correct[name] = val_logits.argmax(1) == val.y
        val_log_p = true_class_log_probability(val_logits, val.y)
        val_p_true[name] = np.exp(val_log_p)
        refit = bool((meta.selection_cv or {}).get("refit"))  # trained on train + val
        held_out = len(val) and not refit  # (a refit model's validation scores are not)
        m["val_accuracy"] = float(val_correct[name].mean()) if held_out else nan
        m["val_loss"] = float(-val_log_p.mean()) if held_out else nan
        if refit:
            m["refit"] = True
        m["arch"] = meta.arch
        m["logme"] = meta.logme
        if meta.skipped:
            m["skipped"] = meta.skipped
        cvs[name] = meta.selection_cv
        if cvs[name] is not None:
            m["cv_accuracy"] = float(cvs[name]["accuracy"])
        report[name] = m
        histories[name] = list(meta.history)
    trained = {n: cv for n, cv in cvs.items() if not report[n].get("skipped")}
    evidence = _cv_evidence(trained)
    if evidence is None:
        refit = sorted(n for n, cv in trained.items() if (cv or {}).get("refit"))
        if refit:  # validation is in their training data: it can't choose between them
            raise TlpipeError(
                f"{', '.join(refit)} trained on target_val (finetune.selection.refit) but the "
                "models' cross-validations do not pair (other folds, seeds or settings): "
                "fine-tune every model with the same finetune.selection"
            )
        evidence = _val_evidence(val.keys("target_val"), val_correct, val_p_true)
    return report, preds, histories, evidence


def _jsonable(evidence: dict[str, Any]) -> dict[str, Any]:
    """The selection evidence as JSON (evidence.json): per model, per image (`ids`), whether
    it was right and the probability it gave the true class; what `select` chose from."""
    per_model = ("correct", "p_true")
    out = {k: v for k, v in evidence.items() if k not in per_model}
    rows = {k: {n: np.round(v, 6).tolist() for n, v in evidence[k].items()} for k in per_model}
    return out | rows


def _write_curves(path: Path, histories: dict[str, list]) -> None:
    """Learning curves for DVC plots: one row per (model, epoch)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "phase", "train_loss", "val_accuracy"])
        for name, rows in sorted(histories.items()):
            for i, row in enumerate(rows, 1):
                w.writerow(
                    [
                        name,
                        i,
                        row.get("phase", ""),
                        f"{row.get('train_loss', 0):.5f}",
                        f"{row.get('val_accuracy', float('nan')):.4f}",
                    ]
                )


def _write_predictions(path: Path, y: np.ndarray, pred: np.ndarray, classes: list[str]) -> None:
    """actual/predicted rows: DVC's confusion-matrix plot template reads these."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((classes[a], classes[p]) for a, p in zip(y, pred, strict=True))


def plot_confusion(path: Path, cm: list[list[int]], classes: list[str], title: str) -> None:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm_arr = np.asarray(cm, dtype=float)
    norm = cm_arr / np.maximum(cm_arr.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.0 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if norm[i, j] > 0.6 else "black"
            ax.text(j, i, int(cm_arr[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(metrics: dict[str, Any]) -> str:
    """The table `make run` prints: test accuracy per strategy next to the baseline."""
    base_name = metrics["baseline"]
    base = metrics["models"][base_name]
    cv = all("cv_accuracy" in m or m.get("skipped") for m in metrics["models"].values())
    logme = all(m.get("logme") is not None for m in metrics["models"].values())
    by = "by CV" if cv and metrics.get("extra_fits") else "by val"
    head = f"{'model':<14} {'test acc':>9} {'macro-F1':>9} {'val acc':>8}"
    head += f" {'cv acc':>7}" if cv else ""
    head += f" {'LogME':>7}" if logme else ""
    lines = [f"{head} {'vs scratch':>11}", "-" * (len(head) + 12)]
    for name, m in sorted(metrics["models"].items(), key=lambda kv: -kv[1]["accuracy"]):
        gain = "" if name == base_name else f"{100 * (m['accuracy'] - base['accuracy']):+.1f} pt"
        mark = f" ← selected ({by})" if name == metrics["selected"] else ""
        val = m["val_accuracy"]  # nan: no validation, or trained on it (refit)
        val_text = f"{val:>8.3f}" if val == val else f"{'refit' if m.get('refit') else '–':>8}"
        row = f"{name:<14} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f} {val_text}"
        row += f" {m.get('cv_accuracy', float('nan')):>7.3f}" if cv else ""
        row += f" {m['logme']:>7.3f}" if logme else ""
        mark += f" ({m['skipped']})" if m.get("skipped") else ""
        lines.append(f"{row} {gain:>11}{mark}")
    if "selected_by" in metrics:
        lines.append(f"selected by: {metrics['selected_by']}")
    for key in ("architectures", "verdict"):
        if key in metrics:
            lines.append(metrics[key])
    return "\n".join(lines)
