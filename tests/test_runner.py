"""The runner owns the failures around a step: tried against real MLflow servers and real DVC.

A tracking server killed or frozen mid-step, SIGTERM to `tlpipe run`, two first runs creating
the tracking database at once, a step killed with SIGKILL leaving temporary outputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_server import start_server, stop_server
from projects import dvc_project, project_env, start_run

from tlpipe import fsio, runner, tracking
from tlpipe.errors import TlpipeError
from tlpipe.params import resolver

# A pretrain on the tiny data that lasts ~20-30 s on 2 busy cores: long enough to lose the
# server in the middle of it, short enough to resume.
LONG_PRETRAIN = [
    "pretrain.train.epochs=40",
    "pretrain.train.steps_per_epoch=40",
    "pretrain.train.batch_size=32",
]


def _pretrain(prepared: Path, work: Path, env: dict[str, str]) -> subprocess.Popen:
    sets = [a for s in LONG_PRETRAIN for a in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "tlpipe.cli",
        "pretrain",
        "--prepared",
        str(prepared),
        "--out",
        "source.pt",
        "--checkpoints",
        "ck",
        *sets,
    ]
    return subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


# A frozen server (the watchdog's deadline) runs by default; a killed one (refused connections,
# the same recovery path) in `make test-slow`: each is a ~70 s pretrain on 2 cores.
@pytest.mark.parametrize("failure", [pytest.param("killed", marks=pytest.mark.slow), "frozen"])
def test_lost_server_stops_the_step_in_one_line_and_keeps_its_resume_file(
    failure: str, tiny_prepared: Path, tmp_path: Path
) -> None:
    server, uri = start_server(tmp_path / "server")
    try:
        proc = _pretrain(tiny_prepared, tmp_path, project_env(uri))
        resume = tmp_path / "ck/pretrain.resume.pt"
        _wait_for(resume, proc)
        lost_at = time.monotonic()
        os.killpg(server.pid, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - lost_at
    finally:
        stop_server(server)
    lines = [line for line in err.splitlines() if "epoch" not in line]
    assert proc.returncode == 1, err
    assert lines == [lines[-1]] and lines[-1].startswith("error: MLflow tracking server"), err
    assert "stopped answering during `pretrain`" in err and "Traceback" not in err
    assert stopped_after < 30, stopped_after
    assert resume.exists() and not (tmp_path / "source.pt").exists()
    lost = fsio.read_json(tmp_path / tracking.LOST_RUNS)  # the run the dead server holds
    assert list(lost.values()) == ["pretrain"]
    (lost_id,) = lost

    # the server is back, on the same store: the same command continues where it stopped,
    # ends the run the lost server left RUNNING, and links to it
    import mlflow

    server, uri = start_server(tmp_path / "server")
    try:
        again = _pretrain(tiny_prepared, tmp_path, project_env(uri))
        _, err = again.communicate(timeout=300)
        client = mlflow.MlflowClient(tracking_uri=uri)
        old = client.get_run(lost_id)
        (new,) = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`{tracking.RESUMED_FROM_TAG}` = '{lost_id}'",
        )
    finally:
        stop_server(server)
    assert again.returncode == 0, err
    assert "pretrain: resuming after epoch" in err
    assert (tmp_path / "source.pt").exists() and not resume.exists()
    assert old.info.status == "KILLED" and new.info.status == "FINISHED"
    assert "tracking server was lost" in old.data.tags[tracking.CLOSED_TAG]
    assert new.info.run_id in old.data.tags[tracking.CLOSED_TAG]
    assert not (tmp_path / tracking.LOST_RUNS).exists()


def test_sigterm_to_tlpipe_run_stops_dvc_and_its_stage_and_marks_runs_killed(
    mlflow_server: str, tmp_path: Path
) -> None:
    import mlflow

    work = dvc_project(tmp_path)
    env = project_env(mlflow_server)
    proc = start_run(work, env)
    _wait_for(work / "checkpoints/pretrain/pretrain.resume.pt", proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): run the same command again to resume" in err
    assert not _processes_in(work), "processes left running"

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(env["TLPIPE_EXPERIMENT"]).experiment_id
    runs = {r.data.tags["mlflow.runName"]: r.info.status for r in client.search_runs([experiment])}
    assert runs["pipeline"] == "KILLED" and runs["pretrain"] == "KILLED", runs
    assert runs["prepare"] == "FINISHED", runs
    assert (work / "checkpoints/pretrain/pretrain.resume.pt").exists()


def _processes_in(work: Path) -> list[str]:
    """Command lines of live processes whose working directory is `work`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == work:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def test_a_failing_step_leaves_a_failed_run_with_its_error(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    for key, value in project_env(mlflow_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    (tmp_path / "raw").mkdir()
    with pytest.raises(TlpipeError):
        runner.run_step(
            "prepare", resolver.resolve({}), raw_dir=tmp_path / "raw", out_dir=tmp_path / "out"
        )
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(os.environ["TLPIPE_EXPERIMENT"]).experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FAILED" and run.data.tags["tlpipe.step"] == "prepare"
    assert run.data.tags["tlpipe.error"].startswith("TlpipeError: ")
    assert not (tmp_path / "out").exists()


def test_two_first_runs_create_the_sqlite_store_safely(tmp_path: Path) -> None:
    code = "from tlpipe import tracking; print(tracking.start_pipeline_run('p'))"
    for i in range(3):  # a fresh database each time: the race is in its creation
        env = project_env(f"sqlite:///{tmp_path / f'mlflow{i}.db'}", TLPIPE_EXPERIMENT="tlpipe")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]


def test_temporary_outputs_of_a_killed_step_are_removed_by_the_next_run(tmp_path: Path) -> None:
    code = (
        "import time; from tlpipe import fsio\n"
        "with fsio.atomic_path('export') as tmp:\n"
        "    tmp.mkdir(); print(tmp, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    orphan = tmp_path / Path(proc.stdout.readline().strip()).name
    assert orphan.is_dir() and orphan.name.startswith(f".export.{proc.pid}.")
    proc.kill()  # SIGKILL: no `finally` runs
    proc.wait()
    with fsio.atomic_path(tmp_path / "export") as tmp:
        tmp.mkdir()
    assert not orphan.exists() and (tmp_path / "export").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_float64_switch_trains_the_step_in_float64_and_restores_the_default(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLPIPE_FLOAT64=1 (parity checks of data-parallel runs) holds for the step only."""
    import torch

    monkeypatch.setenv(runner.FLOAT64_ENV, "1")
    params = resolver.resolve({}, ["pretrain.train.epochs=1"])
    out = tmp_path / "source.pt"
    runner.run_step("pretrain", params, track=False, prepared_dir=tiny_prepared, out_model=out)
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["head.weight"].dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32
