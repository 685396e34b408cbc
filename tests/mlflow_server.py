"""pytest plugin: a real `mlflow server` for the tests that are about MLflow.

Enable it in tests/conftest.py with `pytest_plugins = ["mlflow_server"]`. The session-scoped
fixture `mlflow_server` starts one server (sqlite backend and proxied artifact store under a
temp dir, a free 127.0.0.1 port), waits for `/health`, yields its http URI and kills the
server's whole process group at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 180  # the machine the suite runs on may be small and busy


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI (`http://127.0.0.1:PORT`) of a real MLflow tracking + registry server."""
    proc, uri = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield uri
    finally:
        stop_server(proc)


@pytest.fixture
def server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """`mlflow_server`, set as this test's tracking URI, with a fresh experiment, no parent run
    and `tmp_path` as the working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TLPIPE_EXPERIMENT", f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv("TLPIPE_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return mlflow_server


def start_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server with its store under `root` (on `port`, or a free one); wait until healthy.

    The server leads its own process group (its workers are in it): `stop_server`, or
    `os.killpg(proc.pid, …)` to kill or freeze it in a test.
    """
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # the free port can be taken between picking it and binding it
        proc, uri = _start(root, port)
        try:
            if _wait_healthy(uri, proc):
                return proc, uri
        except BaseException:
            stop_server(proc)
            raise
        stop_server(proc)
    log = (root / "server.log").read_text(errors="replace")[-3000:]
    pytest.fail(f"mlflow server did not become healthy:\n{log}")


def _start(root: Path, port: int | None) -> tuple[subprocess.Popen, str]:
    port = port or _free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The background job runner (huey consumers) is not needed and costs CPU.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(uri: str, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(uri + "/health", timeout=2) as reply,
        ):
            if reply.status == 200:
                return True
        time.sleep(0.25)
    return False


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and its workers: they share the process group the server leads."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is still there
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
