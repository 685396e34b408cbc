"""`tlpipe pipeline` as a client of the compiled pipeline: submit and schedule requests, cron
checks, and the one-line errors for a missing or stale package.

No KFP server runs here: `submit` and `schedule` talk to a small HTTP server on 127.0.0.1
that records the requests, and the recorded bodies are checked against the kfp_server_api
models the real API server speaks. The package is the committed
pipelines/transfer_learning.yaml (test_kfp.py checks that it is fresh).
"""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from typer.testing import CliRunner

from tlpipe.errors import TlpipeError
from tlpipe.kfp import client
from tlpipe.kfp.pipeline_cli import app
from tlpipe.params import SECTIONS

PACKAGE = client.SHIPPED
PARAMETERS = {f"{s}_params" for s in SECTIONS} | {"strategies"}


@pytest.fixture(scope="module")
def package() -> Path:
    return PACKAGE


@pytest.fixture(scope="module")
def compiled() -> dict:
    """The committed package: {"pipeline": spec, "platform": kubernetes platform spec}."""
    spec, platform = yaml.safe_load_all(PACKAGE.read_text())
    return {"pipeline": spec, "platform": platform["platforms"]["kubernetes"]}


def test_cron_is_converted_and_validated() -> None:
    assert client.to_kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert client.to_kfp_cron("30 0 3 * * MON-FRI") == "30 0 3 * * MON-FRI"
    assert client.to_kfp_cron("*/15 * * * *") == "0 */15 * * * *"
    for bad in ("0 3 * *", "0 25 * * *", "61 0 3 * * *", "x 3 * * *", "0 3 * * * * *"):
        with pytest.raises(TlpipeError, match="cron"):
            client.to_kfp_cron(bad)


@pytest.mark.parametrize("command", [["run-local"], ["submit", "--host", "http://127.0.0.1:9"]])
def test_a_missing_package_says_what_to_do(tmp_path: Path, command) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tlpipe.cli", "pipeline", *command, "--package", "nope.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert "nope.yaml not found" in line and "--package PATH" in line


def test_the_compiled_pipeline_ships_in_the_package() -> None:
    """The wheel's package data is the file `tlpipe pipeline` runs by default (fresh: test_kfp)."""
    from importlib.resources import files

    shipped = files("tlpipe.kfp") / "transfer_learning.yaml"
    assert shipped.is_file() and Path(str(shipped)) == client.SHIPPED


def test_a_stale_package_fails_before_anything_runs(package, tmp_path: Path) -> None:
    spec, platform = yaml.safe_load_all(package.read_text())
    spec["root"]["inputDefinitions"]["parameters"]["strategy"] = {"parameterType": "STRING"}
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump_all([spec, platform]))
    res = CliRunner().invoke(app, ["run-local", "--package", str(stale)])
    assert isinstance(res.exception, TlpipeError) and "recompile" in str(res.exception)
    assert not (tmp_path / "local_outputs").exists()


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


@pytest.mark.filterwarnings("error::FutureWarning")  # kfp's one on every Client
def test_submit_creates_a_run_with_spec_and_parameters(
    kfp_host, package, compiled, tmp_path
) -> None:
    (tmp_path / "params.yaml").write_text("prepare: {target: {k: 3}}\nstrategies: [full, joint]\n")
    args = f"submit --host {kfp_host} --package {package} -p {tmp_path}/params.yaml --run-name r"
    res = CliRunner().invoke(app, [*args.split(), "--set", "pretrain.train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "run run-1 submitted" in res.output
    experiment = _model(_sent("POST", "/apis/v2beta1/experiments")["body"], "V2beta1Experiment")
    assert experiment.display_name == "tlpipe"
    run = _model(_sent("POST", "/apis/v2beta1/runs")["body"], "V2beta1Run")
    assert run.experiment_id == "exp-1" and run.display_name == "r"
    assert run.pipeline_spec == _compiled_docs(compiled)
    params = run.runtime_config.parameters
    assert json.loads(params["prepare_params"])["target"]["k"] == 3
    assert json.loads(params["pretrain_params"])["train"]["epochs"] == 1
    assert params["strategies"] == ["full", "joint"]


@pytest.mark.filterwarnings("error::FutureWarning")  # kfp's one on every Client
def test_schedule_uploads_and_creates_a_recurring_run(
    kfp_host, package, compiled, tmp_path
) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    args = f"schedule --host {kfp_host} --package {package} -p {tmp_path}/params.yaml --cron"
    res = CliRunner().invoke(app, [*args.split(), "0 3 * * *"])
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
    res = CliRunner().invoke(app, ["schedule", "--host", kfp_host, "--cron", "0 3 * *"])
    assert res.exit_code != 0 and isinstance(res.exception, TlpipeError)
    assert _FakeKfp.requests == []
