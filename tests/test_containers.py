"""The real stack in containers: the tlpipe image (non-root, read-only root filesystem), the
whole compiled DAG with every step in that image (kfp.local.DockerRunner), tracking into the
project's mlflow-server image with basic auth on Postgres, artifacts in S3.

Run by `make test-containers` (containers/test.sh), which installs the engine, builds the
images and starts a private dockerd; marked `containers`, so the default suite skips it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from containers_stack import (
    HOST,
    MLFLOW_IMAGE,
    ROOT,
    SECRETS,
    TLPIPE_IMAGE,
    auth_ini,
    create_users,
    docker,
    docker_run_args,
    k8s_volume,
    kfp_reports_exit_status,
    manifest,
    mlflow_server,
    pipeline_docker_settings,
    pipeline_pod,
    pod_run_args,
    postgres,
    s3_server,
)
from test_kfp import ALL_TASKS, FMNIST, STEP_RUNS, _check_artifacts, _steps_run, tiny_scenario

from tlpipe.errors import TlpipeError

pytestmark = pytest.mark.containers
PIPELINE = SECRETS["tlpipe-secrets"]
COMPILED = ROOT / "src/tlpipe/kfp/transfer_learning.yaml"  # the spec users run


@pytest.fixture(scope="module", autouse=True)
def _engine() -> None:
    if not os.environ.get("DOCKER_HOST") or docker("info", check=False).returncode != 0:
        pytest.fail("no Docker engine: run `make test-containers` (containers/test.sh)")
    if not FMNIST.is_dir():
        pytest.fail(f"{FMNIST} missing: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict[str, str]:
    """Postgres + S3 + the MLflow server (auth on) + the pipeline's user; the settings a
    pipeline pod gets from Secret tlpipe-secrets, with this machine's addresses."""
    tmp = tmp_path_factory.mktemp("stack")
    with contextlib.ExitStack() as stack:
        pg_port = stack.enter_context(postgres())
        s3_url = stack.enter_context(s3_server(tmp))
        url = stack.enter_context(mlflow_server(tmp, pg_port, s3_url))
        assert "ready" in create_users(tmp, url)
        assert "ready" in create_users(tmp, url)  # idempotent: a re-run resets the password
        yield {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            **PIPELINE,
        }


def _tlpipe(*args: str, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the tlpipe image as the compiled pipeline's pods run: the spec's user and scratch
    folders, the pipeline-pod policy's securityContext (read-only root), no network."""
    opts = ["--rm", "--network", "none"]
    opts += docker_run_args(pipeline_docker_settings(pipeline_pod(COMPILED), {}))
    for m in mounts:
        opts += ["-v", m]
    return docker("run", *opts, TLPIPE_IMAGE, *args)


def test_the_image_user_is_the_compiled_pods_user() -> None:
    """The image's own USER (what a pod without a securityContext gets, e.g. Kubeflow Trainer
    nodes) is the user the compiled spec asks for, and that user is not root."""
    sc = pipeline_pod(COMPILED)["securityContext"]
    assert sc["runAsNonRoot"] is True and int(sc["runAsUser"]) != 0
    image_user = ["sh", "-c", "id -u; id -g"]
    own = docker("run", "--rm", "--network", "none", TLPIPE_IMAGE, *image_user).stdout
    assert own.split() == [str(sc["runAsUser"]), str(sc["runAsGroup"])]
    as_pod = _tlpipe("sh", "-c", "id -u; touch /opt/x 2>&1 || echo read-only; touch /tmp/x").stdout
    assert as_pod.split("\n")[0] == str(sc["runAsUser"]) and "read-only" in as_pod


def test_image_runs_a_step_non_root_on_a_read_only_root(tmp_path: Path) -> None:
    assert "prepare" in _tlpipe("tlpipe", "--help").stdout
    sc = pipeline_pod(COMPILED)["securityContext"]
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, int(sc["runAsUser"]), int(sc["runAsGroup"]))
    params = tmp_path / "params.yaml"
    spec = {"sources": [str(FMNIST)]}
    params.write_text(json.dumps({"fetch": {"source": spec, "target": spec}}))
    _tlpipe(
        "tlpipe",
        "fetch",
        "--no-track",
        "--params",
        "/in/params.yaml",
        "--out",
        "/out/raw",
        mounts=(f"{FMNIST}:{FMNIST}:ro", f"{params}:/in/params.yaml:ro", f"{out}:/out"),
    )
    assert any((out / "raw").rglob("*ubyte*")), list((out / "raw").rglob("*"))
    # the image holds what the steps import, and no pip config or credentials from the build
    probe = "import tlpipe, kfp, torch, onnxruntime, mlflow; print(torch.__version__)"
    print("torch in the image:", _tlpipe("python3", "-c", probe).stdout.strip())
    assert (
        _tlpipe("sh", "-c", "ls /etc/pip.conf /run/secrets 2>&1 || true").stdout.count(
            "No such file"
        )
        == 2
    )


def test_the_mlflow_server_runs_as_k8s_runs_it_and_needs_a_user(stack) -> None:
    url = stack["MLFLOW_TRACKING_URI"]
    # /health stays open (probes, tlpipe.tracking.check_server and the step watchdog)
    with urllib.request.urlopen(url + "/health", timeout=60) as reply:
        assert reply.status == 200
    from tlpipe import tracking

    tracking.check_server(url)
    # everything else needs a user
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(url + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=60)
    assert anonymous.value.code == 401
    assert _api(url, "GET", "/api/2.0/mlflow/experiments/search?max_results=1", PIPELINE) == 200
    wrong = {**PIPELINE, "MLFLOW_TRACKING_PASSWORD": "wrong"}
    assert _api(url, "GET", "/api/2.0/mlflow/experiments/search?max_results=1", wrong) == 401
    # the Deployment the test ran is the one in k8s/ (a renamed flag would break both)
    args = manifest("mlflow", "Deployment", "mlflow.yaml")["spec"]["template"]["spec"]
    assert "--app-name=basic-auth" in args["containers"][0]["args"]


def test_the_auth_secret_is_readable_only_through_fs_group(tmp_path: Path) -> None:
    """Kubernetes mounts Secret tlpipe-mlflow-auth root-owned with mode 0440: the server's
    user reads it only as a member of the pod's fsGroup (the stack above runs that way)."""
    pod = manifest("mlflow", "Deployment", "mlflow.yaml")["spec"]["template"]["spec"]
    (auth,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["defaultMode"] == 0o440
    sc = pod["securityContext"]
    folder = k8s_volume(tmp_path / "auth", pod, "auth", {"basic_auth.ini": auth_ini(5432)})
    stat = (folder / "basic_auth.ini").stat()
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, sc["fsGroup"], 0o440)
    read = ["run", "--rm", "--network", "none", "-v", f"{folder}:/etc/mlflow-auth:ro"]
    user = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    cat = [MLFLOW_IMAGE, "cat", "/etc/mlflow-auth/basic_auth.ini"]
    assert "[mlflow]" in docker(*read, *user, "--group-add", str(sc["fsGroup"]), *cat).stdout
    # without fsGroup the kubelet leaves the file root:root 0440: unreadable (the old bug)
    os.chown(folder / "basic_auth.ini", 0, 0)
    denied = docker(*read, "--user", f"{sc['runAsUser']}:{sc['runAsUser']}", *cat, check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def _api(url: str, method: str, path: str, creds: dict | None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if creds:
        pair = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:  # a loaded 2-core machine
            return reply.status
    except urllib.error.HTTPError as e:
        return e.code


# ---------------------------------------------------------------------------- the DAG


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The DAG compiled with the image under test for every step (CPU and GPU)."""
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    env = {**os.environ, "TLPIPE_IMAGE": TLPIPE_IMAGE, "TLPIPE_GPU_IMAGE": TLPIPE_IMAGE}
    cmd = [sys.executable, "-m", "pipelines.transfer_learning", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    assert f"image: {TLPIPE_IMAGE}" in out.read_text()
    return out


def _scenario(**overrides) -> dict:
    """test_kfp's tiny scenario on Fashion-MNIST."""
    return tiny_scenario({"sources": [str(FMNIST)]}) | overrides


def run_in_containers(package: Path, scenario: dict, root: Path, env: dict) -> Path:
    """`client.run_local` with a DockerRunner: every step in the tlpipe image with the user,
    scratch folders, securityContext and environment variables that the compiled pipeline
    (`pipeline_pod`) gives its pods, the values of those variables from `env` (Secret
    tlpipe-secrets and ConfigMap tlpipe-config with this machine's addresses) plus the run
    key; host network (the services are on HOST). The run's folder under `root`."""
    import docker as docker_sdk
    from kfp import local

    from tlpipe.kfp import client, runtime
    from tlpipe.tracking import RUN_KEY_ENV

    pod = pipeline_pod(package)

    def runner(run_key: str) -> local.DockerRunner:
        settings = pipeline_docker_settings(pod, {**env, RUN_KEY_ENV: run_key})
        return local.DockerRunner(
            network_mode="host",
            mounts=[docker_sdk.types.Mount(str(FMNIST), str(FMNIST), type="bind", read_only=True)],
            **settings,
        )

    root.mkdir(parents=True, exist_ok=True)
    sc = pod["securityContext"]
    os.chown(root, int(sc["runAsUser"]), int(sc["runAsGroup"]))  # the steps write outputs
    with kfp_reports_exit_status():
        done = client.run_local(package, runtime.arguments(scenario), root, runner=runner)
    return done.run_dir


def test_the_dag_runs_in_containers_against_the_real_server(
    stack, package, tmp_path: Path, monkeypatch
) -> None:
    import boto3
    import mlflow

    run_dir = run_in_containers(package, _scenario(), tmp_path / "root", stack)
    assert _steps_run(run_dir) == ALL_TASKS
    selected = json.loads((run_dir / "evaluate/executor_output.json").read_text())
    _check_artifacts(run_dir, selected["parameterValues"]["selected"])
    assert "→ `champion`" in (run_dir / "register/report").read_text()

    # the run tree and the registry, read back as the pipeline's user
    for key, value in stack.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(stack["MLFLOW_TRACKING_URI"])
    experiment = [client.get_experiment_by_name("tlpipe").experiment_id]
    (parent,) = client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(experiment, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["tlpipe.step"] for r in children) == sorted(STEP_RUNS)
    assert {r.info.status for r in children} == {"FINISHED"}
    (version,) = client.search_model_versions("name = 'tlpipe'")
    assert client.get_model_version_by_alias("tlpipe", "champion").version == version.version

    # the artifacts went through the server into S3
    s3 = boto3.client(
        "s3",
        endpoint_url=stack["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=PIPELINE["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=PIPELINE["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [
        o["Key"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in p.get("Contents", [])
    ]
    assert any(k.endswith("model.onnx") for k in keys), keys[:20]

    # who may move `champion`: not an anonymous client, not another user; the pipeline may
    url = stack["MLFLOW_TRACKING_URI"]
    move = {"name": "tlpipe", "alias": "champion", "version": version.version}
    path = "/api/2.0/mlflow/registered-models/alias"
    assert _api(url, "POST", path, None, move) == 401
    admin = SECRETS["tlpipe-infra-secrets"]
    other = {"MLFLOW_TRACKING_USERNAME": "someone", "MLFLOW_TRACKING_PASSWORD": "someone-pw-1"}
    admin_creds = {
        "MLFLOW_TRACKING_USERNAME": admin["MLFLOW_ADMIN_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": admin["MLFLOW_ADMIN_PASSWORD"],
    }
    body = {"username": "someone", "password": "someone-pw-1"}
    assert _api(url, "POST", "/api/2.0/mlflow/users/create", admin_creds, body) == 200
    assert _api(url, "POST", path, other, move) == 403
    assert _api(url, "POST", path, PIPELINE, move) == 200


def test_a_failing_step_is_reported_failed(stack, package, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    gone = {"sources": ["/nonexistent/dataset"]}
    missing = {"source": gone, "target": gone}
    with pytest.raises(TlpipeError, match="fetch"):
        run_in_containers(package, _scenario(fetch=missing), tmp_path / "root", stack)
    for key, value in stack.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(stack["MLFLOW_TRACKING_URI"])
    experiment = [client.get_experiment_by_name("tlpipe").experiment_id]
    runs = client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'", max_results=1)
    assert runs and runs[0].info.status == "FAILED"  # finish-run closed the parent as failed


# ---------------------------------------------------------------------------- TrainJob


@pytest.fixture(scope="module")
def trainer_runtime(tmp_path_factory) -> Path:
    """The TrainingRuntime `tlpipe` as docs/kubeflow.md has users render it (the trainer
    component, the image set with kustomize `images:`), written where the SDK reads it."""
    import yaml
    from test_k8s import render

    work = tmp_path_factory.mktemp("trainer-runtime")
    name, tag = TLPIPE_IMAGE.rsplit(":", 1)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "tlpipe",
        "components": [os.path.relpath(ROOT / "k8s/components/trainer", work)],
        "images": [{"name": "tlpipe", "newName": name, "newTag": tag}],
    }
    (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    (runtime,) = [d for d in render(work) if d["kind"] == "TrainingRuntime"]
    (work / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    return work / "runtime.yaml"


def _trainjob_env(stack: dict[str, str], trainer_runtime: Path, monkeypatch) -> None:
    """A KFP task's environment with the stack's settings, submitting to the container backend."""
    from tlpipe.kfp import trainjob
    from tlpipe.tracking import EXPERIMENT_ENV, RUN_KEY_ENV

    if HOST.startswith("127."):
        pytest.fail(
            "a TrainJob's nodes (bridge network) cannot reach services on 127.0.0.1: run "
            "`make test-containers`, which gives them a network namespace and TLPIPE_TEST_HOST"
        )
    for key, value in stack.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(trainjob.BACKEND_ENV, "container")
    monkeypatch.setenv(trainjob.RUNTIMES_ENV, str(trainer_runtime))
    monkeypatch.setenv(EXPERIMENT_ENV, "tlpipe-trainjob")  # apart from the DAG's runs
    monkeypatch.setenv(RUN_KEY_ENV, "trainjob-test")


def _two_node_pretrain():
    from tlpipe.params.resolver import resolve

    overrides = ["pretrain.train.epochs=2", "pretrain.train.batch_size=32"]
    return resolve({}, [*overrides, "pretrain.workers.nodes=2"])["pretrain"]


def test_pretrain_trains_as_a_two_node_trainjob(
    stack, trainer_runtime: Path, tiny_prepared: Path, tmp_path: Path, monkeypatch
) -> None:
    """The KFP pretrain task with `pretrain.workers.nodes=2` submits a Kubeflow Trainer TrainJob
    through the Kubeflow SDK's container backend: two containers of the tlpipe image on a
    bridge network of their own, torchrun on each, data and outputs through the stack's S3,
    rank 0 tracking into its MLflow. The same job on one node gives the same model."""
    import boto3
    import mlflow
    import torch
    from kfp import dsl

    from tlpipe.data.manifest import load_manifest
    from tlpipe.kfp import runtime, trainjob
    from tlpipe.params.fields import to_dict
    from tlpipe.params.learning import Workers
    from tlpipe.runner import FLOAT64_ENV
    from tlpipe.tracking import RUN_KEY_ENV

    _trainjob_env(stack, trainer_runtime, monkeypatch)
    monkeypatch.setenv(FLOAT64_ENV, "1")  # parity to 1e-9 (tests/test_distributed.py says why)
    params = json.dumps(to_dict(_two_node_pretrain()))
    sha = load_manifest(tiny_prepared).dataset_sha256
    c = trainjob.client()
    jobs = []
    try:
        parent = runtime.start_run("trainjob", "kfp-run-trainjob")
        metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
        runtime.pretrain(tiny_prepared, sha, params, tmp_path / "model.pt", metrics)
        (job,) = [j.name for j in c.list_jobs() if j.name.startswith("tlpipe-pretrain-")]
        jobs.append(job)
        assert metrics.metadata["workers.world_size"] == 2.0
        # the reference: the same step, the same global batch, one process (a 1-node job)
        monkeypatch.setenv(RUN_KEY_ENV, "trainjob-test-reference")  # not a child of `parent`
        one = trainjob.submit(
            "pretrain",
            params,
            Workers(nodes=1),
            prepared_dir=tiny_prepared,
            out_model=tmp_path / "one.pt",
        )
        jobs.append(one["job"])
        assert one["world_size"] == 1

        # both ranks trained their shards; rank 1 wrote and uploaded nothing
        logs = "".join(c.get_job_logs(job))
        assert "rank 0/2 trains its shard" in logs and "rank 1/2 trains its shard" in logs
        assert "tlpipe node: rank 1/2 done, wrote nothing" in logs
        assert logs.count(" uploaded s3://") == 1
        s3 = boto3.client("s3", endpoint_url=stack["MLFLOW_S3_ENDPOINT_URL"])
        listed = s3.list_objects_v2(Bucket="mlflow", Prefix=f"tlpipe-trainjobs/{job}/out/")
        assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]) == [
            "model.pt",
            "result.json",
        ]

        # rank 0 alone tracked: one child run of the pipeline's run, marked world size 2
        client = mlflow.MlflowClient()
        experiment = [client.get_experiment_by_name("tlpipe-trainjob").experiment_id]
        (child,) = client.search_runs(experiment, f"tags.`mlflow.parentRunId` = '{parent}'")
        assert child.data.tags["tlpipe.step"] == "pretrain"
        assert child.data.tags["tlpipe.world_size"] == "2"
        assert child.info.status == "FINISHED"
        assert "source_val_accuracy" in child.data.metrics

        # two nodes train what one process trains, to float64 rounding
        two = torch.load(tmp_path / "model.pt", weights_only=True)
        ref = torch.load(tmp_path / "one.pt", weights_only=True)
        assert two["state_dict"].keys() == ref["state_dict"].keys()
        for key, value in ref["state_dict"].items():
            assert value.dtype in (torch.float64, torch.int64), key
            torch.testing.assert_close(two["state_dict"][key], value, rtol=0, atol=1e-9)
        losses = [[h["train_loss"] for h in m["meta"]["history"]] for m in (two, ref)]
        assert len(losses[0]) == 2
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-9)
    finally:
        for job in jobs:
            c.delete_job(job)


def test_a_failed_trainjob_fails_the_task_with_the_nodes_reason(
    stack, trainer_runtime: Path, tiny_prepared: Path, tmp_path: Path, monkeypatch
) -> None:
    """Prepared data whose image file lost its tail: both nodes fail reading it, the job ends
    Failed, and the KFP task fails with node 0's last log lines (this backend has no events)."""
    import shutil

    from tlpipe.kfp import runtime, trainjob
    from tlpipe.params.fields import to_dict

    _trainjob_env(stack, trainer_runtime, monkeypatch)
    broken = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, broken)
    images = broken / "source.x.npy"
    os.truncate(images, images.stat().st_size // 2)
    params = json.dumps(to_dict(_two_node_pretrain()))
    c = trainjob.client()
    try:
        with pytest.raises(
            TlpipeError, match=r"TrainJob tlpipe-pretrain-\w+ \(pretrain\) Failed"
        ) as e:
            runtime.pretrain(broken, "", params, tmp_path / "model.pt", None)
        # the nodes' own error, not torchrun's summary after it
        assert "Failed: tlpipe.errors.TlpipeError: " in str(e.value)
        assert "is damaged" in str(e.value) and "run `tlpipe prepare` again" in str(e.value)
        assert not (tmp_path / "model.pt").exists()
    finally:
        for job in c.list_jobs():
            c.delete_job(job.name)


def test_trainjob_pods_run_as_the_runtime_says_under_the_trainers_command(
    stack, trainer_runtime: Path, tiny_prepared: Path, tmp_path: Path, monkeypatch
) -> None:
    """What the container backend leaves out and a cluster does: two node pods of the rendered
    runtime with its user, securityContext (no capabilities, no privilege escalation), emptyDirs
    (/tmp, /dev/shm) and env from Secret tlpipe-secrets; the command the SDK's Kubernetes
    backend builds for tlpipe's node function (the script written to the working directory,
    then torchrun); torchrun's PET_* variables as the Trainer sets them for 2 nodes; one
    network with names for the pods, as a headless Service gives them."""
    import uuid

    import boto3
    import yaml
    from kubeflow.trainer.backends.container.runtime_loader import (
        get_training_runtime_from_sources,
    )
    from kubeflow.trainer.backends.kubernetes.utils import get_command_using_train_func
    from kubeflow.trainer.constants import constants

    from tlpipe.data import s3
    from tlpipe.kfp import trainjob
    from tlpipe.params.fields import to_dict

    _trainjob_env(stack, trainer_runtime, monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", stack["MLFLOW_S3_ENDPOINT_URL"])  # for the staging
    job = f"tlpipe-k8s-{uuid.uuid4().hex[:8]}"
    staging = f"s3://mlflow/tlpipe-trainjobs/{job}"
    s3.upload(tiny_prepared, f"{staging}/in/prepared_dir")
    spec = {
        "step": "pretrain",
        "params_json": json.dumps(to_dict(_two_node_pretrain())),
        "strategy": None,
        "staging": staging,
        "inputs": {"prepared_dir": True},
    }
    runtime = get_training_runtime_from_sources("tlpipe", [str(trainer_runtime)])
    runtime.trainer.set_command(constants.TORCH_COMMAND)  # the backend's, for mlPolicy.torch
    command = get_command_using_train_func(
        runtime, trainjob.tlpipe_node, {"spec": trainjob.encode_spec(spec)}, [], None
    )
    doc = yaml.safe_load(trainer_runtime.read_text())
    pod = doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    pod = pod["spec"]
    (node,) = pod["containers"]
    env = {e["name"]: stack[next(iter(e["valueFrom"].values()))["key"]] for e in node["env"]}
    network = f"{job}-net"
    docker("network", "create", network)
    names = [f"{job}-node-{rank}" for rank in (0, 1)]
    try:
        for rank, name in enumerate(names):
            pet = {  # what the Trainer's torch plugin gives each node of a 2-node job
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "1",
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": names[0],
                "PET_MASTER_PORT": "29400",
            }
            args = pod_run_args(pod, node, env | pet, {}, network=network)
            docker("run", "-d", "--name", name, *args, node["image"], *command)
        codes = [docker("wait", name, timeout=600).stdout.strip() for name in names]
        logs = [docker("logs", name).stdout + docker("logs", name).stderr for name in names]
        assert codes == ["0", "0"], "\n".join(log[-2000:] for log in logs)
    finally:
        docker("rm", "-f", *names, check=False)
        docker("network", "rm", network, check=False)
    assert "rank 0/2 trains its shard" in logs[0] and "rank 1/2 trains its shard" in logs[1]
    assert "uploaded" in logs[0] and "rank 1/2 done, wrote nothing" in logs[1]
    listed = boto3.client("s3", endpoint_url=stack["MLFLOW_S3_ENDPOINT_URL"]).list_objects_v2(
        Bucket="mlflow", Prefix=f"tlpipe-trainjobs/{job}/out/"
    )
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]) == [
        "model.pt",
        "result.json",
    ]
