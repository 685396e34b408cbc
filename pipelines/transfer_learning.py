"""The Kubeflow (KFP v2) DAG of tlpipe, and the helpers that compile, run and schedule it.

    start-run ─┬─ fetch → prepare ─┬─ pretrain ─ match ─ finetune ─ evaluate ─ export ─ gate
               │                   └─ baseline ─────────────────────┘                    │
               │                                          if gate == "pass": register ◄──┘
               └─ finish-run (exit handler: closes the MLflow parent run, success or not)

Pipeline parameters: one JSON string per params.yaml section (`prepare_params` is the
scenario, `pretrain_params`, `finetune_params`, … the hyperparameters; `{}` = the step's
defaults) and the fine-tune `strategy`. `tlpipe pipeline …` fills them from params.yaml.
JSON strings rather than dicts: a KFP dict parameter travels as a protobuf Struct, which turns
every int into a float, and the step configs are strict about types.

Caching keys on the data version. KFP's cache key of a step is its inputs: parameter values
and the *identity* of its input artifacts (not their content). `fetch` is never cached, so it
notices new data, and it outputs only the data's version, no artifact (a fresh artifact every
run would miss every cache after it). `prepare` is cached on that version: on unchanged data a
scheduled run gets the earlier `prepared` artifact and `dataset_sha256` back, so pretrain …
register see the same inputs and hit the cache too (each takes `dataset_sha256` as an input);
new data or new params re-run exactly the steps they feed. The MLflow parent run id is
deliberately *not* an input of the cached steps (it would change their keys every run): they
find the parent run by a run key instead (`tlpipe.kfp_cli.adopt_parent_run`).

Cluster settings (ignored by kfp.local): GPU steps ask for one `nvidia.com/gpu`, run on nodes
labelled `nvidia.com/gpu.present=true` and tolerate the taint `nvidia.com/gpu=present:
NoSchedule`; every step retries with exponential backoff; MLflow/S3 settings come from Secret
`tlpipe-secrets`, never from parameters.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations.
import contextlib
import dataclasses
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from components.evaluate import evaluate
from components.export import export
from components.fetch import fetch
from components.finetune import baseline, finetune
from components.match import match
from components.pipeline_run import finish_run, start_run
from components.prepare import prepare
from components.pretrain import pretrain
from components.register import gate, register
from tlpipe.errors import TlpipeError
from tlpipe.kfp_cli import RUN_KEY_ENV

PIPELINE_NAME = "tlpipe-transfer-learning"
PACKAGE = Path(__file__).with_suffix(".yaml")

SECRET = "tlpipe-secrets"  # k8s/secrets: one key per env var of the same name
SECRET_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY")  # fmt: skip
# Argo labels every pod of a run with the run's workflow name: the run key of tlpipe.kfp_cli.
RUN_KEY_FIELD = "metadata.labels['workflows.argoproj.io/workflow']"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")


# ---------------------------------------------------------------------------- task settings


def _cpu(task: dsl.PipelineTask, cpu: str = "1", memory: str = "2Gi") -> dsl.PipelineTask:
    """Requests = limits/2: a CPU step gets `cpu` cores and `memory`, bursting to twice that."""
    task.set_cpu_request(cpu).set_memory_request(memory)
    limit_cpu = str(2 * float(cpu)).removesuffix(".0")
    limit_memory = f"{2 * int(memory.removesuffix('Gi'))}Gi"
    return task.set_cpu_limit(limit_cpu).set_memory_limit(limit_memory)


def _gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """One GPU on a GPU node (tolerating its taint), shared memory, secrets, retries."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request("4").set_cpu_limit("8")
    task.set_memory_request("12Gi").set_memory_limit("24Gi")
    kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Equal", value="present",
                              effect="NoSchedule")  # fmt: skip
    # /dev/shm is 64 MiB in a container: too small for PyTorch DataLoader worker queues.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                               medium="Memory", size_limit="2Gi")  # fmt: skip
    # GPU nodes are often spot/preemptible: wait longer between attempts.
    return _retry(_tracked(task), retries=2, backoff="60s")


def _tracked(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """MLflow + MinIO settings from Secret tlpipe-secrets; the run key from the pod's label."""
    kubernetes.use_secret_as_env(task, SECRET, {key: key for key in SECRET_ENV})
    kubernetes.use_config_map_as_env(task, "tlpipe-config",
                                     {"AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"},
                                     optional=True)  # fmt: skip
    kubernetes.use_field_path_as_env(task, RUN_KEY_ENV, RUN_KEY_FIELD)
    return task


def _retry(task: dsl.PipelineTask, retries: int = 2, backoff: str = "30s") -> dsl.PipelineTask:
    """Retry a failed step after `backoff`, then twice that, … (at most an hour in all)."""
    return task.set_retry(num_retries=retries, backoff_duration=backoff, backoff_factor=2.0,
                          backoff_max_duration="3600s")  # fmt: skip


# ---------------------------------------------------------------------------- the DAG


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Transfer learning: prepare, pretrain, match, fine-tune, evaluate against a "
    "from-scratch baseline, export to ONNX, register in MLflow behind a quality gate.",
)
def transfer_learning(
    fetch_params: str = "{}",
    prepare_params: str = "{}",
    pretrain_params: str = "{}",
    match_params: str = "{}",
    finetune_params: str = "{}",
    strategy: str = "lp_ft",
    evaluate_params: str = "{}",
    export_params: str = "{}",
    register_params: str = "{}",
):
    # The exit handler closes the parent MLflow run whatever happens (an exit task may take
    # no input from other tasks: it finds the parent run by the run key, as the steps do).
    finish = _retry(_tracked(_cpu(finish_run())))
    finish.set_caching_options(False)
    with dsl.ExitHandler(finish, name="tlpipe"):
        # The parent MLflow run comes first: one per pipeline run, so never cached.
        start = _retry(_tracked(_cpu(start_run(run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                                        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER))))  # fmt: skip
        start.set_caching_options(False)
        # Caching keys on the data version: see "Caching" in the module docstring.
        fetched = _retry(_cpu(fetch(fetch_params=fetch_params)), retries=3).after(start)
        fetched.set_caching_options(False)
        prepared = prepare(fetch_params=fetch_params, data_version=fetched.output,
                           prepare_params=prepare_params)  # fmt: skip
        _retry(_tracked(_cpu(prepared, memory="4Gi")))
        data = {"prepared": prepared.outputs["prepared"],
                "dataset_sha256": prepared.outputs["dataset_sha256"]}  # fmt: skip

        source = _gpu(pretrain(**data, pretrain_params=pretrain_params))
        scratch = _gpu(baseline(**data, finetune_params=finetune_params))
        matched = _retry(_tracked(_cpu(match(
            **data, source_model=source.outputs["model"], match_params=match_params
        ))))  # fmt: skip
        tuned = _gpu(finetune(
            **data, source_model=source.outputs["model"], matching=matched.outputs["matching"],
            strategy=strategy, finetune_params=finetune_params,
        ))  # fmt: skip
        evaluated = _retry(_tracked(_cpu(evaluate(
            **data, baseline_model=scratch.outputs["model"], model=tuned.outputs["model"],
            strategy=strategy, evaluate_params=evaluate_params,
        ))))  # fmt: skip
        exported = _retry(_tracked(_cpu(export(
            model=tuned.outputs["model"], **data, export_params=export_params
        ), memory="4Gi"))).after(evaluated)  # fmt: skip
        gated = _retry(_cpu(gate(onnx=exported.outputs["onnx"], register_params=register_params)))
        # Registration only through the gate, on its single string output: kfp.local evaluates
        # a dsl.If on a float comparison, or on a named output of a multi-output component, to
        # False. register then decides champion vs challenger against the registry.
        with dsl.If(gated.outputs["Output"] == "pass", name="gate-passed"):
            _retry(_tracked(_cpu(register(
                onnx=exported.outputs["onnx"], model=tuned.outputs["model"],
                dataset_sha256=data["dataset_sha256"], register_params=register_params,
            ))))  # fmt: skip


# ---------------------------------------------------------------------------- compile / run


def compile_pipeline(path: str | Path = PACKAGE) -> Path:
    """Compile the DAG to a KFP v2 pipeline YAML at `path`."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(transfer_learning, package_path=str(path))
    return path


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """What `run_local` did: where kfp.local put the outputs, the gate's verdict."""

    run_dir: Path
    decision: str
    run_key: str


def run_local(arguments: dict[str, Any], root: str | Path, cache: bool = False) -> LocalRun:
    """Compile the DAG, then run that compiled YAML here with kfp.local (minus retries).

    `SubprocessRunner(use_venv=False)` starts each component as `sys.executable -m
    kfp.dsl.executor_main …` (it swaps `python3` in the command for this interpreter) with this
    process's environment, so the components import the installed tlpipe, and MLflow settings
    (MLFLOW_TRACKING_URI, TLPIPE_EXPERIMENT) come from here, not from the Kubernetes Secret.
    """
    from kfp import components, local

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    run_key = f"local-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp, _env(RUN_KEY_ENV, run_key), _quiet():
        package = _without_retries(compile_pipeline(Path(tmp) / "p.yaml"))
        pipeline = components.load_component_from_file(str(package))
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   enable_caching=cache, cache_root=str(root / ".kfp_cache"))  # fmt: skip
        try:
            pipeline(**arguments)
        except RuntimeError as e:  # kfp.local: "… Inner task failed: …" (its log is above)
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            raise TlpipeError(f"{message} Its log is above.") from e
    new = [p for p in set(root.iterdir()) - before if p.name.startswith(PIPELINE_NAME)]
    run_dir = max(new, key=lambda p: p.stat().st_mtime)
    return LocalRun(run_dir, _local_decision(run_dir), run_key)


def _without_retries(package: Path) -> Path:
    """The compiled YAML minus its retry policies: retries are for the cluster (preempted
    nodes, a flaky network); here a failed step should stop the run at once, not sleep."""
    import yaml

    spec, *platform = yaml.safe_load_all(package.read_text())
    dags = [spec["root"], *spec["components"].values()]
    for task in (t for d in dags for t in d.get("dag", {}).get("tasks", {}).values()):
        task.pop("retryPolicy", None)
    package.write_text(yaml.safe_dump_all([spec, *platform], sort_keys=False))
    return package


def _local_decision(run_dir: Path) -> str:
    """The gate's output of a finished local run ("pass" / "fail"; "" if it did not run)."""
    import json

    out = run_dir / "gate" / "executor_output.json"
    if not out.exists():
        return ""
    values = json.loads(out.read_text()).get("parameterValues", {})
    return str(values.get("Output", ""))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide kfp.local's warnings about cluster-only settings (image, GPU, resources)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        yield


# ---------------------------------------------------------------------------- KFP server


def submit(
    host: str,
    arguments: dict[str, Any],
    experiment: str = "tlpipe",
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    cache: bool = True,
) -> str:
    """Compile the DAG and create one run of it (the spec travels in the request); its id.

    `cache=False` turns caching off for every step of this run; `True` keeps the compiled
    per-step settings (fetch stays uncached).
    """
    import kfp

    client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / f"{PIPELINE_NAME}.yaml")
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name or _stamp("tlpipe"),
            experiment_name=experiment, namespace=namespace, service_account=service_account,
            enable_caching=None if cache else False,
        )  # fmt: skip
    return result.run_id


def schedule(
    host: str,
    cron: str,
    arguments: dict[str, Any],
    name: str = "tlpipe-nightly",
    experiment: str = "tlpipe",
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Upload the DAG as a new pipeline version and run it on `cron`; the recurring run id.

    max_concurrency=1 (a slow run is never overlapped by the next one) and no_catchup=True
    (after a pause only the latest missed run starts, not one per missed slot).
    """
    import kfp

    kfp_cron = to_kfp_cron(cron)
    client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    with tempfile.TemporaryDirectory() as tmp:
        package = str(compile_pipeline(Path(tmp) / f"{PIPELINE_NAME}.yaml"))
        pipeline_id, version_id = _upload(client, package, namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    job = client.create_recurring_run(
        experiment_id, name, description=f"tlpipe on cron {kfp_cron}", cron_expression=kfp_cron,
        max_concurrency=1, no_catchup=True, params=arguments, pipeline_id=pipeline_id,
        version_id=version_id, service_account=service_account,
    )  # fmt: skip
    return job.recurring_run_id


def to_kfp_cron(expr: str) -> str:
    """Validate a cron expression; return KFP's 6-field form (seconds first).

    A 5-field expression (minute hour day-of-month month day-of-week) gets second `0`.
    """
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise TlpipeError(
            f"cron {expr!r} has {len(fields)} fields; want 5 (min hour day month weekday, e.g. "
            '"0 3 * * *") or 6 with seconds first (e.g. "0 0 3 * * *")'
        )
    limits = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
    names = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
    for field, (low, high), name in zip(fields, limits, names, strict=True):
        if not _cron_field_ok(field, low, high):
            raise TlpipeError(f"cron {expr!r}: bad {name} field {field!r} (allowed {low}-{high})")
    return " ".join(fields)


def _cron_field_ok(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        value, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) >= 1):
            return False
        if value in ("*", "?"):
            continue
        if re.fullmatch(r"[A-Za-z]{3}(-[A-Za-z]{3})?", value):  # JAN, MON-FRI
            continue
        bounds = value.split("-")
        if len(bounds) > 2 or not all(b.isdigit() and low <= int(b) <= high for b in bounds):
            return False
    return True


def _upload(client: Any, package: str, namespace: str | None) -> tuple[str, str]:
    """Upload `package` as pipeline PIPELINE_NAME (a new version if it exists); the ids."""
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package, PIPELINE_NAME, namespace=namespace)
        versions = client.list_pipeline_versions(pipeline.pipeline_id).pipeline_versions
        return pipeline.pipeline_id, versions[0].pipeline_version_id
    version = client.upload_pipeline_version(package, _stamp(PIPELINE_NAME), pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _stamp(prefix: str) -> str:
    import datetime

    return f"{prefix}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
