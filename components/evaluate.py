"""evaluate: every model on the target test split, against the baseline."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def evaluate(
    prepared: Input[Dataset],
    dataset_sha256: str,
    baseline_model: Input[Model],
    model: Input[Model],
    strategy: str,
    evaluate_params: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
) -> NamedTuple("Outputs", [("selected", str)]):
    """Score the fine-tuned model and the baseline on the test split; pick one by val accuracy.

    The KFP UI shows the selected model's confusion matrix and per-model scalar metrics.
    """
    from pathlib import Path

    from tlpipe.fsio import read_json
    from tlpipe.kfp_cli import (
        component_config,
        component_run,
        log_metrics,
        save_metadata,
        write_html,
    )
    from tlpipe.steps import evaluate as step

    cfg = component_config(step.EvaluateConfig, "evaluate", evaluate_params)
    models = {cfg.baseline: Path(baseline_model.path), strategy: Path(model.path)}
    with component_run("evaluate", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(Path(prepared.path), models, Path(evaluation.path), cfg)
        run.log_metrics(result.metrics)
        run.log_artifacts(evaluation.path)
    table = read_json(result.metrics_path)
    chosen = table["models"][result.selected]
    confusion.log_confusion_matrix(list(chosen["per_class"]), chosen["confusion"])
    save_metadata(confusion)
    per_model = {f"{name}.{key}": scores[key] for name, scores in table["models"].items()
                 for key in ("accuracy", "macro_f1", "val_accuracy")}  # fmt: skip
    log_metrics(metrics, {**per_model, **result.metrics})
    plots = sorted((Path(evaluation.path) / "plots").glob("confusion_*.png"))
    write_html(report.path, "Evaluation", result.metrics, plots, step.format_table(table))
    return (result.selected,)
