"""pretrain: the source model on the source classes (tlpipe.steps.pretrain). GPU step."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TLPIPE_GPU_IMAGE


@dsl.component(base_image=TLPIPE_GPU_IMAGE, install_kfp_package=False)
def pretrain(
    prepared: Input[Dataset],
    dataset_sha256: str,
    pretrain_params: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the source model on the source split, selected by source-val accuracy."""
    from tlpipe.kfp import runtime

    runtime.pretrain(prepared, dataset_sha256, pretrain_params, model, metrics)
