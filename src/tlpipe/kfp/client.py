"""Run a compiled Kubeflow pipeline: here with kfp.local, or on a cluster (submit, schedule).

Everything here takes the pipeline as its compiled YAML (a path), never the DAG's Python
module: the package does not import the repository's `pipelines/` or `components/`. The YAML is
what `python -m pipelines.transfer_learning` writes (committed as
pipelines/transfer_learning.yaml); its parameters are checked against the arguments first, so a
stale package fails here with one line, not in a pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """What `run_local` did: where kfp.local put the outputs, what evaluate selected, the
    gate's verdict, and the run key the MLflow parent run is tagged with."""

    run_dir: Path
    selected: str
    decision: str
    run_key: str


# The DAG compiled from pipelines/ (`make pipeline`), shipped in the wheel: the default package.
SHIPPED = Path(__file__).with_name("transfer_learning.yaml")


def read_package(package: str | Path) -> dict[str, Any]:
    """The pipeline spec (first YAML document) of a compiled package."""
    import yaml

    package = Path(package)
    if not package.is_file():
        raise TlpipeError(
            f"{package} not found: pass --package PATH to a compiled pipeline, or leave it out "
            "to run the one shipped with tlpipe"
        )
    try:
        spec = next(yaml.safe_load_all(package.read_text()), None)
    except yaml.YAMLError as e:
        raise TlpipeError(f"{package} is not valid YAML: {e}") from e
    if not isinstance(spec, dict) or not {"pipelineInfo", "root", "components"} <= set(spec):
        raise TlpipeError(f"{package} is not a compiled KFP pipeline (no pipelineInfo/root)")
    return spec


def check_arguments(spec: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Fail if the package does not take exactly these parameters (a stale package)."""
    names = set(spec["root"]["inputDefinitions"].get("parameters", {}))
    if names != set(arguments):
        raise TlpipeError(
            f"the package takes parameters {sorted(names)}, not {sorted(arguments)}: "
            "recompile it (`python -m pipelines.transfer_learning`)"
        )


# ---------------------------------------------------------------------------- kfp.local


def run_local(
    package: str | Path,
    arguments: dict[str, Any],
    root: str | Path,
    cache: bool = False,
    runner: Any = None,
) -> LocalRun:
    """Run the compiled pipeline here with kfp.local (minus its retries).

    By default `SubprocessRunner(use_venv=False)` starts each component as `sys.executable -m
    kfp.dsl.executor_main …` with this process's environment, so the components import the
    installed tlpipe, and MLflow settings (MLFLOW_TRACKING_URI, TLPIPE_EXPERIMENT) come from
    here, not from the Kubernetes Secret.

    Args:
        runner: `run_key -> kfp.local runner`, e.g. a `DockerRunner` running every component in
            the tlpipe image: the run key (`tracking.RUN_KEY_ENV`) must reach the containers'
            environment, as a pod label does on a cluster.
    """
    from kfp import components, local

    from tlpipe.tracking import RUN_KEY_ENV

    spec = read_package(package)
    check_arguments(spec, arguments)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    run_key = f"local-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp, _env(RUN_KEY_ENV, run_key), _quiet():
        local_package = _without_retries(Path(package), Path(tmp) / "pipeline.yaml")
        pipeline = components.load_component_from_file(str(local_package))
        local.init(
            runner=runner(run_key) if runner else local.SubprocessRunner(use_venv=False),
            pipeline_root=str(root),
            enable_caching=cache,
            cache_root=str(root / ".kfp_cache"),
        )
        try:
            pipeline(**arguments)
        except RuntimeError as e:  # kfp.local: "… Inner task failed: …" (its log is above)
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            raise TlpipeError(f"{message} Its log is above.") from e
    name = spec["pipelineInfo"]["name"]
    new = [p for p in set(root.iterdir()) - before if p.name.startswith(name)]
    run_dir = max(new, key=lambda p: p.stat().st_mtime)
    selected = _output(run_dir, "evaluate", "selected")
    return LocalRun(run_dir, selected, _output(run_dir, "gate", "Output"), run_key)


def _without_retries(package: Path, out: Path) -> Path:
    """A copy of the package minus its retry policies: retries are for the cluster (preempted
    nodes, a flaky network); here a failed step should stop the run at once, not sleep."""
    import yaml

    spec, *platform = yaml.safe_load_all(package.read_text())
    dags = [spec["root"], *spec["components"].values()]
    for task in (t for d in dags for t in d.get("dag", {}).get("tasks", {}).values()):
        task.pop("retryPolicy", None)
    out.write_text(yaml.safe_dump_all([spec, *platform], sort_keys=False))
    return out


def _output(run_dir: Path, task: str, name: str) -> str:
    """A parameter output of a finished local task ("" if the task did not run)."""
    out = run_dir / task / "executor_output.json"
    if not out.exists():
        return ""
    return str(json.loads(out.read_text()).get("parameterValues", {}).get(name, ""))


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
    package: str | Path,
    arguments: dict[str, Any],
    experiment: str = "tlpipe",
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    cache: bool = True,
) -> str:
    """Create one run of the package (the spec travels in the request); its id.

    `cache=False` turns caching off for every step of this run; `True` keeps the compiled
    per-step settings (fetch stays uncached).
    """
    check_arguments(read_package(package), arguments)
    client = _client(host, namespace)
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        run_name=run_name or _stamp("tlpipe"),
        experiment_name=experiment,
        namespace=namespace,
        service_account=service_account,
        enable_caching=None if cache else False,
    )
    return result.run_id


def schedule(
    host: str,
    package: str | Path,
    cron: str,
    arguments: dict[str, Any],
    name: str = "tlpipe-nightly",
    experiment: str = "tlpipe",
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Upload the package as a new pipeline version and run it on `cron`; the recurring run id.

    max_concurrency=1 (a slow run is never overlapped by the next one) and no_catchup=True
    (after a pause only the latest missed run starts, not one per missed slot).
    """
    kfp_cron = to_kfp_cron(cron)
    spec = read_package(package)
    check_arguments(spec, arguments)
    client = _client(host, namespace)
    pipeline_id, version_id = _upload(client, package, spec["pipelineInfo"]["name"], namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    job = client.create_recurring_run(
        experiment_id,
        name,
        description=f"tlpipe on cron {kfp_cron}",
        cron_expression=kfp_cron,
        max_concurrency=1,
        no_catchup=True,
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
        service_account=service_account,
    )
    return job.recurring_run_id


def _client(host: str, namespace: str | None) -> Any:
    """A `kfp.Client` for `host`, without the warning every kfp 2 client prints on creation.

    ("This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later versions": the
    compiled spec is KFP v2 IR, and docs/kubeflow.md asks for Kubeflow Pipelines ≥ 2.5.)
    """
    import kfp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
        return kfp.Client(host=host, namespace=namespace or "kubeflow")


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


def _upload(client: Any, package: str | Path, name: str, namespace: str | None) -> tuple[str, str]:
    """Upload `package` as pipeline `name` (a new version if it exists); the ids."""
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(package), name, namespace=namespace)
        versions = client.list_pipeline_versions(pipeline.pipeline_id).pipeline_versions
        return pipeline.pipeline_id, versions[0].pipeline_version_id
    version = client.upload_pipeline_version(str(package), _stamp(name), pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _stamp(prefix: str) -> str:
    import datetime

    return f"{prefix}-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
