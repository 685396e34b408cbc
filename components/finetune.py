"""finetune: adapt the source model to the target (and the scratch baseline). GPU steps."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TLPIPE_GPU_IMAGE


@dsl.component(base_image=TLPIPE_GPU_IMAGE, install_kfp_package=False)
def finetune(
    prepared: Input[Dataset],
    dataset_sha256: str,
    source_model: Input[Model],
    matching: Input[Dataset],
    strategy: str,
    finetune_params: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fine-tune the source model on the few labelled target images with `strategy`."""
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run, log_metrics
    from tlpipe.steps import finetune as step

    cfg = component_config(step.FinetuneConfig, "finetune", finetune_params)
    cfg = cfg.for_strategy(strategy)
    with component_run(f"finetune:{cfg.strategy}", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(
            Path(prepared.path), Path(source_model.path), Path(model.path), cfg,
            match_dir=Path(matching.path),
        )  # fmt: skip
        run.log_history(result.history)
        run.log_metrics(result.metrics)
    log_metrics(metrics, result.metrics)
    model.metadata.update({"framework": "pytorch", "strategy": cfg.strategy})


@dsl.component(base_image=TLPIPE_GPU_IMAGE, install_kfp_package=False)
def baseline(
    prepared: Input[Dataset],
    dataset_sha256: str,
    finetune_params: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the from-scratch baseline on the target images only: the bar to beat."""
    from pathlib import Path

    from tlpipe.kfp_cli import component_config, component_run, log_metrics
    from tlpipe.steps import finetune as step

    cfg = component_config(step.FinetuneConfig, "finetune", finetune_params)
    cfg = cfg.for_strategy("scratch")
    with component_run("finetune:scratch", cfg, prepared.path, dataset_sha256) as run:
        result = step.run(Path(prepared.path), None, Path(model.path), cfg)
        run.log_history(result.history)
        run.log_metrics(result.metrics)
    log_metrics(metrics, result.metrics)
    model.metadata.update({"framework": "pytorch", "arch": cfg.model, "strategy": "scratch"})
