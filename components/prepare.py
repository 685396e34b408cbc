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
    from tlpipe.kfp import runtime

    return (runtime.prepare(fetch_params, data_version, prepare_params, prepared, metrics),)
