"""evaluate: every model on the target test split, against the baseline; selects one."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def evaluate(
    prepared: Input[Dataset],
    dataset_sha256: str,
    baseline_model: Input[Model],
    models: Input[list[Model]],
    evaluate_params: str,
    evaluation: Output[Artifact],
    model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
) -> NamedTuple("Outputs", [("selected", str)]):
    """Score the fine-tuned models and the baseline on the test split; select one by
    validation accuracy and output it as `model` (what export and register take).

    The KFP UI shows the selected model's confusion matrix and every model's scalar metrics.
    """
    from tlpipe.kfp import runtime

    selected = runtime.evaluate(
        prepared,
        dataset_sha256,
        baseline_model,
        models,
        evaluate_params,
        evaluation,
        model,
        metrics,
        confusion,
        report,
    )
    return (selected,)
