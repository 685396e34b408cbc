"""The Kubeflow pipeline: compiled YAML, kfp.local end to end, and the KFP API requests.

No KFP server runs here: `submit` and `schedule` talk to a small HTTP server on 127.0.0.1
that records the requests, and the recorded bodies are checked against the kfp_server_api
models the real API server speaks.
"""

from __future__ import annotations

import copy
import email
import email.policy
import json
import os
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from conftest import write_idx_dataset
from typer.testing import CliRunner

from tlpipe import kfp_cli
from tlpipe.errors import TlpipeError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
GPU_STEPS = ("pretrain", "baseline", "finetune")
PARAMETERS = {f"{s}_params" for s in kfp_cli.SECTIONS} | {"strategy"}
TRACKED = ("start-run", "prepare", *GPU_STEPS, "match", "evaluate", "export", "register")


@pytest.fixture(scope="module")
def tl():
    return kfp_cli.pipeline_module()


@pytest.fixture(scope="module")
def compiled(tl, tmp_path_factory) -> dict:
    """The DAG compiled now: {"pipeline": spec, "platform": kubernetes platform spec}."""
    path = tl.compile_pipeline(tmp_path_factory.mktemp("compiled") / "p.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return {"pipeline": spec, "platform": platform["platforms"]["kubernetes"]}


# ---------------------------------------------------------------------------- compiled YAML


def test_committed_yaml_is_fresh(tl, compiled) -> None:
    if os.environ.get("TLPIPE_IMAGE") or os.environ.get("TLPIPE_GPU_IMAGE"):
        pytest.skip("TLPIPE_IMAGE/TLPIPE_GPU_IMAGE set: the images differ from the committed ones")
    committed = list(yaml.safe_load_all(tl.PACKAGE.read_text()))
    fresh = copy.deepcopy(
        [compiled["pipeline"], {"platforms": {"kubernetes": compiled["platform"]}}]
    )
    for doc in (*committed, *fresh):
        doc.pop("sdkVersion", None)  # the only volatile field: which kfp compiled it
    assert committed == fresh, "pipelines/transfer_learning.yaml is stale: tlpipe pipeline compile"


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root, exit handler, condition) by name."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def test_gpu_steps_ask_for_a_gpu_node(compiled) -> None:
    executors = compiled["pipeline"]["deploymentSpec"]["executors"]
    platform = compiled["platform"]["deploymentSpec"]["executors"]
    for step in GPU_STEPS:
        res = executors[f"exec-{step}"]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["accelerator"]["resourceCount"] == "1"
        assert {"cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"} <= set(res)
        k8s = platform[f"exec-{step}"]
        assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s["tolerations"] == [
            {
                "key": "nvidia.com/gpu",
                "operator": "Equal",
                "value": "present",
                "effect": "NoSchedule",
            }
        ]
        assert k8s["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "2Gi"}
        ]
    for name, executor in executors.items():
        res = executor["container"]["resources"]
        assert {"cpuRequest", "memoryLimit"} <= set(res), name
        if name.removeprefix("exec-") not in GPU_STEPS:
            assert "accelerator" not in res and "nodeSelector" not in platform.get(name, {})


def test_secrets_come_from_the_cluster_not_parameters(compiled) -> None:
    platform = compiled["platform"]["deploymentSpec"]["executors"]
    for step in TRACKED:
        (secret,) = platform[f"exec-{step}"]["secretAsEnv"]
        assert secret["secretName"] == "tlpipe-secrets"
        assert {e["envVar"] for e in secret["keyToEnv"]} == {
            "MLFLOW_TRACKING_URI",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_S3_ENDPOINT_URL",
        }
        assert platform[f"exec-{step}"]["fieldPathAsEnv"][0]["name"] == "TLPIPE_KFP_RUN"
    params = compiled["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == PARAMETERS


def test_retries_caching_and_the_gate(compiled) -> None:
    tasks = _tasks(compiled["pipeline"])
    steps = {n: t for n, t in tasks.items() if not n.startswith(("exit-handler", "condition"))}
    assert len(steps) == 12
    for name, task in steps.items():
        assert task["retryPolicy"]["maxRetryCount"] >= 2, name
        assert task["retryPolicy"]["backoffFactor"] == 2.0, name
        cached = task["cachingOptions"].get("enableCache", False)
        assert cached == (name not in ("start-run", "fetch", "finish-run")), name
    # downstream steps are keyed on the dataset version
    for name in ("pretrain", "baseline", "match", "finetune", "evaluate", "export", "register"):
        assert "dataset_sha256" in tasks[name]["inputs"]["parameters"], name
    # register only inside the gate's branch, on its string outcome
    condition = next(t for n, t in tasks.items() if n.startswith("condition"))
    assert condition["triggerPolicy"]["condition"].endswith("== 'pass'")
    assert "gate" in condition["dependentTasks"]
    branch = compiled["pipeline"]["components"][condition["componentRef"]["name"]]["dag"]
    assert list(branch["tasks"]) == ["register"]


def test_cron_is_converted_and_validated(tl) -> None:
    assert tl.to_kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert tl.to_kfp_cron("30 0 3 * * MON-FRI") == "30 0 3 * * MON-FRI"
    assert tl.to_kfp_cron("*/15 * * * *") == "0 */15 * * * *"
    for bad in ("0 3 * *", "0 25 * * *", "61 0 3 * * *", "x 3 * * *", "0 3 * * * * *"):
        with pytest.raises(TlpipeError, match="cron"):
            tl.to_kfp_cron(bad)


def test_arguments_are_checked_json_per_section(tmp_path: Path) -> None:
    args = kfp_cli.pipeline_arguments(
        {"prepare": {"k": 3}}, ["pretrain.train.epochs=2"], strategy="full"
    )
    assert set(args) == PARAMETERS
    assert json.loads(args["prepare_params"])["k"] == 3
    assert json.loads(args["pretrain_params"])["train"]["epochs"] == 2
    assert args["strategy"] == "full"
    with pytest.raises(TlpipeError, match="unknown parameter"):
        kfp_cli.pipeline_arguments({"prepare": {"kk": 3}})
    with pytest.raises(TlpipeError, match="section.key=value"):
        kfp_cli.pipeline_arguments({}, ["epochs=2"])


# ---------------------------------------------------------------------------- kfp.local


def _scenario(tmp_path: Path) -> Path:
    """params.yaml of a tiny scenario: real Fashion-MNIST if installed, else synthetic IDX."""
    if FMNIST.is_dir():
        data = {"fetch": {"sources": [str(FMNIST)]}, "prepare": {}}
    else:
        raw = write_idx_dataset(tmp_path / "raw_src", 30, 10)
        data = {
            "fetch": {"dataset": "synthetic", "sources": [str(raw)]},
            "prepare": {"dataset": "synthetic"},
        }
    data["prepare"] |= {"max_source_per_class": 100, "max_test_per_class": 30, "seed": 0}
    short = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 32, "augment": False}
    data |= {
        "pretrain": {"train": {"epochs": 1, "batch_size": 64}},
        "finetune": {"strategy": "lp_ft", "train": short, "probe": short},
        "match": {"plots": False},
        "evaluate": {"plots": True},
        "export": {"calibration_images": 32},
        "register": {"accuracy_floor": 0.0},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _steps_run(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.is_dir()}


ALL_TASKS = {"start-run", "fetch", "prepare", *GPU_STEPS, "match", "evaluate", "export", "gate",
             "register", "finish-run"}  # fmt: skip
STEP_RUNS = {"prepare", "pretrain", "finetune:scratch", "match", "finetune:lp_ft", "evaluate",
             "export", "register"}  # fmt: skip


def test_run_local_whole_dag_and_the_gate(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("TLPIPE_PARENT_RUN_ID", "TLPIPE_EXPERIMENT", "TLPIPE_NO_TRACK", "TLPIPE_KFP_RUN"):
        monkeypatch.delenv(name, raising=False)
    params = _scenario(tmp_path)

    def run_local(*extra: str) -> Path:
        res = CliRunner().invoke(kfp_cli.app, ["run-local", "-p", str(params), "--cache", *extra])
        assert res.exit_code == 0, res.output[-3000:]
        return Path(res.output.split("outputs: ")[1].split("\n")[0])

    # 1) the gate passes: every step ran, register too, all under one MLflow parent run
    first = run_local()
    assert _steps_run(first) == ALL_TASKS
    _check_artifacts(first)
    assert "→ `champion`" in (first / "register/report").read_text()
    client = mlflow.MlflowClient()
    experiment = [client.get_experiment_by_name("tlpipe").experiment_id]
    (version,) = client.search_model_versions("name = 'tlpipe'")
    assert client.get_model_version_by_alias("tlpipe", "champion").version == version.version
    (parent,) = client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(experiment, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["tlpipe.step"] for r in children} == STEP_RUNS

    # 2) same data, a floor no model reaches: fetch re-checks the data, prepare … export hit the
    #    cache (keyed on the data version), the gate fails and register does not run
    second = run_local("--set", "register.accuracy_floor=1.01")
    assert _steps_run(second) == {"start-run", "fetch", "gate", "finish-run"}
    gate = json.loads((second / "gate/executor_output.json").read_text())
    assert gate["parameterValues"] == {"Output": "fail"}
    assert len(client.search_model_versions("name = 'tlpipe'")) == 1
    assert len(client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'")) == 2


def _check_artifacts(run_dir: Path) -> None:
    """Each step's output artifacts, as kfp.local stores them (<task>/<output name>)."""
    manifest = json.loads((run_dir / "prepare/prepared/manifest.json").read_text())
    for model in ("pretrain/model", "baseline/model", "finetune/model"):
        assert (run_dir / model).is_file(), model
    assert (run_dir / "match/matching/weights.npy").is_file()
    metrics = json.loads((run_dir / "evaluate/evaluation/metrics.json").read_text())
    assert metrics["dataset_sha256"] == manifest["dataset_sha256"]
    assert set(metrics["models"]) == {"scratch", "lp_ft"}
    confusion = json.loads((run_dir / "evaluate/confusion").read_text())["confusionMatrix"]
    assert [s["displayName"] for s in confusion["annotationSpecs"]] == manifest["target_classes"]
    assert len(confusion["rows"]) == len(manifest["target_classes"])
    for name in ("model.onnx", "model.int8.onnx", "parity.json"):
        assert (run_dir / "export/onnx" / name).is_file(), name


# ---------------------------------------------------------------------------- KFP API


class _FakeKfp(BaseHTTPRequestHandler):
    """Answers the KFP v2beta1 calls of kfp.Client with minimal valid bodies; records them."""

    requests: list[dict] = []
    REPLIES = {
        ("GET", "/apis/v2beta1/healthz"): {"multi_user": False},
        ("GET", "/apis/v2beta1/experiments"): {},
        ("POST", "/apis/v2beta1/experiments"): {"experiment_id": "exp-1", "display_name": "tlpipe"},
        ("POST", "/apis/v2beta1/runs"): {"run_id": "run-1", "experiment_id": "exp-1"},
        ("GET", "/apis/v2beta1/pipelines"): {},
        ("POST", "/apis/v2beta1/pipelines/upload"): {"pipeline_id": "pl-1", "display_name": "x"},
        ("GET", "/apis/v2beta1/pipelines/pl-1/versions"): {
            "pipeline_versions": [{"pipeline_id": "pl-1", "pipeline_version_id": "ver-1"}]
        },
        ("POST", "/apis/v2beta1/recurringruns"): {"recurring_run_id": "rr-1"},
    }

    def _reply(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append(
            {
                "method": method,
                "path": url.path,
                "query": parse_qs(url.query),
                "type": self.headers.get("Content-Type", ""),
                "body": body,
            }
        )
        reply = self.REPLIES.get((method, url.path))
        self.send_response(200 if reply is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(reply if reply is not None else {"error": "no"}).encode())

    def do_GET(self) -> None:  # noqa: N802
        self._reply("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._reply("POST")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_host(monkeypatch, tmp_path) -> Iterator[str]:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the user
    _FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _model(body: bytes, name: str):
    """Deserialize a request body into kfp_server_api model `name`; it must round-trip.

    Integers compare as strings: the API's int64 fields are strings in its JSON (and the
    server's JSON parser takes either).
    """
    import kfp_server_api

    api = kfp_server_api.ApiClient()
    obj = api.deserialize(types.SimpleNamespace(data=body), name)
    again = json.dumps(api.sanitize_for_serialization(obj))
    assert json.loads(again, parse_int=str) == json.loads(body, parse_int=str), name
    return obj


def _sent(method: str, path: str) -> dict:
    (found,) = [r for r in _FakeKfp.requests if (r["method"], r["path"]) == (method, path)]
    return found


def _compiled_docs(compiled: dict) -> dict:
    return {
        "pipeline_spec": compiled["pipeline"],
        "platform_spec": {"platforms": {"kubernetes": compiled["platform"]}},
    }


def test_submit_creates_a_run_with_spec_and_parameters(kfp_host, compiled, tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("prepare: {k: 3}\n")
    args = f"submit --host {kfp_host} -p {tmp_path}/params.yaml --run-name r"
    res = CliRunner().invoke(kfp_cli.app, [*args.split(), "--set", "pretrain.train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "run run-1 submitted" in res.output
    experiment = _model(_sent("POST", "/apis/v2beta1/experiments")["body"], "V2beta1Experiment")
    assert experiment.display_name == "tlpipe"
    run = _model(_sent("POST", "/apis/v2beta1/runs")["body"], "V2beta1Run")
    assert run.experiment_id == "exp-1" and run.display_name == "r"
    assert run.pipeline_spec == _compiled_docs(compiled)
    params = run.runtime_config.parameters
    assert json.loads(params["prepare_params"])["k"] == 3
    assert json.loads(params["pretrain_params"])["train"]["epochs"] == 1
    assert params["strategy"] == "lp_ft"


def test_schedule_uploads_and_creates_a_recurring_run(kfp_host, compiled, tmp_path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    args = f"schedule --host {kfp_host} -p {tmp_path}/params.yaml --cron".split()
    res = CliRunner().invoke(kfp_cli.app, [*args, "0 3 * * *"])
    assert res.exit_code == 0, res.output
    upload = _sent("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["tlpipe-transfer-learning"]
    form = email.message_from_bytes(
        f"Content-Type: {upload['type']}\r\n\r\n".encode() + upload["body"],
        policy=email.policy.HTTP,
    )
    (part,) = [
        p
        for p in form.iter_parts()
        if p.get_param("name", header="content-disposition") == "uploadfile"
    ]
    spec, platform = yaml.safe_load_all(part.get_payload(decode=True))
    assert {"pipeline_spec": spec, "platform_spec": platform} == _compiled_docs(compiled)
    job = _model(_sent("POST", "/apis/v2beta1/recurringruns")["body"], "V2beta1RecurringRun")
    assert job.trigger.cron_schedule.cron == "0 0 3 * * *"
    assert job.max_concurrency == "1" and job.no_catchup is True and job.mode == "ENABLE"
    assert job.pipeline_version_reference.pipeline_id == "pl-1"
    assert job.pipeline_version_reference.pipeline_version_id == "ver-1"
    assert job.pipeline_spec is None and job.experiment_id == "exp-1"
    assert set(job.runtime_config.parameters) == PARAMETERS


def test_schedule_rejects_a_bad_cron_before_any_request(kfp_host, tmp_path) -> None:
    res = CliRunner().invoke(kfp_cli.app, ["schedule", "--host", kfp_host, "--cron", "0 3 * *"])
    assert res.exit_code != 0 and isinstance(res.exception, TlpipeError)
    assert _FakeKfp.requests == []
