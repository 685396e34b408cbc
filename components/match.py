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
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run, log_metrics, write_html
    from tlpipe.steps import match as step

    cfg = component_config(step.MatchConfig, "match", match_params)
    with component_run("match", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(Path(prepared.path), Path(source_model.path), Path(matching.path), cfg)
        run.log_metrics(result.metrics)
        run.log_artifacts(matching.path)
    log_metrics(metrics, result.metrics)
    plots = sorted((Path(matching.path) / "plots").glob("*.png"))
    write_html(report.path, "Sample matching", result.metrics, plots)
