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
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run, log_metrics
    from tlpipe.steps import pretrain as step

    cfg = component_config(step.PretrainConfig, "pretrain", pretrain_params)
    with component_run("pretrain", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(Path(prepared.path), Path(model.path), cfg)
        run.log_history(result.history)
        run.log_metrics(result.metrics)
    log_metrics(metrics, result.metrics)
    model.metadata.update({"framework": "pytorch", "arch": cfg.model, "strategy": "source"})
