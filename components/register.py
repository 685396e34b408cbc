"""register: the gate, then the MLflow registry version with alias champion or challenger."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def gate(onnx: Input[Model], register_params: str, verdict: Output[Markdown]) -> str:
    """Decide "pass" (ONNX parity passed, accuracy ≥ register.accuracy_floor) or "fail".

    One string output that `dsl.If` compares: kfp.local evaluates a `dsl.If` on a float
    comparison, or on a named output of a multi-output component, to False. Beating the
    current champion is `register`'s decision, made against the registry.
    """
    from pathlib import Path

    from tlpipe.fsio import read_json
    from tlpipe.kfp_cli import component_config
    from tlpipe.steps import register as step

    cfg = component_config(step.RegisterConfig, "register", register_params)
    parity = read_json(Path(onnx.path) / "parity.json")
    accuracy = float(parity["fp32"]["accuracy"])
    new = step.Candidate("new", accuracy, parity["test_sha256"], bool(parity["passed"]))
    decision = step.decide(new, None, cfg)
    outcome = "pass" if decision.promoted else "fail"
    reason = decision.reason if outcome == "fail" else (
        f"ONNX parity passed and accuracy {accuracy:.4f} ≥ floor {cfg.accuracy_floor:.4f}"
    )  # fmt: skip
    Path(verdict.path).write_text(f"**gate: {outcome}**\n\n{reason}\n")
    return outcome


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def register(
    onnx: Input[Model],
    model: Input[Model],
    dataset_sha256: str,
    register_params: str,
    report: Output[Markdown],
) -> NamedTuple("Outputs", [("version", str), ("alias", str)]):
    """Register the model in MLflow; alias champion only if it beats the current champion."""
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run
    from tlpipe.steps import register as step

    cfg = component_config(step.RegisterConfig, "register", register_params)
    with component_run("register", cfg, dataset_sha256=dataset_sha256) as run:
        result = step.run(Path(onnx.path), Path(model.path), cfg)
        run.log_metrics(result.metrics)
    Path(report.path).write_text(
        f"**{cfg.model_name} v{result.version}** → `{result.alias}`\n\n{result.reason}\n"
    )
    return (result.version, result.alias)
