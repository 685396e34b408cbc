"""`tlpipe-edge pull / rollback` against a real `mlflow server`, over its REST API.

The versions are published the way `tlpipe register` does it (run artifacts onnx/model.onnx
and onnx/model.int8.onnx, a model version with the files' sha256 in its tags, alias
`champion`), with the mlflow client, on hand-built ONNX models (tests/test_edge.py).
Each test uses its own registered model name, so they share one server.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from PIL import Image
from test_edge import write_model

from tlpipe import edge
from tlpipe.edge.pull import sign
from tlpipe.edge.store import ModelStore
from tlpipe.errors import TlpipeError


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A registered model name of this test's own."""
    return re.sub(r"[^A-Za-z0-9]", "-", request.node.name)


@pytest.fixture
def server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN", "TLPIPE_EDGE_HMAC_KEY"):
        monkeypatch.delenv(var, raising=False)
    return mlflow_server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(uri: str, name: str, tmp: Path, label: str, *, tags: dict | None = None) -> str:
    """Register a version whose models say model_version=`label`; make it champion."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("edge-pull")
    exp_id = exp.experiment_id if exp else client.create_experiment("edge-pull")
    run_id = client.create_run(exp_id).info.run_id
    files = tmp / label / "onnx"
    files.mkdir(parents=True)
    fp32 = write_model(files / "model.onnx", size=8, version=label)
    int8 = write_model(files / "model.int8.onnx", size=6, version=f"{label}-int8")
    client.log_artifacts(run_id, str(files), "onnx")
    client.set_terminated(run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    base = {
        "onnx_sha256": sha256(fp32),
        "onnx_int8_sha256": sha256(int8),
        "onnx_uri": f"runs:/{run_id}/onnx/model.onnx",
        "gate_decision": "champion",
    }
    tags = {k: v for k, v in {**base, **(tags or {})}.items() if v is not None}
    mv = client.create_model_version(name, f"runs:/{run_id}/onnx", run_id, tags=tags)
    client.set_registered_model_alias(name, "champion", mv.version)
    return run_id


def serving(model_dir: Path) -> str:
    """model_version of the model the directory serves."""
    return edge.EdgeModel(ModelStore(model_dir).model_path()).metadata["model_version"]


def test_pull_swap_rollback_and_no_op(server, name, tmp_path, capsys):
    d = tmp_path / "models"
    pull = ["pull", "--model-dir", str(d), "--name", name]
    publish(server, name, tmp_path, "one")
    assert edge.main(pull) == 0
    assert f"installed {name} v1 (fp32)" in capsys.readouterr().out and serving(d) == "one"
    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    assert edge.main(["predict", "--model-dir", str(d), str(tmp_path / "white.png")]) == 0
    assert capsys.readouterr().out.split("\t")[1] == "bright"

    assert edge.main(pull) == 0  # the champion did not change: one line, nothing touched
    assert (
        capsys.readouterr().out == f"{name} v1 (fp32) is {name}@champion already; nothing to do\n"
    )

    publish(server, name, tmp_path, "two")
    assert edge.main(pull) == 0
    assert (
        f"installed {name} v2 (fp32) from {name}@champion (was {name} v1" in capsys.readouterr().out
    )
    assert serving(d) == "two" and ModelStore(d).previous().version == "1"

    assert edge.main(["rollback", "--model-dir", str(d)]) == 0
    assert f"rolled back to {name} v1" in capsys.readouterr().out and serving(d) == "one"
    assert edge.main(pull) == 0  # the device rolled v2 back: pull leaves it out
    assert "was rolled back on this device" in capsys.readouterr().out and serving(d) == "one"

    publish(server, name, tmp_path, "three")
    assert edge.main(pull) == 0 and serving(d) == "three"
    assert sorted(p.name for p in (d / "versions").iterdir()) == [
        f"{name}-v1-fp32",
        f"{name}-v3-fp32",
    ]  # current and previous only
    assert edge.main([*pull, "--variant", "int8"]) == 0
    assert serving(d) == "three-int8" and ModelStore(d).current().slot == f"{name}-v3-int8"
    assert edge.main(["info", "--model-dir", str(d)]) == 0
    assert f"installed: {name} v3 (int8)" in capsys.readouterr().out


def test_server_down_keeps_the_current_model(server, name, tmp_path, monkeypatch, capsys):
    d = tmp_path / "models"
    publish(server, name, tmp_path, "one")
    assert edge.main(["pull", "--model-dir", str(d), "--name", name]) == 0
    capsys.readouterr()
    # a port nothing listens on: the server is down
    from mlflow_server import _free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    assert edge.main(["pull", "--model-dir", str(d), "--name", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlpipe-edge: error: cannot reach the MLflow server at http://127.0.0.1")
    assert err.count("\n") == 1 and err.rstrip().endswith(f"{name} v1 (fp32) keeps serving")
    assert serving(d) == "one"


def test_tampered_or_unrecorded_artifacts_are_refused(server, name, tmp_path, capsys):
    d = tmp_path / "models"
    pull = ["pull", "--model-dir", str(d), "--name", name]
    publish(server, name, tmp_path, "one")
    assert edge.main(pull) == 0
    run_id = publish(server, name, tmp_path, "two")
    # someone with write access to the artifact store replaces v2's file after registration
    evil = tmp_path / "evil"
    evil.mkdir()
    write_model(evil / "model.onnx", version="evil")
    mlflow.MlflowClient(server).log_artifact(run_id, str(evil / "model.onnx"), "onnx")
    capsys.readouterr()
    assert edge.main(pull) == 1
    err = capsys.readouterr().err
    assert "not the" in err and "recorded at registration: refused" in err and err.count("\n") == 1
    assert serving(d) == "one" and len(list((d / "versions").iterdir())) == 1  # no staging left

    publish(server, name, tmp_path, "three", tags={"onnx_sha256": None})
    assert edge.main(pull) == 1
    err = capsys.readouterr().err
    assert f"{name} v3 has no valid onnx_sha256 tag" in err and serving(d) == "one"

    assert edge.main([*pull, "--alias", "nope"]) == 1
    assert f"has no version {name}@nope" in capsys.readouterr().err


def test_hmac_signature_when_the_device_has_a_key(server, name, tmp_path, monkeypatch, capsys):
    d = tmp_path / "models"
    pull = ["pull", "--model-dir", str(d), "--name", name]
    monkeypatch.setenv("TLPIPE_EDGE_HMAC_KEY", "device-trusts-this")
    publish(server, name, tmp_path, "one")  # sha256 recorded, but no signature
    assert edge.main(pull) == 1
    assert "has no onnx_sha256_hmac signature" in capsys.readouterr().err
    fp32 = write_model(tmp_path / "probe.onnx", size=8, version="two")  # the bytes "two" gets
    publish(server, name, tmp_path, "two", tags={"onnx_sha256_hmac": sign(sha256(fp32), "wrong")})
    assert edge.main(pull) == 1
    assert "has a wrong onnx_sha256_hmac signature" in capsys.readouterr().err
    good = sign(sha256(fp32), "device-trusts-this")
    publish(server, name, tmp_path / "again", "two", tags={"onnx_sha256_hmac": good})
    assert edge.main(pull) == 0 and serving(d) == "two"


def test_one_pull_at_a_time_and_the_get_artifact_route(server, name, tmp_path, capsys):
    d = tmp_path / "models"
    run_id = publish(server, name, tmp_path, "one")
    with ModelStore(d).lock():  # a pull from cron is running
        assert edge.main(["pull", "--model-dir", str(d), "--name", name]) == 1
    assert "another tlpipe-edge pull or rollback is working on" in capsys.readouterr().err
    assert not (d / "current").exists()
    # a server that reads a non-proxied artifact store: the UI's /get-artifact route
    registry = edge.Registry(server)
    route = registry._artifact_path("s3://bucket/1/run/artifacts", run_id, "onnx/model.onnx")
    assert route.startswith("/get-artifact?")
    with registry._open(route) as reply:
        assert hashlib.sha256(reply.read()).hexdigest() == sha256(tmp_path / "one/onnx/model.onnx")


@pytest.fixture
def guarded() -> Iterator[str]:
    """A stand-in for MLflow's basic-auth app: 401 unless the request carries credentials
    (basic dev:s3cret or bearer tok); then a version without onnx_sha256 (so pull stops there)."""
    good = {"Basic " + base64.b64encode(b"dev:s3cret").decode(), "Bearer tok"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 — the stdlib's name
            ok = self.headers.get("Authorization") in good
            body = {"model_version": {"name": "m", "version": "4", "run_id": "r", "tags": []}}
            if not ok:
                body = {"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}
            data = json.dumps(body).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "refused the credentials (HTTP 401)"),
        ({"MLFLOW_TRACKING_USERNAME": "dev", "MLFLOW_TRACKING_PASSWORD": "nope"}, "HTTP 401"),
        ({"MLFLOW_TRACKING_USERNAME": "dev", "MLFLOW_TRACKING_PASSWORD": "s3cret"}, "m v4 has no"),
        ({"MLFLOW_TRACKING_TOKEN": "tok"}, "m v4 has no valid onnx_sha256 tag"),
    ],
)
def test_credentials_come_from_the_environment(
    guarded, env, message, tmp_path, monkeypatch, capsys
):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = ["pull", "--model-dir", str(tmp_path), "--name", "m", "--tracking-uri", guarded]
    assert edge.main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _install(d: Path, version: str) -> Path:
    from tlpipe.edge.store import MODEL_FILE, Installed

    store = ModelStore(d)
    with store.lock(), store.staging() as staged:
        (staged / MODEL_FILE).write_bytes(b"onnx bytes " + version.encode())
        store.install(staged, Installed("m", version, "fp32", "0" * 64))
    return store.model_path()


def test_installed_models_are_readable_by_the_serving_user(tmp_path, monkeypatch):
    """A model pulled by root's cron is served by another user: folders 0755/files 0644, or
    the group of TLPIPE_EDGE_GROUP with 0750/0640."""
    import os
    import shutil
    import subprocess

    monkeypatch.delenv("TLPIPE_EDGE_GROUP", raising=False)
    model = _install(tmp_path / "models", "1")
    assert model.stat().st_mode & 0o777 == 0o644
    assert model.parent.stat().st_mode & 0o777 == 0o755
    if os.geteuid() == 0 and shutil.which("runuser"):  # as root: serve as another user
        import tempfile

        shared = Path(tempfile.mkdtemp(prefix="tlpipe-edge-"))  # pytest's tmp is 0700
        try:
            shared.chmod(0o755)
            _install(shared / "models", "1")
            cat = [
                "runuser",
                "-u",
                "nobody",
                "--",
                "cat",
                str(shared / "models/current/model.onnx"),
            ]
            assert subprocess.run(cat, capture_output=True).stdout == b"onnx bytes 1"
        finally:
            shutil.rmtree(shared)
    monkeypatch.setenv("TLPIPE_EDGE_GROUP", str(os.getgid()))
    model = _install(tmp_path / "models", "2")
    assert (model.stat().st_mode & 0o777, model.stat().st_gid) == (0o640, os.getgid())
    assert model.parent.stat().st_mode & 0o777 == 0o750
    monkeypatch.setenv("TLPIPE_EDGE_GROUP", "no-such-group-tlpipe")
    with pytest.raises(TlpipeError, match="no such group"):
        _install(tmp_path / "models", "3")
