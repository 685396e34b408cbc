"""tlpipe.tracking against a real `mlflow server` (fixture `mlflow_server`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tlpipe import tracking
from tlpipe.errors import TlpipeError
from tlpipe.params import RegisterConfig
from tlpipe.params.fields import params_hash

# A wrapper as a DVC stage or KFP pod would run it: a separate process that only knows the
# tracking URI and the parent run id from its environment.
STEP_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tlpipe import tracking
    from tlpipe.params import RegisterConfig
    from tlpipe.steps import StepResult

    step, artifact = sys.argv[1], sys.argv[2]
    cfg = RegisterConfig(model_name="m-" + step, min_improvement=0.01)
    history = [{"epoch": e, "val_accuracy": 0.5 + e / 10, "phase": "head"} for e in (1, 2, 3)]
    result = StepResult(metrics={"accuracy": 0.9}, history=history, artifacts=(Path(artifact),))
    with tracking.step_run(step, cfg, tags={"tlpipe.dataset_sha256": "d" * 64}) as t:
        t.log_result(result)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_uri_and_experiment_defaults(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.EXPERIMENT_ENV, raising=False)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    assert tracking.experiment_name() == "tlpipe"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "exp")
    assert (tracking.tracking_uri(), tracking.experiment_name()) == ("http://mlflow:5000", "exp")


def test_flatten_nested_config():
    assert tracking.flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}}) == {
        "a": "1",
        "b.c": "[1, 2]",
        "b.d.e": "None",
    }


def test_down_server_raises_tlpipe_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # no one there
    with (
        pytest.raises(TlpipeError, match="unreachable.*start it or set MLFLOW_TRACKING_URI"),
        tracking.step_run("prepare"),
    ):
        pass


def test_steps_in_separate_processes_nest_under_one_parent(mlflow_server, tmp_path, monkeypatch):
    import mlflow

    experiment = f"tracking-{uuid.uuid4().hex[:8]}"
    artifact = tmp_path / "report.json"
    artifact.write_text("{}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, experiment)
    parent = tracking.start_pipeline_run("pipeline")
    env = {**os.environ, tracking.PARENT_ENV: parent}
    procs = [
        subprocess.Popen([sys.executable, "-c", STEP_PROCESS, step, str(artifact)], env=env)
        for step in ("pretrain", "finetune")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    tracking.end_pipeline_run(parent)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(parent).info.status == "FINISHED"
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert sorted(r.info.run_name for r in children) == ["finetune", "pretrain"]
    for run in children:
        step = run.info.run_name
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["tlpipe.step"] == step
        assert tags["tlpipe.dataset_sha256"] == "d" * 64
        assert tags["tlpipe.params_hash"] == params_hash(
            RegisterConfig(model_name="m-" + step, min_improvement=0.01)
        )
        assert tags["tlpipe.git_commit"] and tags["tlpipe.git_dirty"] in (
            "true",
            "false",
            "unknown",
        )
        assert tags["tlpipe.version"]
        assert run.data.params["model_name"] == "m-" + step
        assert run.data.params["min_improvement"] == "0.01"
        assert run.data.metrics["accuracy"] == 0.9
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.6), (2, 0.7), (3, 0.8)]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.json"]


def test_failed_step_marks_run_failed(mlflow_server, monkeypatch):
    import mlflow

    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, f"failing-{uuid.uuid4().hex[:8]}")
    with (
        pytest.raises(ValueError, match="boom"),
        tracking.step_run("evaluate") as t,
    ):
        raise ValueError("boom")
    run = mlflow.MlflowClient(tracking_uri=mlflow_server).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["tlpipe.error"] == "ValueError: boom"
    assert run.data.tags["mlflow.runName"] == "evaluate"
    assert "mlflow.parentRunId" not in run.data.tags  # no parent in env: a standalone run


# MLflow turns its telemetry off by itself when it sees one of these (pytest, CI systems) or
# its own switches: a user's shell or cron has none of them.
_TELEMETRY_OFF_ENV = (
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "BUILDKITE",
    "TF_BUILD",
    "CODEBUILD_BUILD_ID",
    "BITBUCKET_BUILD_NUMBER",
    "TEAMCITY_VERSION",
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "DATABRICKS_RUNTIME_VERSION",
)

USER_STEP = """
import sys
from tlpipe.cli import main
sys.argv = ["tlpipe", *sys.argv[1:]]
main()
from mlflow.telemetry.client import get_telemetry_client
print("telemetry client:", get_telemetry_client())
"""


def test_a_step_runs_with_telemetry_as_a_users_shell_has_it(mlflow_server, tmp_path):
    """A tracked step from a shell where MLflow's telemetry is on (no pytest/CI variables):
    it finishes, and tlpipe's process runs no telemetry client (issue: a KeyError on
    `_MLFLOW_TELEMETRY_SESSION_ID` failed scheduled runs at random)."""
    import json

    import mlflow

    env = {k: v for k, v in os.environ.items() if k not in _TELEMETRY_OFF_ENV}
    probe = "from mlflow.telemetry.utils import is_telemetry_disabled as d; print(d())"
    on = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert on.stdout.strip() == "False", "MLflow would not run telemetry here: not a user's shell"

    data = Path("/usr/share/datasets/fashion-mnist")  # `make data`; fetch only hashes it
    if not data.is_dir():
        pytest.skip(f"{data} missing: apt-get install dataset-fashion-mnist")
    spec = {"sources": [str(data)]}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"fetch": {"source": spec, "target": spec}}))
    experiment = f"telemetry-{uuid.uuid4().hex[:8]}"
    env |= {"MLFLOW_TRACKING_URI": mlflow_server, tracking.EXPERIMENT_ENV: experiment}
    env.pop(tracking.PARENT_ENV, None)
    cmd = [sys.executable, "-c", USER_STEP, "fetch", "--params", str(params)]
    cmd += ["--out", str(tmp_path / "raw")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "telemetry client: None" in done.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["tlpipe.step"] == "fetch"
