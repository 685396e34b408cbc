"""MLflow tracking for the wrappers (CLI, KFP components): a run tree with lineage tags.

One parent run per pipeline run, one child run per step. The parent run id travels between
processes in env var `TLPIPE_PARENT_RUN_ID`, and each child points at it with the
`mlflow.parentRunId` tag, so DVC stages and KFP pods started as separate processes still nest
under one parent. Steps never call this module; the wrappers around them do:

    with tracking.step_run("pretrain", cfg, manifest=manifest) as t:
        result = pretrain.run(...)
        t.log_metrics(result.metrics)

Nothing happens at import time and mlflow is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tlpipe.config import params_hash, to_dict
from tlpipe.errors import TlpipeError

PARENT_ENV = "TLPIPE_PARENT_RUN_ID"
EXPERIMENT_ENV = "TLPIPE_EXPERIMENT"
DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "tlpipe"

# mlflow's own client retries a failed request 7 times with exponential backoff (minutes of
# waiting) and waits 120 s for a reply. A server that dies mid-step should fail the step in
# seconds instead; users can still override these through the environment.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_MAX_PARAM_CHARS = 6000  # mlflow's limit on a param value
_BATCH = 100  # mlflow's limit on params per log_batch call (metrics allow 1000)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or a sqlite file `mlflow.db` in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name() -> str:
    """`TLPIPE_EXPERIMENT`, or `tlpipe`."""
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def check_server(uri: str, attempts: int = 3, backoff: float = 1.0, timeout: float = 2.0) -> None:
    """Fail fast with a TlpipeError if an http(s) tracking server does not answer `/health`.

    Tries `attempts` times, sleeping `backoff`, `2*backoff`, ... between tries (defaults: at
    most ~9 s). Non-HTTP URIs (sqlite, file) need no server and pass at once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    problem = "no answer"
    for i in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                if reply.status == 200:
                    return
                problem = f"HTTP {reply.status}"
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            problem = str(getattr(e, "reason", e))
        if i + 1 < attempts:
            time.sleep(backoff * 2**i)
    raise TlpipeError(
        f"MLflow tracking server at {uri} is unreachable after {attempts} tries ({problem}): "
        "start it or set MLFLOW_TRACKING_URI"
    )


def connect(uri: str | None = None) -> Any:
    """Point mlflow at `uri` (default `tracking_uri()`), check the server, return a client.

    Also lowers mlflow's HTTP retries/timeout (unless set in the environment) so a server that
    dies mid-step fails the step in seconds rather than minutes.
    """
    import mlflow

    uri = uri or tracking_uri()
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def lineage_tags() -> dict[str, str]:
    """Tags that say which code produced a run: git commit, dirty flag, tlpipe version."""
    from tlpipe import __version__

    commit = _git("rev-parse", "HEAD") or os.environ.get("TLPIPE_GIT_SHA")  # set in the image
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "tlpipe.git_commit": commit or "unknown",
        "tlpipe.git_dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
        "tlpipe.version": __version__,
    }


def start_pipeline_run(
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Create the parent run of a pipeline run and return its id.

    The caller exports the id as `TLPIPE_PARENT_RUN_ID` for the step processes it starts and
    ends the run with `end_pipeline_run` (or uses `pipeline_run`, which does both).
    """
    client = connect(uri)
    experiment_id = _experiment_id(client, experiment or experiment_name())
    all_tags = {**lineage_tags(), "tlpipe.kind": "pipeline", **(tags or {})}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def end_pipeline_run(run_id: str, failed: bool = False, uri: str | None = None) -> None:
    """Mark the parent run FINISHED (or FAILED)."""
    connect(uri).set_terminated(run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def pipeline_run(
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> Iterator[str]:
    """Parent run for the block; `TLPIPE_PARENT_RUN_ID` is set in os.environ meanwhile."""
    run_id = start_pipeline_run(experiment, run_name, tags, uri)
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        yield run_id
    except BaseException:
        _quietly(end_pipeline_run, run_id, True, uri)
        raise
    else:
        end_pipeline_run(run_id, False, uri)
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


@dataclasses.dataclass(frozen=True)
class StepRun:
    """Handle on the active step run, yielded by `step_run`."""

    run_id: str
    uri: str

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric values (others are skipped); `step` for a point on a curve."""
        self._log_points([(metrics, step)])

    def log_history(self, history: Iterable[dict[str, Any]]) -> None:
        """Log per-epoch dicts as metric curves; the step is `epoch` if present, else the index."""
        self._log_points((row, int(row.get("epoch", i))) for i, row in enumerate(history))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client().log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._client().log_artifacts(self.run_id, str(directory), artifact_path)

    def _log_points(self, rows: Iterable[tuple[dict[str, Any], int | None]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [
            Metric(key, float(value), now, step or 0)
            for row, step in rows
            for key, value in row.items()
            if isinstance(value, numbers.Real)
        ]
        client = self._client()
        for i in range(0, len(points), 1000):
            client.log_batch(self.run_id, metrics=points[i : i + 1000])

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri)


@contextlib.contextmanager
def step_run(
    step: str,
    cfg: Any = None,
    *,
    manifest: dict | None = None,
    uri: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[StepRun]:
    """Active mlflow run for one step: a child of `parent_run_id` or `TLPIPE_PARENT_RUN_ID`.

    Without a parent id it is a standalone run in `experiment` (default `experiment_name()`).

    Logs the flattened config as params and the lineage tags (`tlpipe.step`, git commit and
    dirty flag, `tlpipe.params_hash`, `tlpipe.dataset_sha256` from the prepared-data manifest,
    `tlpipe.version`). The run ends FINISHED, or FAILED (with a `tlpipe.error` tag) if the
    block raises. Being the active run, it also receives anything logged with `mlflow.*`
    inside the block (register logs its model that way).
    """
    import mlflow

    client = connect(uri)
    tags = {**lineage_tags(), "tlpipe.step": step}
    if cfg is not None:
        tags["tlpipe.params_hash"] = params_hash(cfg)
    if manifest is not None:
        tags["tlpipe.dataset_sha256"] = str(manifest.get("dataset_sha256", "unknown"))
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    if parent:
        experiment_id = _parent_experiment(client, parent)
        tags["mlflow.parentRunId"] = parent
    else:
        experiment_id = _experiment_id(client, experiment or experiment_name())
    run = mlflow.start_run(experiment_id=experiment_id, run_name=step, tags=tags)
    try:
        if cfg is not None:
            _log_params(client, run.info.run_id, flatten(to_dict(cfg)))
        yield StepRun(run.info.run_id, mlflow.get_tracking_uri())
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        _quietly(mlflow.set_tag, "tlpipe.error", f"{type(e).__name__}: {e}"[:4000])
        _quietly(mlflow.end_run, status)
        raise
    else:
        mlflow.end_run("FINISHED")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict → {"a.b": "value"} with values as strings (mlflow params)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:_MAX_PARAM_CHARS]
    return out


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])


def _experiment_id(client: Any, name: str) -> str:
    """Id of experiment `name`, created if missing (safe when two processes race)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another process created it
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TlpipeError(
            f"MLflow experiment {name!r} is deleted: restore it "
            f"(`mlflow experiments restore`) or set {EXPERIMENT_ENV} to another name"
        )
    return experiment.experiment_id


def _parent_experiment(client: Any, parent_run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(parent_run_id).info.experiment_id
    except MlflowException as e:
        raise TlpipeError(
            f"{PARENT_ENV}={parent_run_id} is not a run on {client.tracking_uri}: "
            f"unset it or start the pipeline with `tlpipe run`"
        ) from e


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _quietly(fn: Any, *args: Any) -> None:
    """Best-effort cleanup on a failure path: never mask the original error."""
    with contextlib.suppress(Exception):  # the server may be the very thing that failed
        fn(*args)
