"""prepare: raw data → the scenario's splits + manifest (tlpipe.steps.prepare)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def prepare(
    fetch_params: str,
    data_version: str,
    prepare_params: str,
    prepared: Output[Dataset],
    metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("dataset_sha256", str)]):
    """Fetch raw data version `data_version` and build the scenario from it.

    Cached on (data_version, fetch_params, prepare_params): on unchanged data a scheduled run
    reuses the earlier `prepared` artifact and `dataset_sha256`, and so every later step's
    cache key is unchanged too. Fails if the data changed since `fetch` looked at it.
    """
    import tempfile
    from pathlib import Path

    from tlpipe.errors import TlpipeError
    from tlpipe.kfp_cli import component_config, component_run, log_metrics
    from tlpipe.kfp_cli import data_version as version_of
    from tlpipe.steps import fetch as fetch_step
    from tlpipe.steps import prepare as step

    fetch_cfg = component_config(fetch_step.FetchConfig, "fetch", fetch_params)
    cfg = component_config(step.PrepareConfig, "prepare", prepare_params)
    with tempfile.TemporaryDirectory() as tmp:
        raw = fetch_step.run(fetch_cfg, Path(tmp) / "raw").out_dir
        if version_of(raw) != data_version:
            raise TlpipeError("the raw data changed since `fetch` ran: run the pipeline again")
        result = step.run(raw, Path(prepared.path), cfg)
    with component_run("prepare", cfg, prepared.path) as run:
        run.log_metrics(result.metrics)
        run.log_artifact(result.manifest)
    log_metrics(metrics, result.metrics)
    prepared.metadata.update(
        {"dataset_sha256": result.dataset_sha256, "data_version": data_version}
    )
    return (result.dataset_sha256,)
