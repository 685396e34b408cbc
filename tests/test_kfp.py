"""The Kubeflow pipeline: the compiled YAML, one scenario everywhere, one-way dependencies,
and the whole DAG end to end with kfp.local. (`tlpipe pipeline` as a KFP API client:
test_kfp_client.py.)
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import write_idx_dataset
from projects import benchmark, merge, synthetic
from typer.testing import CliRunner

from tlpipe import runner
from tlpipe.data.manifest import load_manifest
from tlpipe.errors import TlpipeError
from tlpipe.kfp import client, runtime
from tlpipe.kfp.pipeline_cli import app
from tlpipe.params import SECTIONS, fields, resolver

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
GPU_STEPS = ("pretrain", "baseline", "finetune")
PARAMETERS = {f"{s}_params" for s in SECTIONS} | {"strategies"}
TRACKED = ("start-run", "fetch", "prepare", "check", *GPU_STEPS, "match", "evaluate", "export")
TRACKED += ("register", "finish-run")


@pytest.fixture(scope="module")
def tl():
    """The DAG module, imported from the checkout (tests may; the package never does)."""
    import pipelines.transfer_learning as tl

    return tl


@pytest.fixture(scope="module")
def package(tl, tmp_path_factory) -> Path:
    """The DAG compiled now."""
    return tl.compile_pipeline(tmp_path_factory.mktemp("compiled") / "p.yaml")


@pytest.fixture(scope="module")
def compiled(package) -> dict:
    """The compiled DAG: {"pipeline": spec, "platform": kubernetes platform spec}."""
    spec, platform = yaml.safe_load_all(package.read_text())
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
    assert committed == fresh, (
        "src/tlpipe/kfp/transfer_learning.yaml is stale: python -m pipelines.transfer_learning"
    )


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root, exit handler, loop, condition) by name."""
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def _steps(spec: dict) -> dict[str, dict]:
    """The container tasks: every task but the exit handler, loop and condition DAGs."""
    groups = ("exit-handler", "for-loop", "condition")
    return {n: t for n, t in _tasks(spec).items() if not n.startswith(groups)}


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
        toleration = {
            "key": "nvidia.com/gpu",
            "operator": "Equal",
            "value": "present",
            "effect": "NoSchedule",
        }
        assert k8s["tolerations"] == [toleration]
        shm = {
            "volumeName": "dshm",
            "mountPath": "/dev/shm",
            "medium": "Memory",
            "sizeLimit": "2Gi",
        }
        assert shm in k8s["emptyDirMounts"]
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
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }
        assert platform[f"exec-{step}"]["fieldPathAsEnv"][0]["name"] == "TLPIPE_KFP_RUN"
    assert "secretAsEnv" not in platform.get("exec-gate", {})  # reads a file, talks to no one
    params = compiled["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == PARAMETERS


def test_retries_caching_and_the_gate(compiled) -> None:
    tasks = _tasks(compiled["pipeline"])
    steps = _steps(compiled["pipeline"])
    assert set(steps) == set(TRACKED) | {"gate"}
    for name, task in steps.items():
        assert task["retryPolicy"]["maxRetryCount"] >= 2, name
        assert task["retryPolicy"]["backoffFactor"] == 2.0, name
        cached = task["cachingOptions"].get("enableCache", False)
        assert cached == (name not in ("start-run", "fetch", "check", "finish-run")), name
    # downstream steps are keyed on the dataset version
    for name in ("pretrain", "baseline", "match", "evaluate", "export", "register"):
        assert "dataset_sha256" in tasks[name]["inputs"]["parameters"], name
    assert "prepared" in tasks["finetune"]["inputs"]["artifacts"]  # (kfp.local: see the DAG)
    # register only inside the gate's branch, on its string outcome
    condition = next(t for n, t in tasks.items() if n.startswith("condition"))
    assert condition["triggerPolicy"]["condition"].endswith("== 'pass'")
    assert "gate" in condition["dependentTasks"]
    branch = compiled["pipeline"]["components"][condition["componentRef"]["name"]]["dag"]
    assert list(branch["tasks"]) == ["register"]


def test_every_strategy_trains_and_the_selected_model_ships(compiled) -> None:
    """finetune runs once per `strategies` item; evaluate gets them all; export and register
    take evaluate's selected `model`, not a strategy fixed in the DAG."""
    spec = compiled["pipeline"]
    tasks = _tasks(spec)
    loop_name, loop = next((n, t) for n, t in tasks.items() if n.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--strategies"
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["finetune"]
    item = loop["parameterIterator"]["itemInput"]
    assert body["finetune"]["inputs"]["parameters"]["strategy"]["componentInputParameter"] == item
    models = tasks["evaluate"]["inputs"]["artifacts"]["models"]["taskOutputArtifact"]
    assert models["producerTask"] == loop_name
    assert models["outputArtifactKey"].endswith("finetune-model")
    baseline = tasks["evaluate"]["inputs"]["artifacts"]["baseline_model"]["taskOutputArtifact"]
    assert baseline["producerTask"] == "baseline"
    selected = {"producerTask": "evaluate", "outputArtifactKey": "model"}
    assert tasks["export"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == selected
    condition = next(t for n, t in tasks.items() if n.startswith("condition"))
    to_branch = tasks["register"]["inputs"]["artifacts"]["model"]["componentInputArtifact"]
    assert condition["inputs"]["artifacts"][to_branch]["taskOutputArtifact"] == selected


# ---------------------------------------------------------------------------- one scenario


def test_arguments_are_checked_json_per_section() -> None:
    args = runtime.arguments(
        {"prepare": {"target": {"k": 3}}}, ["pretrain.train.epochs=2", "strategies=[full,lp_ft]"]
    )
    assert set(args) == PARAMETERS
    assert json.loads(args["prepare_params"])["target"]["k"] == 3
    assert json.loads(args["pretrain_params"])["train"]["epochs"] == 2
    assert args["strategies"] == ["full", "lp_ft"]
    with pytest.raises(TlpipeError, match="unknown parameter"):
        runtime.arguments({"prepare": {"kk": 3}})
    with pytest.raises(TlpipeError, match="section.key=value"):
        runtime.arguments({}, ["epochs=2"])
    # a pod rebuilds the same config from the JSON it is given
    finetune = {"finetune": runtime.config_for("finetune", args["finetune_params"])}
    cfg, _ = runner.step_config("finetune", finetune, strategy="scratch")
    assert cfg.strategy == "scratch" and cfg.train.lr == 0.05  # per_strategy applied


def test_make_run_run_local_and_the_compiled_defaults_are_one_scenario(compiled) -> None:
    """`make run` (params.yaml through resolver.resolve), `tlpipe pipeline run-local` (its
    arguments) and a run started with the compiled pipeline's defaults train the same."""
    make_run = resolver.resolve(ROOT / "params.yaml")
    run_local = runtime.arguments(ROOT / "params.yaml")
    params = compiled["pipeline"]["root"]["inputDefinitions"]["parameters"]
    defaults = {name: p["defaultValue"] for name, p in params.items()}
    client.check_arguments(compiled["pipeline"], run_local)
    for args in (run_local, defaults):
        assert tuple(args["strategies"]) == make_run.strategies
        for section, cls in SECTIONS.items():
            cfg = fields.build(cls, json.loads(args[f"{section}_params"]), where=f"{section}.")
            assert cfg == make_run[section], section


def test_the_package_never_imports_the_repository_folders() -> None:
    """Dependencies point one way: pipelines/ → components/ → tlpipe (scanned, not run)."""
    found = []
    for path in sorted((ROOT / "src" / "tlpipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args:  # import_module("pipelines…")
                func = node.func
                called = getattr(func, "attr", getattr(func, "id", ""))
                arg = node.args[0]
                if called in ("import_module", "__import__") and isinstance(arg, ast.Constant):
                    names = [str(arg.value)]
            found += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("pipelines", "components")
            ]
    assert found == []


# ---------------------------------------------------------------------------- kfp.local


STRATEGIES = ["linear_probe", "lp_ft"]


def tiny_scenario(data: dict, prepare: dict | None = None) -> dict:
    """The params of a tiny scenario (a minute of training) on one dataset split by class:
    `data` is its spec (fetch.source = fetch.target)."""
    short = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 32, "augment": False}
    return {
        "fetch": {"source": data, "target": data},
        "prepare": {
            **(prepare or {}),
            "source": {"max_per_class": 100},
            "target": {"max_test_per_class": 30},
            "seed": 0,
        },
        "pretrain": {"train": {"epochs": 1, "batch_size": 64}},
        "finetune": {"train": short, "probe": short},
        "match": {"plots": False},
        "evaluate": {"plots": True},
        "export": {"calibration_images": 32},
        "register": {"accuracy_floor": 0.0},
        "strategies": STRATEGIES,
    }


def _scenario(tmp_path: Path) -> Path:
    """params.yaml of a tiny scenario: real Fashion-MNIST if installed, else synthetic IDX."""
    if FMNIST.is_dir():
        data = tiny_scenario({"sources": [str(FMNIST)]})
    else:
        raw = write_idx_dataset(tmp_path / "raw_src", 30, 10)
        data = tiny_scenario({"dataset": "synthetic", "format": "idx", "sources": [str(raw)]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _steps_run(run_dir: Path) -> set[str]:
    """The tasks that ran (kfp.local: one folder each; a loop iteration holds its task's)."""
    tasks = {p.name for p in run_dir.iterdir() if p.is_dir()}
    loops = {p for p in tasks if p.startswith("for-loop-")}
    return tasks - loops | {
        f"{q.name}[{p.split('-')[-1]}]" for p in loops for q in (run_dir / p).iterdir()
    }


STEP_RUNS = {"fetch", "prepare", "check", "pretrain", "match", "evaluate", "export", "register"}
STEP_RUNS |= {f"finetune:{s}" for s in ("scratch", *STRATEGIES)}
# kfp.local's task folders; finetune[i]: the task in loop iteration i
ALL_TASKS = {"start-run", "fetch", "prepare", "check", "pretrain", "baseline", "match"}
ALL_TASKS |= {"finetune[0]"}
ALL_TASKS |= {"finetune[1]", "evaluate", "export", "gate", "register", "finish-run"}


def _local_env(tmp_path: Path, monkeypatch) -> None:
    """Run in `tmp_path` with its own sqlite tracking store and no inherited run settings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("TLPIPE_PARENT_RUN_ID", "TLPIPE_EXPERIMENT", "TLPIPE_NO_TRACK", "TLPIPE_KFP_RUN"):
        monkeypatch.delenv(name, raising=False)


def _run_local(package: Path, params: Path, *extra: str) -> tuple[Path, str]:
    """`tlpipe pipeline run-local` (cache on): the run's folder and what evaluate selected."""
    args = ["run-local", "--package", str(package), "-p", str(params), "--cache", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output[-3000:]
    run_dir = re.search(r"outputs: (/\S+)", res.output)
    selected = re.search(r"selected: (.+?); gate:", res.output)
    assert run_dir and selected, res.output[-2000:]
    return Path(run_dir[1]), selected[1]


def test_run_local_whole_dag_and_the_gate(package, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    _local_env(tmp_path, monkeypatch)
    params = _scenario(tmp_path)

    def run_local(*extra: str) -> tuple[Path, str]:
        return _run_local(package, params, *extra)

    # 1) the gate passes: every step ran, each strategy in its own task, register too, all
    #    under one MLflow parent run; export and register got the model evaluate selected
    first, selected = run_local()
    assert _steps_run(first) == ALL_TASKS
    _check_artifacts(first, selected)
    assert "→ `champion`" in (first / "register/report").read_text()
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = [client.get_experiment_by_name("tlpipe").experiment_id]
    (version,) = client.search_model_versions("name = 'tlpipe'")
    assert client.get_model_version_by_alias("tlpipe", "champion").version == version.version
    (parent,) = client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(experiment, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["tlpipe.step"] for r in children) == sorted(STEP_RUNS)
    assert {r.info.status for r in children} == {"FINISHED"}

    # 2) same data, a floor no model reaches: fetch re-checks the data, prepare … export hit the
    #    cache (keyed on the data version), the gate fails and register does not run
    second, again = run_local("--set", "register.accuracy_floor=1.01")
    assert _steps_run(second) == {"start-run", "fetch", "check", "gate", "finish-run"}
    assert again == "unchanged (cached)"
    gate = json.loads((second / "gate/executor_output.json").read_text())
    assert gate["parameterValues"] == {"Output": "fail"}
    assert len(client.search_model_versions("name = 'tlpipe'")) == 1
    assert len(client.search_runs(experiment, "tags.`tlpipe.kind` = 'pipeline'")) == 2


@pytest.mark.slow  # two DAG runs, 2 min: `make test-slow` (CI runs it too)
def test_run_local_retrains_when_the_target_grows(package, tmp_path: Path, monkeypatch) -> None:
    """Issue 12 on the DAG: the target folder grows (the real digits), the next run's prepare
    is not a cache hit, and register scores the champion's ONNX next to the new model on the
    new test split: the paired comparison is in its report."""
    _local_env(tmp_path, monkeypatch)
    digits = benchmark("digits_imagefolder")
    target = tmp_path / "digits"
    digits.write_digits(target, range(180))
    short = {"epochs": 6, "batch_size": 32, "steps_per_epoch": 0, "augment": False}
    params = merge(
        yaml.safe_load((ROOT / "scenarios/fashion-to-digits.yaml").read_text()),
        {
            "fetch": {
                "source": synthetic(tmp_path)["fetch"]["source"],  # a tiny stand-in
                "target": {"sources": [str(target)]},
            },
            "prepare": {"source": {"max_per_class": 30}, "input_size": 16},
            "pretrain": {"train": {"epochs": 1, "batch_size": 64, "augment": False}},
            "match": {"plots": False},
            "finetune": {"train": short, "probe": {**short, "epochs": 3}},
            "export": {"calibration_images": 32},
            "register": {"accuracy_floor": 0.2},
            "strategies": ["full"],
        },
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    first, _ = _run_local(package, path)
    assert "**tlpipe v1** → `champion`" in (first / "register/report").read_text()
    digits.write_digits(target, range(900))  # new labelled images arrive
    second, _ = _run_local(package, path)
    assert {"prepare", "evaluate", "register"} <= _steps_run(second)
    manifest = load_manifest(second / "prepare/prepared")
    n_test = manifest.splits["target_test"].count
    report = (second / "register/report").read_text()
    assert "**tlpipe v2** → `champion`" in report, report
    assert "champion v1" in report and f"on the same {n_test} test images" in report, report


def _check_artifacts(run_dir: Path, selected: str) -> None:
    """Each step's output artifacts, as kfp.local stores them (<task>/<output name>)."""
    import onnx

    manifest = load_manifest(run_dir / "prepare/prepared")
    tuned = {}
    for loop in run_dir.glob("for-loop-*"):
        out = json.loads((loop / "finetune/executor_output.json").read_text())
        tuned[out["artifacts"]["model"]["artifacts"][0]["metadata"]["strategy"]] = (
            loop / "finetune/model"
        )
    assert set(tuned) == set(STRATEGIES)
    tuned["scratch"] = run_dir / "baseline/model"  # a candidate too: it ships if nothing beats it
    assert (run_dir / "match/matching/weights.npy").is_file()
    metrics = json.loads((run_dir / "evaluate/evaluation/metrics.json").read_text())
    assert metrics["dataset_sha256"] == manifest.dataset_sha256
    assert set(metrics["models"]) == {"scratch", *STRATEGIES}
    assert metrics["selected"] == selected
    # the selected checkpoint is evaluate's `model`, and it is what export turned into ONNX
    digest = hashlib.sha256(tuned[selected].read_bytes()).hexdigest()
    assert hashlib.sha256((run_dir / "evaluate/model").read_bytes()).hexdigest() == digest
    props = {p.key: p.value for p in onnx.load(run_dir / "export/onnx/model.onnx").metadata_props}
    assert props["model_version"] == digest[:12]
    confusion = json.loads((run_dir / "evaluate/confusion").read_text())["confusionMatrix"]
    assert [s["displayName"] for s in confusion["annotationSpecs"]] == list(manifest.target_classes)
    assert len(confusion["rows"]) == len(manifest.target_classes)
    for name in ("model.onnx", "parity.json"):
        assert (run_dir / "export/onnx" / name).is_file(), name
    # INT8 is in the artifact exactly when its own parity passed (150 test images here: one
    # flipped argmax more than 1 in 100 withholds it); otherwise parity says why
    int8 = json.loads((run_dir / "export/onnx/parity.json").read_text())["int8"]
    assert (run_dir / "export/onnx/model.int8.onnx").is_file() == int8["published"], int8
    assert int8["published"] or "int8_min_agreement" in int8["reason"] or "drop" in int8["reason"]
