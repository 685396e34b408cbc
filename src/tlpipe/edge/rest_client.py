"""A read-only MLflow registry client over the REST API, on the standard library only.

An edge device needs three calls, not the mlflow package:
`GET /api/2.0/mlflow/registered-models/alias` (the version an alias points to, with its tags
and run), `GET /api/2.0/mlflow/runs/get` (the run's artifact root) and the artifact itself
through the server's proxy (`GET /api/2.0/mlflow-artifacts/artifacts/…`, the server runs with
`--serve-artifacts`; `/get-artifact` for a server that reads another artifact store itself).
Credentials come from the environment, as for the mlflow client: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (HTTP basic auth, MLflow's basic-auth app) or MLFLOW_TRACKING_TOKEN
(bearer); MLFLOW_TRACKING_SERVER_CERT_PATH or MLFLOW_TRACKING_INSECURE_TLS for TLS.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from tlpipe.errors import TlpipeError

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """What the registry says about one version."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]


class Registry:
    """The REST API of one MLflow server.

    Args:
        uri: `http(s)://host:port[/prefix]`; default $MLFLOW_TRACKING_URI.
        timeout: Seconds to wait for the server on each read.
        deadline: Seconds all requests of this registry may take together, from its creation: a
            server that trickles bytes never trips `timeout`, so each read waits at most what
            is left of the deadline, and the transfer stops when it is spent.
    """

    def __init__(self, uri: str | None = None, timeout: float = 30.0, deadline: float = 600.0):
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri.startswith(("http://", "https://")):
            raise TlpipeError(
                f"the MLflow server URI must be http(s)://host:port, got {uri!r}: "
                "set MLFLOW_TRACKING_URI or pass --tracking-uri"
            )
        self.uri = uri.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self._ends = time.monotonic() + deadline
        self._headers = _auth_headers()
        self._ssl = _ssl_context()

    def alias(self, name: str, alias: str) -> ModelVersion:
        """The version `alias` of registered model `name` points to."""
        query = urllib.parse.urlencode({"name": name, "alias": alias})
        try:
            body = self._json(f"/api/2.0/mlflow/registered-models/alias?{query}")
        except _NotFound as e:
            raise TlpipeError(f"{self.uri} has no version {name}@{alias} ({e})") from e
        mv = body["model_version"]
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
        return ModelVersion(mv["name"], str(mv["version"]), mv.get("run_id", ""), tags)

    def download(self, run_id: str, artifact: str, out: IO[bytes]) -> str:
        """Write run artifact `artifact` (e.g. "onnx/model.onnx") to `out`; returns its sha256."""
        try:
            root = self._json(f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]["info"]
            path = self._artifact_path(root.get("artifact_uri", ""), run_id, artifact)
            with self._open(path) as reply:
                digest = hashlib.sha256()
                while chunk := reply.read1(_CHUNK):  # read1: whatever has arrived
                    digest.update(chunk)
                    out.write(chunk)
                    self._wait_at_most(reply)
        except _NotFound as e:
            raise TlpipeError(f"{self.uri} has no artifact {artifact} in run {run_id} ({e})") from e
        except OSError as e:  # the connection broke mid-file, or a read hit the deadline
            self._left()
            raise TlpipeError(f"download of {artifact} from {self.uri} failed: {e}") from e
        return digest.hexdigest()

    def _artifact_path(self, artifact_uri: str, run_id: str, artifact: str) -> str:
        parsed = urllib.parse.urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":  # proxied: the server streams its store
            where = urllib.parse.quote(f"{parsed.path.strip('/')}/{artifact}")
            return f"/api/2.0/mlflow-artifacts/artifacts/{where}"
        query = urllib.parse.urlencode({"path": artifact, "run_id": run_id})
        return f"/get-artifact?{query}"

    def _json(self, path: str) -> dict[str, Any]:
        with self._open(path) as reply:
            try:
                return json.loads(reply.read())
            except ValueError as e:
                raise TlpipeError(
                    f"{self.uri}{path.split('?')[0]} did not answer JSON: is "
                    f"{self.uri} an MLflow server?"
                ) from e

    def _left(self) -> float:
        """Seconds left of the deadline; raises once it is spent."""
        left = self._ends - time.monotonic()
        if left <= 0:
            raise TlpipeError(
                f"pull from {self.uri} took over --deadline = {self.deadline:g} s (a slow or "
                "trickling server); nothing was installed"
            )
        return left

    def _wait_at_most(self, reply: Any) -> None:
        """Let the next read of `reply` wait no longer than the deadline leaves."""
        left = self._left()
        sock = getattr(getattr(getattr(reply, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            sock.settimeout(min(self.timeout, left))

    def _open(self, path: str) -> Any:
        request = urllib.request.Request(self.uri + path, headers=self._headers)
        try:
            timeout = min(self.timeout, self._left())
            return urllib.request.urlopen(request, timeout=timeout, context=self._ssl)
        except urllib.error.HTTPError as e:
            message = _error_message(e)
            if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in message or "not found" in message:
                raise _NotFound(message) from e
            if e.code in (401, 403):
                raise TlpipeError(
                    f"{self.uri} refused the credentials (HTTP {e.code}): set "
                    "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN "
                    "to a user that can read the model"
                ) from e
            raise TlpipeError(f"{self.uri} answered HTTP {e.code}: {message}") from e
        except (urllib.error.URLError, OSError) as e:
            self._left()
            reason = getattr(e, "reason", e)
            raise TlpipeError(f"cannot reach the MLflow server at {self.uri} ({reason})") from e


class _NotFound(Exception):
    """A 404 (or MLflow's 400 "alias … not found"): turned into a TlpipeError by the caller."""


def _error_message(e: urllib.error.HTTPError) -> str:
    raw = e.read(4096).decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        raw = json.loads(raw).get("message", raw)
    return " ".join(str(raw).split()) or e.reason  # one line; the body read is 4 KB at most


def _auth_headers() -> dict[str, str]:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {}


def _ssl_context() -> ssl.SSLContext | None:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 — the user asked for it
    cafile = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cafile) if cafile else None
