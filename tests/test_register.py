"""register: the pure gate, and register.run against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tlpipe.errors import TlpipeError
from tlpipe.release import registry
from tlpipe.release.promotion import Candidate, decide
from tlpipe.steps import register
from tlpipe.steps.register import RegisterConfig

CFG = RegisterConfig(accuracy_floor=0.5, min_improvement=0.01)
CHAMP = Candidate("3", 0.80, "t1", True)


@pytest.mark.parametrize(
    ("new", "champion", "alias", "reason"),
    [
        (Candidate("4", 0.90, "t1", True), None, "champion", "no champion yet"),
        (Candidate("4", 0.82, "t1", True), CHAMP, "champion", "beats champion v3"),
        (Candidate("4", 0.805, "t1", True), CHAMP, "challenger", "by at least 0.01"),
        (Candidate("4", 0.80, "t1", True), CHAMP, "challenger", "does not beat"),
        (Candidate("4", 0.70, "t1", True), CHAMP, "challenger", "does not beat champion v3"),
        (Candidate("4", 0.99, "t1", False), None, "challenger", "parity check failed"),
        (Candidate("4", 0.40, "t1", True), None, "challenger", "below the floor 0.5000"),
        (Candidate("4", 0.99, "t2", True), CHAMP, "challenger", "different test data"),
        (Candidate("3", 0.80, "t1", True), CHAMP, "champion", "already the champion"),
    ],
)
def test_decide(new, champion, alias, reason):
    decision = decide(new, champion, CFG)
    assert decision.alias == alias
    assert decision.promoted == (alias == "champion")
    assert reason in decision.reason


def test_decide_tie_never_promotes_even_without_min_improvement():
    cfg = RegisterConfig(min_improvement=0.0)
    assert not decide(Candidate("4", 0.1 + 0.7, "t1", True), CHAMP, cfg).promoted
    assert decide(Candidate("4", 0.8 + 1 / 2000, "t1", True), CHAMP, cfg).promoted


def test_missing_parity_is_a_tlpipe_error(tmp_path, checkpoint):
    with pytest.raises(TlpipeError, match="parity.json not found"):
        register.run(tmp_path, checkpoint, CFG)


# --- against the real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from tlpipe.train.checkpoint import CheckpointMeta
    from tlpipe.train.models import build_model, save_checkpoint

    path = tmp_path_factory.mktemp("models") / "target.pt"
    net = build_model("small_cnn", 3, in_chans=1, input_size=28)
    meta = CheckpointMeta(
        arch="small_cnn",
        in_chans=1,
        input_size=28,
        classes=("a", "b", "c"),
        mean=(0.3,),
        std=(0.35,),
        dataset_sha256="d" * 64,
    )
    return save_checkpoint(path, net, meta)


def make_export(
    root: Path, accuracy: float, passed: bool = True, test_sha: str = "t1", int8: bool = True
) -> Path:
    """An export/ dir: register only logs the ONNX files, so any bytes will do.

    `int8=False`: the INT8 file failed its parity at export, so there is none."""
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"fp32 onnx")
    if int8:
        (root / "model.int8.onnx").write_bytes(b"int8 onnx")
    parity = {
        "passed": passed,
        "max_abs_diff": 1e-6,
        "argmax_agreement": 1.0,
        "fp32": {"accuracy": accuracy, "size_bytes": 9},
        "int8": {"accuracy": accuracy - 0.01, "size_bytes": 9, "published": int8},
        "test_sha256": test_sha,
    }
    (root / "parity.json").write_text(json.dumps(parity))
    return root


def _champion(client, name: str) -> str:
    return client.get_model_version_by_alias(name, "champion").version


def test_gate_promotes_better_and_refuses_worse(server, tmp_path, checkpoint):
    import mlflow

    cfg = RegisterConfig(model_name=f"m-{uuid.uuid4().hex[:8]}", min_improvement=0.01)
    client = mlflow.MlflowClient(tracking_uri=server)
    first = register.run(make_export(tmp_path / "a", 0.80), checkpoint, cfg)
    assert (first.alias, first.promoted) == ("champion", True)
    better = register.run(make_export(tmp_path / "b", 0.85), checkpoint, cfg)
    assert better.promoted and "beats champion v" + first.version in better.reason
    worse = register.run(make_export(tmp_path / "c", 0.855), checkpoint, cfg)
    assert (worse.alias, worse.promoted) == ("challenger", False)
    assert "by at least 0.01" in worse.reason
    assert _champion(client, cfg.model_name) == better.version
    assert client.get_model_version_by_alias(cfg.model_name, "challenger").version == worse.version

    tags = client.get_model_version(cfg.model_name, worse.version).tags
    assert tags["gate_decision"] == "challenger" and tags["gate_reason"] == worse.reason
    assert float(tags["accuracy"]) == 0.855 and tags["test_sha256"] == "t1"
    assert tags["dataset_sha256"] == "d" * 64 and tags["parity_passed"] == "true"
    run_id = client.get_model_version(cfg.model_name, worse.version).run_id
    files = {a.path for a in client.list_artifacts(run_id, "onnx")}
    assert files == {"onnx/model.onnx", "onnx/model.int8.onnx"}
    assert worse.metrics == {"accuracy": 0.855, "promoted": 0.0, "parity_passed": 1.0}


def test_an_unpublished_int8_is_neither_logged_nor_tagged(server, tmp_path, checkpoint):
    import mlflow

    cfg = RegisterConfig(model_name=f"m-{uuid.uuid4().hex[:8]}")
    client = mlflow.MlflowClient(tracking_uri=server)
    result = register.run(make_export(tmp_path / "a", 0.80, int8=False), checkpoint, cfg)
    version = client.get_model_version(cfg.model_name, result.version)
    assert {a.path for a in client.list_artifacts(version.run_id, "onnx")} == {"onnx/model.onnx"}
    assert "onnx_int8_sha256" not in version.tags and "onnx_sha256" in version.tags


def test_parity_floor_and_test_data_block_promotion(server, tmp_path, checkpoint):
    import mlflow

    cfg = RegisterConfig(model_name=f"m-{uuid.uuid4().hex[:8]}", accuracy_floor=0.5)
    client = mlflow.MlflowClient(tracking_uri=server)
    broken = register.run(make_export(tmp_path / "a", 0.95, passed=False), checkpoint, cfg)
    assert not broken.promoted and "parity check failed" in broken.reason
    weak = register.run(make_export(tmp_path / "b", 0.40), checkpoint, cfg)
    assert not weak.promoted and "below the floor" in weak.reason
    with pytest.raises(mlflow.exceptions.MlflowException):
        _champion(client, cfg.model_name)  # neither became champion
    good = register.run(make_export(tmp_path / "c", 0.90), checkpoint, cfg)
    assert good.promoted
    other = register.run(make_export(tmp_path / "d", 0.99, test_sha="t2"), checkpoint, cfg)
    assert not other.promoted and "different test data" in other.reason
    assert _champion(client, cfg.model_name) == good.version


def test_gate_replays_a_register_still_in_flight(server):
    """A racer that read "no champion" before us must not end up champion if it is worse."""
    import mlflow

    cfg = RegisterConfig(model_name=f"m-{uuid.uuid4().hex[:8]}")
    client = mlflow.MlflowClient(tracking_uri=server)
    client.create_registered_model(cfg.model_name)
    run = client.create_run(client.create_experiment(cfg.model_name)).info

    def pending(accuracy: float) -> str:
        tags = {
            "accuracy": str(accuracy),
            "test_sha256": "t1",
            "parity_passed": "true",
            "gate_decision": "pending",
        }
        source = run.artifact_uri + "/model"
        return client.create_model_version(cfg.model_name, source, run.run_id, tags).version

    good, bad = pending(0.9), pending(0.7)  # `good` is registered but its gate has not run
    mlflow.set_tracking_uri(server)
    decision = registry.promote(cfg.model_name, bad, cfg)
    assert not decision.promoted and f"does not beat champion v{good}" in decision.reason
    assert _champion(client, cfg.model_name) == good
    # `good`'s register now writes the alias late from a stale read; its own gate repairs it
    client.set_registered_model_alias(cfg.model_name, "champion", bad)
    assert registry.promote(cfg.model_name, good, cfg).promoted
    assert _champion(client, cfg.model_name) == good


def _keep_champion_at_once(name: str, versions: list[str]) -> list[Exception]:
    """`registry.keep_champion` for each version, in threads released at the same moment;
    the exceptions they raised."""
    import threading

    start, errors = threading.Barrier(len(versions)), []

    def write(version: str) -> None:
        start.wait()
        try:
            registry.keep_champion(name, version, "racing")
        except Exception as e:  # noqa: BLE001 - the caller asserts there are none
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_simultaneous_first_writes_of_an_alias_both_succeed(server):
    """MLflow writes an alias select-then-insert: when two registers set a model's first
    `challenger` (or `champion`) at the same moment, both insert and the server answers
    BAD_REQUEST (UNIQUE constraint) to one. Measured with a bare client: 8 of 30 such pairs
    failed on this server, 19 of 20 on Postgres. The registry's writes retry the loser."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server)
    run = client.create_run(client.create_experiment(f"e-{uuid.uuid4().hex[:8]}")).info
    for _ in range(20):  # 20 fresh models: a bare client fails one of them nearly always
        name = f"m-{uuid.uuid4().hex[:8]}"
        client.create_registered_model(name)
        versions = [
            client.create_model_version(name, run.artifact_uri + "/model", run.run_id).version
            for _ in range(2)
        ]
        errors = _keep_champion_at_once(name, versions)
        assert errors == []
        assert client.get_model_version_by_alias(name, "challenger").version in versions
        for v in versions:
            assert client.get_model_version(name, v).tags["gate_reason"] == "racing"


RACER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tlpipe.steps import register

    export_dir, model, name = sys.argv[1:4]
    result = register.run(Path(export_dir), Path(model), register.RegisterConfig(model_name=name))
    print("RESULT", result.version, result.alias)
    """
)


def _result_line(stdout: str) -> list[str]:
    return next(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT "))


def test_racing_registers_leave_the_better_model_champion(server, tmp_path, checkpoint):
    import mlflow

    name = f"m-{uuid.uuid4().hex[:8]}"
    exports = [make_export(tmp_path / "worse", 0.70), make_export(tmp_path / "better", 0.90)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(e), str(checkpoint), name],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for e in exports
    ]
    stdouts = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]  # (their tracebacks: captured stderr)
    outs = [_result_line(out) for out in stdouts]
    (worse_version, worse_alias), (better_version, better_alias) = outs
    client = mlflow.MlflowClient(tracking_uri=server)
    assert better_alias == "champion"
    assert _champion(client, name) == better_version
    # The worse one was champion only if its whole register ran before the better one's.
    decision = client.get_model_version(name, worse_version).tags["gate_decision"]
    assert decision == worse_alias
    assert worse_alias == "challenger" or int(worse_version) < int(better_version)
