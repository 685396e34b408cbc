"""MLflow tracking for the runner: a run tree with lineage tags, and a watchdog on the server.

One parent run per pipeline run, one child run per step. The parent run id travels between
processes in env var `TLPIPE_PARENT_RUN_ID` (DVC stages under `tlpipe run`) or is found by the
Kubeflow run key (`TLPIPE_KFP_RUN`, the same in every pod of a run); each child points at it
with the `mlflow.parentRunId` tag. Settings come from the environment only:
`MLFLOW_TRACKING_URI` (default `sqlite:///mlflow.db`), `TLPIPE_EXPERIMENT` (default `tlpipe`),
`TLPIPE_TRACKING_DEADLINE` (seconds a server may stay silent during a step, default 15).

Steps never call this module; `tlpipe.runner` does. Nothing happens at import time and mlflow
is imported inside the functions that need it.

MLflow's usage telemetry is off in tlpipe's processes (`disable_mlflow_telemetry`, called by
the CLI, the runner and `connect` before mlflow is imported): its background thread deletes
`_MLFLOW_TELEMETRY_SESSION_ID` from the environment while the HTTP client reads it, which
failed scheduled runs at random with a KeyError. MLflow turns it off itself under pytest and
CI, so only an unattended run from a user's shell or cron ever met it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError
from tlpipe.params.fields import params_hash, to_dict

PARENT_ENV = "TLPIPE_PARENT_RUN_ID"
EXPERIMENT_ENV = "TLPIPE_EXPERIMENT"
DEADLINE_ENV = "TLPIPE_TRACKING_DEADLINE"
# A key unique to one Kubeflow run, the same in all its pods: the Argo workflow name (pod label
# workflows.argoproj.io/workflow) on a cluster, `local-…` under run-local.
RUN_KEY_ENV = "TLPIPE_KFP_RUN"
RUN_KEY_TAG = "tlpipe.kfp_run"
DEFAULT_URI = "sqlite:///mlflow.db"
# Runs a lost server left RUNNING (this working directory's), closed by the next step run.
LOST_RUNS = Path(".tlpipe/lost-runs.json")
CLOSED_TAG = "tlpipe.closed_reason"
RESUMED_FROM_TAG = "tlpipe.resumed_from"
DEFAULT_EXPERIMENT = "tlpipe"

# mlflow's own client retries a failed request 7 times with exponential backoff (minutes of
# waiting) and waits 120 s for a reply; the watchdog bounds a whole step's calls anyway.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_MAX_PARAM_CHARS = 6000  # mlflow's limit on a param value
_BATCH = 100  # mlflow's limit on params per log_batch call (metrics allow 1000)


class TrackingLost(BaseException):  # noqa: N818 — not an Exception: mlflow must not wrap it
    """The tracking server stopped answering during a step; the step was stopped.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` in mlflow or
    requests turns it into another error on its way out of the call it interrupted.
    """


def disable_mlflow_telemetry() -> None:
    """Turn MLflow's usage telemetry off for this process and the ones it starts.

    Effective when called before mlflow is first imported (mlflow starts its telemetry client
    at import): the entry points call it first thing. Set, not defaulted: a user's
    MLFLOW_DISABLE_TELEMETRY=false would bring the crash back.
    """
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


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
    problem = "no answer"
    for i in range(attempts):
        problem = _health(uri, timeout)
        if problem is None:
            return
        if i + 1 < attempts:
            time.sleep(backoff * 2**i)
    raise TlpipeError(
        f"MLflow tracking server at {uri} is unreachable after {attempts} tries ({problem}): "
        "start it or set MLFLOW_TRACKING_URI"
    )


def _health(uri: str, timeout: float) -> str | None:
    """None if `uri`/health answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e)) or type(e).__name__


def connect() -> Any:
    """Point mlflow at `tracking_uri()`, check the server, return a client.

    Lowers mlflow's HTTP retries/timeout (unless set in the environment). A sqlite store is
    created under a file lock: two first runs at once would both run its migrations.
    """
    disable_mlflow_telemetry()
    import mlflow

    uri = tracking_uri()
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(tracking_uri=uri)
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = mlflow.MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates the store
    return client


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


def start_pipeline_run(run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create the parent run of a pipeline run and return its id.

    The caller exports the id as `TLPIPE_PARENT_RUN_ID` to the step processes it starts (or
    tags it with the Kubeflow run key) and ends it with `end_pipeline_run`.
    """
    client = connect()
    experiment_id = _experiment_id(client, experiment_name())
    all_tags = {**lineage_tags(), "tlpipe.kind": "pipeline", **(tags or {})}
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED, FAILED or KILLED."""
    connect().set_terminated(run_id, status)


def parent_run_id() -> str | None:
    """The parent run of this process's step: `TLPIPE_PARENT_RUN_ID`, else the run tagged with
    this Kubeflow run's key (`TLPIPE_KFP_RUN`), else None (the step run stands alone).

    Kubeflow steps cannot take the parent run id as an *input*: it changes every run, so it
    would change their cache keys and nothing would ever be cached (and an exit handler may
    not take inputs from other tasks). Every pod of a run has the run key instead.
    """
    parent = os.environ.get(PARENT_ENV)
    key = os.environ.get(RUN_KEY_ENV, "")
    if parent or not key or "'" in key:
        return parent or None
    client = connect()
    experiment = client.get_experiment_by_name(experiment_name())
    found = []
    if experiment is not None:
        query = f"tags.`{RUN_KEY_TAG}` = '{key}'"
        found = client.search_runs([experiment.experiment_id], query, max_results=1)
    if not found:
        print(f"tlpipe: no MLflow run tagged {RUN_KEY_TAG}={key}; logging without a parent")
        return None
    return found[0].info.run_id


@dataclasses.dataclass(frozen=True)
class StepRun:
    """Handle on the active step run, yielded by `step_run`."""

    run_id: str
    uri: str

    def log_result(self, result: Any) -> None:
        """Log a `StepResult`: metrics, history as curves (step = epoch), artifacts."""
        rows = [(result.metrics, None)]
        rows += [(row, int(row.get("epoch", i))) for i, row in enumerate(result.history)]
        self._log_points(rows)
        client = self._client()
        for path in result.artifacts:
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), path.name)
            elif path.exists():
                client.log_artifact(self.run_id, str(path))
        if getattr(result, "dataset_sha256", None):  # prepare: the data version it made
            client.set_tag(self.run_id, "tlpipe.dataset_sha256", result.dataset_sha256)

    def _log_points(self, rows: list[tuple[dict[str, Any], int | None]]) -> None:
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
    step: str, cfg: Any = None, *, tags: dict[str, str] | None = None
) -> Iterator[StepRun]:
    """The active mlflow run of one step: a child of `parent_run_id()`, or standalone.

    Logs the flattened config as params and the lineage tags (`tlpipe.step`, git commit and
    dirty flag, `tlpipe.params_hash`, `tlpipe.version`, plus `tags`). The run ends FINISHED,
    FAILED (with a `tlpipe.error` tag) if the block raises, or KILLED on a signal. Being the
    active run, it also receives anything logged with `mlflow.*` inside the block.

    A watchdog checks an http(s) server all along: if it stays silent for the deadline, the
    block is stopped with `TrackingLost` wherever it is, and nothing more is sent to it.
    """
    import mlflow

    client = connect()
    with Watchdog(tracking_uri(), step) as watchdog:
        all_tags = {**lineage_tags(), "tlpipe.step": step, **(tags or {})}
        if cfg is not None:
            all_tags["tlpipe.params_hash"] = params_hash(cfg)
        parent = parent_run_id()
        if parent:
            experiment_id = _parent_experiment(client, parent)
            all_tags["mlflow.parentRunId"] = parent
        else:
            experiment_id = _experiment_id(client, experiment_name())
        run = mlflow.start_run(experiment_id=experiment_id, run_name=step, tags=all_tags)
        try:
            close_lost_runs(client, run.info.run_id, step)
            if cfg is not None:
                _log_params(client, run.info.run_id, flatten(to_dict(cfg)))
            yield StepRun(run.info.run_id, mlflow.get_tracking_uri())
        except BaseException as e:
            if not watchdog.lost:
                status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
                _quietly(mlflow.set_tag, "tlpipe.error", f"{type(e).__name__}: {e}"[:4000])
                _quietly(mlflow.end_run, status)
            else:  # the server cannot hear it now: the next step run here closes them
                _remember_lost({run.info.run_id: step, **({parent: "pipeline"} if parent else {})})
            raise
        else:
            mlflow.end_run("FINISHED")


def _remember_lost(runs: dict[str, str]) -> None:
    """Add `runs` (run id → step) to LOST_RUNS: left RUNNING because the server was lost."""
    _quietly(_write_lost, {**_read_lost(), **runs})


def _read_lost() -> dict[str, str]:
    import json

    try:
        return dict(json.loads(LOST_RUNS.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _write_lost(runs: dict[str, str]) -> None:
    import json

    if not runs:
        LOST_RUNS.unlink(missing_ok=True)
        return
    LOST_RUNS.parent.mkdir(parents=True, exist_ok=True)
    tmp = LOST_RUNS.with_name(f".{LOST_RUNS.name}.{os.getpid()}")
    tmp.write_text(json.dumps(runs, indent=1))
    os.replace(tmp, LOST_RUNS)


def close_lost_runs(client: Any, run_id: str, step: str) -> list[str]:
    """End KILLED, with a tag saying why, the runs a lost server left RUNNING here
    (LOST_RUNS); tag run `run_id` with the run of the same step it resumes. Returns the
    closed ids. A run the server does not know (another server) is forgotten."""
    from mlflow.exceptions import MlflowException

    lost, closed = _read_lost(), []
    if not lost:
        return closed
    for old, old_step in lost.items():
        try:
            if client.get_run(old).info.status == "RUNNING":
                why = f"the tracking server was lost during this {old_step} run"
                why += f"; closed KILLED by run {run_id}"
                client.set_tag(old, CLOSED_TAG, why)
                client.set_terminated(old, "KILLED")
                closed.append(old)
        except MlflowException:
            continue  # not on this server
        if old_step == step:
            client.set_tag(run_id, RESUMED_FROM_TAG, old)
    _write_lost({})
    return closed


class Watchdog:
    """Stops the main thread with `TrackingLost` when the tracking server goes silent.

    A daemon thread asks `/health` every `interval` seconds; once no answer has come for
    `deadline` seconds (a dead server refuses at once, a hung one times out), it sends SIGUSR1
    to the main thread, whose handler raises `TrackingLost`. That interrupts training as well
    as a tracking call blocked on a socket. One deadline for the whole step, not one per call.
    Non-http URIs, and callers off the main thread, get no watchdog.
    """

    def __init__(self, uri: str, step: str, deadline: float | None = None, interval: float = 2.0):
        self.uri, self.step, self.interval = uri, step, interval
        self.deadline = deadline or float(os.environ.get(DEADLINE_ENV) or 15)
        self.lost = False
        self._stop = threading.Event()
        self._active = uri.startswith(("http://", "https://")) and (
            threading.current_thread() is threading.main_thread()
        )

    def __enter__(self) -> Watchdog:
        if self._active:
            self._previous = signal.signal(signal.SIGUSR1, self._raise)
            self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self._stop.set()
            self._thread.join(timeout=self.interval + 6)
            signal.signal(signal.SIGUSR1, self._previous)

    def _watch(self) -> None:
        last_ok, main = time.monotonic(), threading.main_thread().ident
        while not self._stop.wait(self.interval):
            if _health(self.uri, timeout=min(3.0, self.deadline / 3)) is None:
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok > self.deadline and not self._stop.is_set():
                self.lost = True
                # whatever still calls the server (mlflow's atexit end_run) fails at once
                os.environ.update(
                    MLFLOW_HTTP_REQUEST_TIMEOUT="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"
                )
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    def _raise(self, *_: object) -> None:
        if self.lost and not self._stop.is_set():
            raise TrackingLost(
                f"MLflow tracking server at {self.uri} stopped answering during `{self.step}` "
                f"(nothing for {self.deadline:.0f} s): the step was stopped, its resume file "
                "kept; bring the server back and run the same command again to continue"
            )


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
