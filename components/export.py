"""export: the selected model as ONNX (fp32 + INT8) with a parity check."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    prepared: Input[Dataset],
    dataset_sha256: str,
    export_params: str,
    onnx: Output[Model],
    metrics: Output[Metrics],
):
    """Write model.onnx, model.int8.onnx and parity.json (ONNX Runtime vs PyTorch)."""
    from tlpipe.kfp import runtime

    runtime.export(model, prepared, dataset_sha256, export_params, onnx, metrics)
