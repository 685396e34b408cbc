"""The Kubeflow (KFP v2) DAG of tlpipe: the same job as `dvc repro` (dvc.yaml).

    start-run ─ fetch → prepare ─ check ─┬─ pretrain ─ match ─ ParallelFor(strategies): finetune
                                         └─ baseline (scratch) ──────────────────────────────────┤
                       evaluate (Collected models; selects by target validation) ◄───────────┘
                         └─ export(selected) ─ gate ─ if gate == "pass": register(selected)
    finish-run: exit handler, closes the MLflow parent run whatever happened

Compile it with `python -m pipelines.transfer_learning [--out PATH]` (default: the committed
pipelines/transfer_learning.yaml, which `tlpipe pipeline run-local | submit | schedule` run).

Parameters: one JSON string per params.yaml section (`prepare_params` is the scenario,
`pretrain_params`, `finetune_params`, … the hyperparameters) and `strategies`, the fine-tune
strategies to train and compare. Their defaults are `tlpipe.kfp.runtime.default_arguments()`:
the dataclass defaults, i.e. the scenario `make run` trains.

Every strategy trains in its own task (`dsl.ParallelFor`: one GPU pod each, cached and retried
each on its own, one row each in the UI); `dsl.Collected` hands all the models to evaluate,
which picks one by target validation accuracy (never test) and outputs it as `model`, so
export and register take the selected model without a branch per strategy. Collecting
artifacts needs KFP backend ≥ 2.5 (kfp.local supports it too).

Caching keys on the data version. KFP's cache key of a step is its inputs: parameter values
and the *identity* of its input artifacts (not their content). `fetch` is never cached, so it
notices new data, and it outputs only the data's version, no artifact (a fresh artifact every
run would miss every cache after it). `prepare` is cached on that version: on unchanged data a
scheduled run gets the earlier `prepared` artifact and `dataset_sha256` back, so pretrain …
register see the same inputs and hit the cache too (each takes `dataset_sha256` as an input,
but the finetune loop, which gets the `prepared` artifact only: see the DAG's comment);
new data or new params re-run exactly the steps they feed. The MLflow parent run id is
deliberately *not* an input of the cached steps (it would change their keys every run): they
find the parent run by a run key instead (`tlpipe.tracking.parent_run_id`).

Cluster settings (ignored by kfp.local): GPU steps ask for one `nvidia.com/gpu`, run on nodes
labelled `nvidia.com/gpu.present=true` and tolerate the taint `nvidia.com/gpu=present:
NoSchedule`; every step retries with exponential backoff; MLflow/S3 settings come from Secret
`tlpipe-secrets`, never from parameters.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations.
import argparse
from pathlib import Path

from kfp import dsl, kubernetes

from components.check import check
from components.evaluate import evaluate
from components.export import export
from components.fetch import fetch
from components.finetune import baseline, finetune
from components.match import match
from components.pipeline_run import finish_run, start_run
from components.prepare import prepare
from components.pretrain import pretrain
from components.register import gate, register
from tlpipe.kfp.runtime import default_arguments
from tlpipe.tracking import RUN_KEY_ENV

PIPELINE_NAME = "tlpipe-transfer-learning"
# The compiled spec ships inside the package, so an installed tlpipe runs it with no checkout.
PACKAGE = Path(__file__).resolve().parents[1] / "src/tlpipe/kfp/transfer_learning.yaml"
DEFAULTS = default_arguments()

SECRET = "tlpipe-secrets"  # k8s/secrets: one key per env var of the same name
SECRET_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",  # the pipeline's user on the authenticated tracking server
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
# Argo labels every pod of a run with the run's workflow name: the run key that
# tlpipe.tracking finds the parent run by.
RUN_KEY_FIELD = "metadata.labels['workflows.argoproj.io/workflow']"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
RUN_AS = 10001  # the image's `tlpipe` user and group
SCRATCH = "/tmp"  # the one writable path of a step's container (an emptyDir)


# ---------------------------------------------------------------------------- task settings


def _cpu(
    task: dsl.PipelineTask, memory: str = "2Gi", tracked: bool = True, retries: int = 2
) -> dsl.PipelineTask:
    """A CPU step: 1 core and `memory` requested, twice that as limits; secrets; retries."""
    task.set_cpu_request("1").set_cpu_limit("2")
    task.set_memory_request(memory)
    task.set_memory_limit(f"{2 * int(memory.removesuffix('Gi'))}Gi")
    _non_root(task)
    return _retry(_tracked(task) if tracked else task, retries)


def _gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One GPU on a GPU node (tolerating its taint), shared memory, secrets, retries."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_cpu_limit("8")
    task.set_memory_request("12Gi").set_memory_limit("24Gi")
    kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    kubernetes.add_toleration(
        task, key=GPU_RESOURCE, operator="Equal", value="present", effect="NoSchedule"
    )
    # /dev/shm is 64 MiB in a container: too small for PyTorch DataLoader worker queues.
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="2Gi"
    )
    _non_root(task)
    # GPU nodes are often spot/preemptible: wait longer between attempts.
    return _retry(_tracked(task), retries=2, backoff="60s")


def _non_root(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Run as the image's non-root user whatever the image says (Pod Security `restricted`),
    with an emptyDir as the only writable scratch (`/tmp`: HOME, MPLCONFIGDIR, TORCH_HOME and
    the steps' temporary files live there), so the root filesystem can be read-only.

    KFP's platform spec carries only the identity fields; the KFP backend (>= 2.16) adds the
    rest of `restricted` to every pipeline container (allowPrivilegeEscalation: false, drop
    ALL capabilities, RuntimeDefault seccomp), and k8s/base/pipeline-pods-policy.yaml makes
    the root filesystem read-only. tests/test_containers.py runs the steps with exactly these.
    """
    kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path=SCRATCH)
    return kubernetes.set_security_context(
        task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True
    )


def _tracked(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow + MinIO settings from Secret tlpipe-secrets; the run key from the pod's label."""
    kubernetes.use_secret_as_env(task, SECRET, {key: key for key in SECRET_ENV})
    kubernetes.use_config_map_as_env(
        task, "tlpipe-config", {"AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"}, optional=True
    )
    kubernetes.use_field_path_as_env(task, RUN_KEY_ENV, RUN_KEY_FIELD)
    return task


def _retry(task: dsl.PipelineTask, retries: int = 2, backoff: str = "30s") -> dsl.PipelineTask:
    """Retry a failed step after `backoff`, then twice that, … (at most an hour in all)."""
    return task.set_retry(
        num_retries=retries,
        backoff_duration=backoff,
        backoff_factor=2.0,
        backoff_max_duration="3600s",
    )


# ---------------------------------------------------------------------------- the DAG


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Transfer learning: prepare, pretrain, match, fine-tune every strategy, "
    "evaluate against a from-scratch baseline and select by validation, export the selected "
    "model to ONNX, register it in MLflow behind a quality gate.",
)
def transfer_learning(
    fetch_params: str = DEFAULTS["fetch_params"],
    prepare_params: str = DEFAULTS["prepare_params"],
    check_params: str = DEFAULTS["check_params"],
    pretrain_params: str = DEFAULTS["pretrain_params"],
    match_params: str = DEFAULTS["match_params"],
    finetune_params: str = DEFAULTS["finetune_params"],
    strategies: list = DEFAULTS["strategies"],
    evaluate_params: str = DEFAULTS["evaluate_params"],
    export_params: str = DEFAULTS["export_params"],
    register_params: str = DEFAULTS["register_params"],
):
    # The exit handler closes the parent MLflow run whatever happens (an exit task may take
    # no input from other tasks: it finds the parent run by the run key, as the steps do).
    finish = _cpu(finish_run()).set_caching_options(False)
    with dsl.ExitHandler(finish, name="tlpipe"):
        # The parent MLflow run comes first: one per pipeline run, so never cached.
        start = _cpu(
            start_run(
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
        ).set_caching_options(False)
        # Caching keys on the data version: see "Caching" in the module docstring.
        fetched = _cpu(fetch(fetch_params=fetch_params), retries=3)
        fetched.set_caching_options(False).after(start)
        prepared = _cpu(
            prepare(
                fetch_params=fetch_params,
                data_version=fetched.output,
                prepare_params=prepare_params,
            ),
            memory="4Gi",
        )
        data = {
            "prepared": prepared.outputs["prepared"],
            "dataset_sha256": prepared.outputs["dataset_sha256"],
        }
        # The data check against the champion's data comes before any training. Never cached:
        # the champion changes without its inputs changing (the tasks after it still are).
        checked = _cpu(check(**data, check_params=check_params, register_params=register_params))
        checked.set_caching_options(False)
        source = _gpu(pretrain(**data, pretrain_params=pretrain_params)).after(checked)
        scratch = _gpu(baseline(**data, finetune_params=finetune_params)).after(checked)
        matched = _cpu(
            match(**data, source_model=source.outputs["model"], match_params=match_params)
        )
        # The loop takes no task *parameter* output (dataset_sha256): kfp.local 2.17 replaces
        # every such input of a loop with the loop item. The `prepared` artifact keys the cache.
        with dsl.ParallelFor(strategies, name="strategies") as strategy:
            tuned = _gpu(
                finetune(
                    prepared=data["prepared"],
                    source_model=source.outputs["model"],
                    matching=matched.outputs["matching"],
                    strategy=strategy,
                    finetune_params=finetune_params,
                )
            )
        evaluated = _cpu(
            evaluate(
                **data,
                baseline_model=scratch.outputs["model"],
                models=dsl.Collected(tuned.outputs["model"]),
                evaluate_params=evaluate_params,
            )
        )
        selected = evaluated.outputs["model"]
        exported = _cpu(export(model=selected, **data, export_params=export_params), memory="4Gi")
        gated = _cpu(
            gate(onnx=exported.outputs["onnx"], register_params=register_params), tracked=False
        )
        # Registration only through the gate, on its single string output: kfp.local evaluates
        # a dsl.If on a float comparison, or on a named output of a multi-output component, to
        # False. register then decides champion vs challenger against the registry.
        with dsl.If(gated.outputs["Output"] == "pass", name="gate-passed"):
            _cpu(
                register(
                    onnx=exported.outputs["onnx"],
                    model=selected,
                    prepared=data["prepared"],
                    dataset_sha256=data["dataset_sha256"],
                    register_params=register_params,
                )
            )


def compile_pipeline(path: str | Path = PACKAGE) -> Path:
    """Compile the DAG to a KFP v2 pipeline YAML at `path`."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(transfer_learning, package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m pipelines.transfer_learning [--out PATH]`: compile (commit the YAML)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE, help=f"default: {PACKAGE}")
    print(f"wrote {compile_pipeline(parser.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
