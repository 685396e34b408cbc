"""register: the gate, then the MLflow registry version with alias champion or challenger."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def gate(onnx: Input[Model], register_params: str, verdict: Output[Markdown]) -> str:
    """Decide "pass" (ONNX parity passed, accuracy ≥ register.accuracy_floor) or "fail".

    One string output that `dsl.If` compares: kfp.local evaluates a `dsl.If` on a float
    comparison, or on a named output of a multi-output component, to False. Beating the
    current champion is `register`'s decision, made against the registry.
    """
    from tlpipe.kfp import runtime

    return runtime.gate(onnx, register_params, verdict)


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def register(
    onnx: Input[Model],
    model: Input[Model],
    prepared: Input[Dataset],
    dataset_sha256: str,
    register_params: str,
    report: Output[Markdown],
) -> NamedTuple("Outputs", [("version", str), ("alias", str)]):
    """Register the selected model in MLflow; alias champion only if it beats the champion
    on this run's test images (the champion is re-scored on them: a paired comparison)."""
    from tlpipe.kfp import runtime

    return runtime.register(onnx, model, prepared, dataset_sha256, register_params, report)
