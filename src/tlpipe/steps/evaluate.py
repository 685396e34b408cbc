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
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k),
                   where=(precision + recall) > 0)  # fmt: skip
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
    from tlpipe.data.prepared import load_manifest, load_split
    from tlpipe.fsio import atomic_path, write_json

    if cfg.baseline not in models:
        raise TlpipeError(f"baseline model {cfg.baseline!r} missing: train it (finetune scratch)")
    if len(models) < 2:
        raise TlpipeError("nothing to compare: evaluate needs the baseline and ≥ 1 strategy")
    manifest = load_manifest(prepared_dir)
    test, val = load_split(prepared_dir, "target_test"), load_split(prepared_dir, "target_val")
    classes = manifest["target_classes"]
    report, preds, histories = _score(models, test, val, classes)
    selected, verdict = select(report, cfg.baseline)
    base = report[cfg.baseline]["accuracy"]
    gain = {n: round(100 * (m["accuracy"] - base), 2) for n, m in report.items()
            if n != cfg.baseline}  # fmt: skip
    out = {
        "selected": selected,
        "selected_by": "target validation accuracy (ties: validation loss); the baseline too",
        "transfer_helped": selected != cfg.baseline,
        "verdict": verdict,
        "baseline": cfg.baseline,
        "architectures": architectures(report, cfg.baseline),
        "test_sha256": manifest["splits"]["target_test"]["sha256"],
        "dataset_sha256": manifest.get("dataset_sha256", ""),
        "models": report,
        "gain_over_scratch": gain,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "metrics.json", out)
        (tmp / "selected.txt").write_text(selected + "\n")
        (tmp / "plots").mkdir()
        _write_curves(tmp / "plots" / "curves.csv", histories)
        _write_predictions(tmp / "plots" / "predictions.csv", test.y, preds[selected], classes)
        if cfg.plots:
            for name, m in report.items():
                plot_confusion(tmp / "plots" / f"confusion_{name}.png", m["confusion"],
                               classes, f"{name}: accuracy {m['accuracy']:.3f}")  # fmt: skip
    summary = {"selected_accuracy": report[selected]["accuracy"], "baseline_accuracy": base,
               "gain_points": gain.get(selected, 0.0),
               "transfer_helped": float(selected != cfg.baseline)}  # fmt: skip
    line = f"selected {selected} (test accuracy {report[selected]['accuracy']:.4f}); {verdict}"
    return EvaluateResult(Path(out_dir) / "metrics.json", selected, metrics=summary,
                          artifacts=(Path(out_dir),), summary=line)  # fmt: skip


def select(report: dict[str, dict[str, Any]], baseline: str) -> tuple[str, str]:
    """The model to ship, and a sentence saying whether transfer helped.

    The best target validation accuracy wins; 25 validation images tie often, and a tie goes
    to the lower validation loss, never to a name. The baseline is a candidate like any
    strategy: when no strategy beats it, the baseline ships.
    """

    def key(name: str) -> tuple[float, float]:
        return report[name]["val_accuracy"], -report[name]["val_loss"]

    selected = max(report, key=key)
    best = max((n for n in report if n != baseline), key=key)
    a, b = report[best]["val_accuracy"], report[baseline]["val_accuracy"]
    if selected != baseline:
        return (
            selected,
            f"transfer helped: {selected} beats {baseline} on validation ({a:.3f} vs {b:.3f})",
        )
    return selected, (
        f"transfer did NOT help: no strategy beats {baseline} on validation (best: "
        f"{best}, {a:.3f} vs {b:.3f}), so {baseline} ships"
    )


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
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, list]]:
    """Test metrics + validation accuracy and loss of every model; test predictions; histories."""
    from tlpipe.train.loop import predict
    from tlpipe.train.models import load_checkpoint

    report: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    histories: dict[str, list] = {}
    nan = float("nan")
    for name, path in sorted(models.items()):
        model, meta = load_checkpoint(path)
        if meta["classes"] != classes:
            raise TlpipeError(f"{path} predicts {meta['classes']}, not the target classes")
        preds[name] = predict(model, test.x, meta["mean"], meta["std"]).argmax(1)
        val_logits = predict(model, val.x, meta["mean"], meta["std"])
        m = classification_metrics(test.y, preds[name], classes)
        m["val_accuracy"] = float((val_logits.argmax(1) == val.y).mean()) if len(val) else nan
        m["val_loss"] = _cross_entropy(val_logits, val.y) if len(val) else nan
        m["arch"] = str(meta.get("arch", "?"))
        report[name] = m
        histories[name] = meta.get("history", [])
    return report, preds, histories


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of `logits` (N, K) for labels `y`."""
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def _write_curves(path: Path, histories: dict[str, list]) -> None:
    """Learning curves for DVC plots: one row per (model, epoch)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "step", "phase", "train_loss", "val_accuracy"])
        for name, rows in sorted(histories.items()):
            for i, row in enumerate(rows, 1):
                w.writerow([name, i, row.get("phase", ""), f"{row.get('train_loss', 0):.5f}",
                            f"{row.get('val_accuracy', float('nan')):.4f}"])  # fmt: skip


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
    lines = [
        f"{'model':<14} {'test acc':>9} {'macro-F1':>9} {'val acc':>8} {'vs scratch':>11}",
        "-" * 55,
    ]
    for name, m in sorted(metrics["models"].items(), key=lambda kv: -kv[1]["accuracy"]):
        gain = "" if name == base_name else f"{100 * (m['accuracy'] - base['accuracy']):+.1f} pt"
        mark = " ← selected (by val)" if name == metrics["selected"] else ""
        lines.append(
            f"{name:<14} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f} "
            f"{m['val_accuracy']:>8.3f} {gain:>11}{mark}"
        )
    for key in ("architectures", "verdict"):
        if key in metrics:
            lines.append(metrics[key])
    return "\n".join(lines)
