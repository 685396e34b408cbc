"""A training task run as a Kubeflow Trainer TrainJob: `<step>.workers.nodes` > 1.

The KFP task (`tlpipe.kfp.runtime`) does not train itself. It

1. stages its inputs (prepared data, source model, match output) in S3 under
   ``$TLPIPE_TRAINJOB_STAGING/<job>/in`` (default ``s3://mlflow/tlpipe-trainjobs``: the bucket
   the stack's artifact store already has; pods of a TrainJob share no disk);
2. submits a TrainJob on TrainingRuntime `workers.runtime` (k8s/components/trainer) through the
   Kubeflow SDK (`TrainerClient`): a `CustomTrainer` whose function, `tlpipe_node`, torchrun
   starts on every node; the runtime gives the nodes the task's own GPU node selector,
   toleration, /dev/shm, secrets and securityContext;
3. waits for it; a failed job fails the task with the job's reason (the first exception in
   its nodes' log and its warning events, else the end of the log);
4. takes back what rank 0 uploaded (the model and the step's result) as the task's outputs.

On each node `node()` downloads the inputs and runs the step through the one runner, which
makes it data-parallel (`tlpipe.train.distributed`): rank 0 alone tracks (a child of the
pipeline's MLflow run, found by the run key passed in the job's environment) and uploads.

The SDK is `kubeflow` (extra `trainer`); `client()` picks its Kubernetes backend, or with
``TLPIPE_TRAINER_BACKEND=container`` its container backend (Docker / Podman on one machine,
what `make test-containers` runs). That backend reads the runtime from a file
(``TLPIPE_TRAINER_RUNTIMES``: the rendered TrainingRuntime `tlpipe`) and has no Secrets, so the
nodes get the task's own values of the variables the runtime takes from Secret tlpipe-secrets
(`SECRET_ENV`); it starts them with a per-job bridge network, which must reach S3 and MLflow.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError

STAGING_ENV = "TLPIPE_TRAINJOB_STAGING"
BACKEND_ENV = "TLPIPE_TRAINER_BACKEND"
RUNTIMES_ENV = "TLPIPE_TRAINER_RUNTIMES"
DEFAULT_STAGING = "s3://mlflow/tlpipe-trainjobs"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# what the nodes need from the task's environment besides the runtime's secrets
# tlpipe.tracking's run key and experiment, tlpipe.runner's float64 switch, S3's endpoint
_PASSED_ENV = ("TLPIPE_KFP_RUN", "TLPIPE_EXPERIMENT", "TLPIPE_FLOAT64", "AWS_ENDPOINT_URL")
# what the runtime (k8s/components/trainer) sets from Secret tlpipe-secrets / ConfigMap
# tlpipe-config on a cluster; the container backend passes the task's values instead
SECRET_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


def tlpipe_node(spec: str) -> None:
    """The TrainJob's function: the SDK ships its source and torchrun runs it on each node."""
    from tlpipe.kfp import trainjob

    trainjob.node(spec)


def client(backend: Any = None) -> Any:
    """A `TrainerClient`: `backend` (an SDK backend config), else from the environment."""
    if backend is None and _container_backend():
        sources = [s for s in os.environ.get(RUNTIMES_ENV, "").split(",") if s.strip()]
        if not sources:  # the SDK would look on GitHub, and find no runtime `tlpipe` there
            raise TlpipeError(
                f"{BACKEND_ENV}=container needs {RUNTIMES_ENV}: the file of the TrainingRuntime "
                "`tlpipe` with your image in it (k8s/components/trainer/training-runtime.yaml "
                "rendered with your overlay's `images:`; docs/kubeflow.md)"
            )
        from kubeflow.trainer import ContainerBackendConfig, TrainingRuntimeSource

        backend = ContainerBackendConfig(runtime_source=TrainingRuntimeSource(sources=sources))
    if backend is None:
        from kubeflow.trainer import KubernetesBackendConfig

        namespace = _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.exists() else None
        backend = KubernetesBackendConfig(**({"namespace": namespace} if namespace else {}))
    from kubeflow.trainer import TrainerClient

    return TrainerClient(backend_config=backend)


def _container_backend() -> bool:
    return os.environ.get(BACKEND_ENV) == "container"


def submit(
    step: str,
    params_json: str,
    workers: Any,
    *,
    strategy: str | None = None,
    trainer_client: Any = None,
    image: str | None = None,
    **inputs: Path | None,
) -> dict[str, Any]:
    """Run `step` as a TrainJob of `workers.nodes` nodes and wait; the step's result as a dict.

    Args:
        workers: the step config's `Workers` (nodes, procs_per_node, runtime, timeout_s).
        inputs: the step's `run()` paths: inputs are staged in S3, `out_model` is filled with
            the model rank 0 trained.
        image: the nodes' image (default: the runtime's).
    """
    from kubeflow.trainer import CustomTrainer
    from kubeflow.trainer.options import Name

    from tlpipe.data import s3

    _endpoint_from_mlflow()
    job_id = f"tlpipe-{step}-{uuid.uuid4().hex[:8]}"
    staging = f"{os.environ.get(STAGING_ENV, DEFAULT_STAGING).rstrip('/')}/{job_id}"
    out_model = Path(inputs.pop("out_model"))
    staged = {}
    for name, path in inputs.items():
        if path is not None and name != "checkpoint_dir":
            s3.upload(Path(path), f"{staging}/in/{name}")
            staged[name] = Path(path).is_dir()
    spec = {
        "step": step,
        "params_json": params_json,
        "strategy": strategy,
        "staging": staging,
        "inputs": staged,
    }
    passed = _PASSED_ENV + (SECRET_ENV if _container_backend() else ())
    env = {k: os.environ[k] for k in passed if os.environ.get(k)}
    c = trainer_client or client()
    trainer = CustomTrainer(
        func=tlpipe_node,
        func_args={"spec": encode_spec(spec)},
        num_nodes=workers.nodes,
        env=env,
        **({"image": image} if image else {}),
        **(
            {"resources_per_node": {"gpu": workers.procs_per_node}}
            if workers.procs_per_node > 1
            else {}
        ),
    )
    # the job is named as its staging folder: one name to find both by
    name = c.train(runtime=c.get_runtime(workers.runtime), trainer=trainer, options=[Name(job_id)])
    try:
        job = c.wait_for_job_status(name, {"Complete", "Failed"}, timeout=workers.timeout_s)
        status = job.status
    except TimeoutError:
        status = f"still running after {workers.timeout_s} s (workers.timeout_s)"
    except RuntimeError:  # the SDK raises on Failed
        status = "Failed"
    if status != "Complete":
        raise TlpipeError(f"TrainJob {name} ({step}) {status}: {_reason(c, name)}")
    with tempfile.TemporaryDirectory() as tmp:
        s3.download_object(f"{staging}/out/result.json", Path(tmp) / "r.json", 60, 3600)
        result = json.loads((Path(tmp) / "r.json").read_text())
    s3.download_object(f"{staging}/out/model.pt", out_model, 60, 3600)
    return {"job": name, **result}


def _reason(c: Any, name: str) -> str:
    """Why the job failed: the first exception in its nodes' log (torchrun's own summary comes
    after it), its warning events (scheduling, image pulls), else the end of the log."""
    parts, lines = [], []
    try:  # chunks per container (container backend) or lines (Kubernetes): lines here
        lines = [x.rstrip() for x in "".join(c.get_job_logs(name)).splitlines() if x.strip()]
    except (RuntimeError, TimeoutError) as e:
        parts.append(f"its logs cannot be read ({e})")
    error = _first_error(lines)
    if error:
        parts.append(error)
    try:
        events = [e for e in c.get_job_events(name) if e.reason not in ("Scheduled", "Pulled")]
        parts += [f"{e.involved_object_name}: {e.reason}: {e.message}" for e in events[-3:]]
    except (NotImplementedError, RuntimeError, TimeoutError):
        pass  # the container backend has no events
    if not error and lines:
        parts.append(" | ".join(lines[-5:]))
    return "; ".join(parts) or "no events and an empty log"


def _first_error(lines: list[str]) -> str | None:
    """The exception that ended the log's first traceback (of a chain, the last one raised);
    torchrun's ChildFailedError, its summary of a process that failed, is not one."""
    error, chained = None, False
    for line in lines:
        if line.startswith(_CHAINED):
            chained = True
        elif _EXCEPTION.match(line) and not line.startswith("torch.distributed.elastic."):
            if error is not None and not chained:
                return error  # a second traceback begins: the first one is complete
            error, chained = line, False
    return error


# the last line of a Python traceback: `tlpipe.errors.TlpipeError: …`, `ValueError: …`
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:? ")
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def encode_spec(spec: dict[str, Any]) -> str:
    """The node's argument: JSON in base64. The SDK's Kubernetes backend pastes the function's
    call into an unquoted shell here-document, where the backslashes of nested JSON (the
    params) would be eaten; base64 has no character a shell changes."""
    return base64.b64encode(json.dumps(spec).encode()).decode("ascii")


def node(spec_b64: str) -> None:
    """One process of the TrainJob: download the inputs, run the step, rank 0 uploads."""
    from tlpipe import runner
    from tlpipe.data import s3
    from tlpipe.params import SECTIONS
    from tlpipe.params.fields import build
    from tlpipe.train import distributed

    _endpoint_from_mlflow()
    spec = json.loads(base64.b64decode(spec_b64))
    cfg = build(SECTIONS[spec["step"]], json.loads(spec["params_json"]), where=f"{spec['step']}.")
    with tempfile.TemporaryDirectory(prefix="tlpipe-node-") as tmp:
        inputs: dict[str, Any] = {}
        for name, is_dir in spec["inputs"].items():
            local = Path(tmp) / "in" / name
            local.parent.mkdir(parents=True, exist_ok=True)
            url = f"{spec['staging']}/in/{name}"
            if is_dir:
                s3.download_prefix(url, local, 60, 3600)
            else:
                s3.download_object(url, local, 60, 3600)
            inputs[name] = local
        out = Path(tmp) / "out"
        out.mkdir()
        result = runner.run_step(
            spec["step"],
            {spec["step"]: cfg},
            out_model=out / "model.pt",
            checkpoint_dir=Path(tmp) / "ck",
            **inputs,
        )
        if distributed.is_main():
            w = distributed.world()
            (out / "result.json").write_text(
                json.dumps(
                    {"metrics": result.metrics, "summary": result.summary, "world_size": w.size},
                    default=float,
                )
            )
            s3.upload(out, f"{spec['staging']}/out")
            print(f"tlpipe node: {w} uploaded {spec['staging']}/out", flush=True)
        else:
            print(f"tlpipe node: {distributed.world()} done, wrote nothing", flush=True)


def _endpoint_from_mlflow() -> None:
    """boto3 reads AWS_ENDPOINT_URL; the stack's secret names the store MLFLOW_S3_ENDPOINT_URL."""
    if not os.environ.get("AWS_ENDPOINT_URL") and os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = os.environ["MLFLOW_S3_ENDPOINT_URL"]
