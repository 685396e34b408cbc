"""check: this run's data against the data the current champion was trained on."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def check(
    prepared: Input[Dataset],
    dataset_sha256: str,
    check_params: str,
    register_params: str,
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    """Compare the prepared data with the champion's (class counts, new or vanished classes,
    input shape, images in two target splits); fail on `check.fail_on`, before any training.

    Never cached: the champion it compares with changes without the inputs changing.
    """
    from tlpipe.kfp import runtime

    runtime.check(prepared, dataset_sha256, check_params, register_params, report, metrics)
