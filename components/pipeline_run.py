"""The pipeline's parent MLflow run: opened first, closed by the exit handler."""

from kfp import dsl

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def start_run(run_name: str, kfp_run_id: str) -> str:
    """Open the parent MLflow run of this pipeline run; its id (steps find it by run key)."""
    from tlpipe.kfp import runtime

    return runtime.start_run(run_name, kfp_run_id)


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def finish_run(status: dsl.PipelineTaskFinalStatus):
    """Close the parent MLflow run: FINISHED when the DAG succeeded, else FAILED/KILLED."""
    from tlpipe.kfp import runtime

    runtime.finish_run(status.state)
