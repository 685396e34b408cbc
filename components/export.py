"""export: the fine-tuned model as ONNX (fp32 + INT8) with a parity check."""

from typing import NamedTuple

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
) -> NamedTuple("Outputs", [("parity_passed", bool), ("accuracy", float)]):
    """Write model.onnx, model.int8.onnx and parity.json (ONNX Runtime vs PyTorch)."""
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run, log_metrics
    from tlpipe.steps import export as step

    cfg = component_config(step.ExportConfig, "export", export_params)
    with component_run("export", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(Path(model.path), Path(prepared.path), Path(onnx.path), cfg)
        run.log_metrics(result.metrics)
        run.log_artifact(result.parity_path)
    log_metrics(metrics, result.metrics)
    onnx.metadata.update({"framework": "onnx", "parity_passed": result.passed})
    return (result.passed, result.metrics["fp32_accuracy"])
