"""finetune: adapt the source model to the target (and the scratch baseline). GPU steps."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TLPIPE_GPU_IMAGE


@dsl.component(base_image=TLPIPE_GPU_IMAGE, install_kfp_package=False)
def finetune(
    prepared: Input[Dataset],
    source_model: Input[Model],
    matching: Input[Dataset],
    strategy: str,
    finetune_params: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fine-tune the source model on the few labelled target images with `strategy`.

    The model's metadata names the strategy: evaluate tells the collected models apart by it.
    No `dataset_sha256` input: it runs in a ParallelFor, and kfp.local would pass it the loop
    item (the DAG's comment says more); `prepared` alone keys the cache on the data version.
    """
    from tlpipe.kfp import runtime

    runtime.finetune(prepared, source_model, matching, strategy, finetune_params, model, metrics)


@dsl.component(base_image=TLPIPE_GPU_IMAGE, install_kfp_package=False)
def baseline(
    prepared: Input[Dataset],
    dataset_sha256: str,
    finetune_params: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the from-scratch baseline on the target images only: the bar to beat."""
    from tlpipe.kfp import runtime

    runtime.baseline(prepared, dataset_sha256, finetune_params, model, metrics)
