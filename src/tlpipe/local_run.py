"""`tlpipe run`: the whole pipeline on this machine, `dvc repro` under one MLflow parent run.

Safe to call from cron or a systemd timer:

- a lock (`.tlpipe/run.lock`, held with flock for the whole run): a second `tlpipe run` in the
  same project says in one line which run holds it and exits non-zero; a crashed run's lock
  goes with its process;
- `fetch` always runs (`always_changed` in dvc.yaml) and hashes the data, then `check`
  compares it with the champion's data (`tlpipe.steps.check`) before anything trains; when
  data, code and params are what the last run saw, DVC skips every other stage: a quick
  no-op, exit 0;
- one log line per run saying what changed: the stages whose inputs or outputs differ from
  the last run (dvc.lock before and after).

Ctrl-C or SIGTERM stops `dvc repro` and the stage it runs (their runs end KILLED).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.signals import sigterm_raises

LOCK = Path(".tlpipe/run.lock")


def run(force: bool = False, track: bool = True) -> list[str]:
    """Run the pipeline here; returns the stages whose lock entry changed (empty: a no-op)."""
    from tlpipe import runner, tracking
    from tlpipe.params import fields, resolver

    resolved = resolver.resolve("params.yaml")  # a bad params.yaml fails before any stage
    with _lock():
        before = _lock_entries()
        env, parent = dict(os.environ), None
        if track and not env.get(runner.NO_TRACK_ENV):
            tags = {"tlpipe.params_hash": fields.params_hash(resolved.as_dict())}
            parent = env[tracking.PARENT_ENV] = tracking.start_pipeline_run("pipeline", tags)
        else:
            env[runner.NO_TRACK_ENV] = "1"
        status, code = "KILLED", -1
        repro = [sys.executable, "-m", "dvc", "repro", *(["--force"] * force)]
        training = [*repro, "--downstream", "pretrain", "baseline"]  # the rest, once each
        try:  # fetch, prepare and the data check first: bad data stops before any training
            code = _run_stages([*repro, "check"], env) or _run_stages(training, env)
            status = "FINISHED" if code == 0 else "FAILED"
        finally:
            after = _lock_entries()
            changed = [s for s, entry in after.items() if before.get(s) != entry]
            if parent:
                _end_quietly(parent, status, changed)
    if code != 0:
        raise TlpipeError(f"`dvc repro` failed (exit {code}); the stage's error is printed above")
    return changed


def describe(changed: list[str]) -> str:
    """The run's log line (fetch and check run every time: they alone mean no retraining)."""
    if not set(changed) - {"fetch", "check"}:
        return "tlpipe run: data, code and params unchanged since the last run: nothing retrained"
    line = f"tlpipe run: re-ran {', '.join(changed)}"
    decision = Path("registry.json")
    if "register" in changed and decision.exists():
        from tlpipe.fsio import read_json

        d = read_json(decision)
        line += f"; registered v{d['version']} → {d['alias']}"
    return line


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Hold `.tlpipe/run.lock` for the block, or fail at once naming the run that holds it."""
    LOCK.parent.mkdir(exist_ok=True)
    with open(LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise TlpipeError(
                f"another `tlpipe run` is running in this project ({holder}); it holds {LOCK}: "
                "wait for it to end (or stop it) and run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield


def _lock_entries() -> dict[str, object]:
    """dvc.lock's stage entries (what each stage last ran with and produced)."""
    import yaml

    path = Path("dvc.lock")
    if not path.exists():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("stages") or {})


def _run_stages(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` in its own process group; on SIGINT/SIGTERM stop the whole group, then raise.

    The group holds dvc and the stage it runs: both get SIGTERM, so the stage's run ends
    KILLED and nothing goes on running after `tlpipe run` has returned.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    with sigterm_raises():
        try:
            return proc.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def _end_quietly(run_id: str, status: str, changed: list[str]) -> None:
    """Close the parent run; a dead server must not hide the stages' outcome."""
    from tlpipe import tracking

    try:
        tracking.connect().set_tag(run_id, "tlpipe.changed_stages", ",".join(changed) or "-")
        tracking.end_pipeline_run(run_id, status)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not mark the pipeline run {status}: {e}", file=sys.stderr)
