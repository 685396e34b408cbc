"""match: importance weights of the source samples for the target (tlpipe.steps.match)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def match(
    prepared: Input[Dataset],
    dataset_sha256: str,
    source_model: Input[Model],
    match_params: str,
    matching: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """Weight the source samples by how much they resemble the target (domain classifier)."""
    from tlpipe.kfp import runtime

    runtime.match(prepared, dataset_sha256, source_model, match_params, matching, metrics, report)
