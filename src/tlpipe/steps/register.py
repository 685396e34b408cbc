"""register: log the exported model to MLflow, create a registry version, gate `champion`.

The gate (`tlpipe.release.promotion.decide`) moves alias `champion` to the new version only if ONNX
parity passed, its accuracy is at least `accuracy_floor`, and it beats the current champion.
With this run's prepared data, `run` scores the champion's own ONNX file on this run's test
split next to the new one (`tlpipe.release.paired`): the new model must gain more than
`min_improvement` on the same images, the gain must be significant (McNemar p <
`significance`) and no class may lose more than `max_class_recall_drop` recall. Without a
paired comparison, accuracies measured on the *same test data* (tag `test_sha256`) are
compared; a champion measured on other data cannot be, so the new version stays challenger.
Tags `gate_decision`, `gate_reason` and `paired_comparison` on the version say what happened.

Race safety: two registers running at once must never leave the worse model as champion.
Each version is created tagged `gate_decision=pending`; `gate` then replays, in version-number
order, the gate over every version that was still in flight when it started or came after it,
starting from the champion it read, and compare-and-sets the alias until a re-read agrees.
The outcome is the one a serial run of the registers, in version order, would have given.

This is the one step that talks to MLflow itself (registering is its job). It logs into the
active run when a wrapper opened one (`tracking.step_run`), else opens its own run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.edge.pull import sign
from tlpipe.errors import TlpipeError
from tlpipe.fsio import sha256_file, write_json
from tlpipe.params import RegisterConfig
from tlpipe.release.paired import Paired
from tlpipe.release.promotion import CHALLENGER, CHAMPION, Candidate, Decision, decide, replay
from tlpipe.steps import StepResult
from tlpipe.steps.export import read_parity

PENDING = "pending"
_STALE_MS = 10 * 60 * 1000  # a version pending this long belongs to a register that died
_MAX_ROUNDS = 20


@dataclasses.dataclass(frozen=True)
class RegisterResult(StepResult):
    version: str
    alias: str
    promoted: bool
    reason: str


def precheck(export_dir: Path, cfg: RegisterConfig) -> Decision:
    """The part of the gate that needs no registry: ONNX parity passed, accuracy ≥ the floor.

    The Kubeflow DAG registers only a model that passes it (`dsl.If` on the gate task); `run`
    then decides champion vs challenger against the registry.
    """
    parity = read_parity(Path(export_dir))
    acc = float(parity["fp32"]["accuracy"])
    new = Candidate("new", acc, parity["test_sha256"], bool(parity["passed"]))
    decision = decide(new, None, cfg)
    if not decision.promoted:
        return decision
    return Decision(CHAMPION, f"ONNX parity passed and accuracy {acc:.4f} ≥ floor "
                              f"{cfg.accuracy_floor:.4f}")  # fmt: skip


def run(
    export_dir: Path,
    model_path: Path,
    cfg: RegisterConfig,
    prepared_dir: Path | None = None,
    decision_path: Path | None = None,
) -> RegisterResult:
    """Log model + ONNX files, register a version, run the gate; returns the alias given.

    Args:
        prepared_dir: this run's prepared data: the champion is scored on its test split.
        decision_path: gets the outcome as JSON (version, alias, promoted, reason).
    """
    export_dir = Path(export_dir)
    parity = read_parity(export_dir)
    onnx_files = [export_dir / "model.onnx"]
    int8 = parity.get("int8")
    if int8 is not None and int8.get("published", True):
        onnx_files.append(export_dir / "model.int8.onnx")  # only an INT8 that passed its parity
    for path in onnx_files:
        if not path.exists():
            raise TlpipeError(f"{path} not found: run `tlpipe export` first")
    import mlflow

    with _active_run(cfg) as run_id:
        for path in onnx_files:
            mlflow.log_artifact(str(path), "onnx")
        mlflow.log_artifact(str(export_dir / "parity.json"))
        if prepared_dir is not None:  # what `tlpipe check` compares the next run's data with
            mlflow.log_artifact(str(Path(prepared_dir) / "manifest.json"), "data")
        model_uri, dataset_sha = _log_pytorch(Path(model_path))
        paired = _score_champion(cfg.model_name, export_dir, prepared_dir) if prepared_dir else None
        tags = {
            "accuracy": repr(parity["fp32"]["accuracy"]),
            "int8_accuracy": repr((parity.get("int8") or {}).get("accuracy", float("nan"))),
            "test_sha256": parity["test_sha256"],
            "dataset_sha256": dataset_sha,
            "parity_passed": str(bool(parity["passed"])).lower(),
            "onnx_uri": f"runs:/{run_id}/onnx/model.onnx",
            "onnx_sha256": sha256_file(onnx_files[0]),
            "gate_decision": PENDING,
            **(paired.tags() if paired else {}),
        }
        if len(onnx_files) > 1:  # no tag, no INT8 for devices: `pull --variant int8` refuses
            tags["onnx_int8_sha256"] = sha256_file(onnx_files[1])
        if key := os.environ.get("TLPIPE_SIGNING_KEY"):  # devices with the key check these
            for name in ("onnx_sha256", "onnx_int8_sha256")[: len(onnx_files)]:
                tags[f"{name}_hmac"] = sign(tags[name], key)
        version = mlflow.register_model(model_uri, cfg.model_name, tags=tags).version
        decision = gate(cfg.model_name, str(version), cfg)
        mlflow.set_tags(
            {
                "tlpipe.registered_version": version,
                "gate_decision": decision.alias,
                "gate_reason": decision.reason,
            }
        )
    metrics = {
        "accuracy": float(parity["fp32"]["accuracy"]),
        "promoted": float(decision.promoted),
        "parity_passed": float(bool(parity["passed"])),
    }
    if paired is not None:
        metrics |= {"champion_accuracy_same_images": paired.champion_accuracy,
                    "paired_gain_points": 100 * paired.gain, "mcnemar_p": paired.p_value,
                    "worst_class_recall_drop_points": 100 * paired.worst_recall_drop}  # fmt: skip
    summary = f"{cfg.model_name} v{version} → {decision.alias}: {decision.reason}"
    if decision_path is not None:
        outcome = {"version": str(version), "alias": decision.alias,
                   "promoted": decision.promoted, "reason": decision.reason}  # fmt: skip
        write_json(decision_path, outcome)
    return RegisterResult(str(version), decision.alias, decision.promoted, decision.reason,
                          metrics=metrics, summary=summary)  # fmt: skip


def gate(model_name: str, version: str, cfg: RegisterConfig) -> Decision:
    """Run the gate for registered `version` (tagged by `run`), race-safely; tag the result."""
    import mlflow

    client = mlflow.MlflowClient()
    # Snapshot the versions *before* reading the champion: a register that finishes in
    # between has then either moved the alias before our read or is in our snapshot.
    versions = _versions(client, model_name)
    me = versions[version]
    if _candidate(me) is None:
        raise TlpipeError(
            f"{model_name} v{version} lacks the accuracy/test_sha256/parity tags "
            "that `register.run` sets; register it with tlpipe"
        )
    in_flight = {
        v.version
        for v in versions.values()
        if v.tags.get("gate_decision") == PENDING
        and int(v.version) < int(version)
        and me.creation_timestamp - v.creation_timestamp < _STALE_MS
    }
    base = _champion(client, model_name)
    for _ in range(_MAX_ROUNDS):
        contenders = [
            c
            for v in versions.values()
            if (v.version in in_flight or int(v.version) >= int(version))
            and (c := _candidate(v)) is not None
        ]
        target, decisions = replay(base, contenders, cfg)
        current = _champion(client, model_name)
        if target is None or (current is not None and current.version == target.version):
            break
        client.set_registered_model_alias(model_name, CHAMPION, target.version)
        time.sleep(random.uniform(0.05, 0.25))  # let a racing writer finish, then re-check
        versions = _versions(client, model_name)
    else:
        raise TlpipeError(
            f"could not settle alias {CHAMPION!r} of {model_name!r}: other registers keep "
            "moving it (do they use different gate params?); re-run register"
        )
    decision = _final(version, target, decisions, versions)
    _set_tag(client, model_name, version, "gate_decision", decision.alias)
    _set_tag(client, model_name, version, "gate_reason", decision.reason)
    for other in in_flight:  # gate a racer now: if its register died, nobody else will
        still = client.get_model_version(model_name, other).tags.get("gate_decision") == PENDING
        if still and other in decisions:  # (re-read: its own register may have just done it)
            late = _final(other, target, decisions, versions)
            _set_tag(client, model_name, other, "gate_decision", late.alias)
            _set_tag(client, model_name, other, "gate_reason",
                     f"{late.reason} (gated by v{version}'s register)")  # fmt: skip
    if not decision.promoted:
        client.set_registered_model_alias(model_name, CHALLENGER, version)
    return decision


def _set_tag(client: Any, model_name: str, version: str, key: str, value: str) -> None:
    """Set a version tag; retried once when a racing register set the same tag at the same
    moment (MLflow's SQL store inserts a new tag row, and the second insert fails with a
    UNIQUE constraint; on the retry the row exists and is updated)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            return client.set_model_version_tag(model_name, version, key, value)
        except MlflowException as e:
            racing = "UNIQUE constraint" in str(e) or "IntegrityError" in str(e)
            if not racing or attempt == 2:
                raise
            time.sleep(random.uniform(0.05, 0.2))


def _final(
    version: str, target: Candidate | None, decisions: dict[str, Decision], versions: dict
) -> Decision:
    mine = decisions[version]
    if target is not None and target.version == version:
        return mine
    if mine.promoted and target is not None:  # won our own gate, then lost to a racer
        acc = float(versions[target.version].tags.get("accuracy", "nan"))
        return Decision(
            CHALLENGER,
            f"{mine.reason}, but v{target.version} (accuracy "
            f"{acc:.4f}), registered concurrently, beats it",
        )
    return mine


def _versions(client: Any, model_name: str) -> dict[str, Any]:
    found = client.search_model_versions(f"name = '{model_name}'")
    return {str(v.version): v for v in found}


def champion_version(client: Any, model_name: str) -> Any | None:
    """The model version alias `champion` points at; None if there is none.

    The model is looked up by search first: with MLflow's auth app an alias lookup on a model
    that does not exist yet answers 403, not "not found".
    """
    from mlflow.exceptions import MlflowException

    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        return None
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:
        # "alias not found"; anything else (server trouble) must not read as "no champion"
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _champion(client: Any, model_name: str) -> Candidate | None:
    """The current champion (tags it lacks read as unknown, so it compares as different)."""
    v = champion_version(client, model_name)
    if v is None:
        return None
    return _candidate(v) or Candidate(str(v.version), math.nan, "", False)


def _candidate(v: Any) -> Candidate | None:
    """Candidate from a version's tags; None if tlpipe did not register it."""
    try:
        accuracy = float(v.tags["accuracy"])
        return Candidate(str(v.version), accuracy, v.tags["test_sha256"],
                         v.tags["parity_passed"] == "true", Paired.from_tags(v.tags))  # fmt: skip
    except (KeyError, ValueError):
        return None


def _score_champion(name: str, export_dir: Path, prepared_dir: Path) -> Paired | None:
    """The new model against the current champion on this run's test split (None: none)."""
    import tempfile

    import mlflow

    from tlpipe.release import paired

    client = mlflow.MlflowClient()
    champion = _champion(client, name)
    uri = champion and _versions(client, name)[champion.version].tags.get("onnx_uri")
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        theirs = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        return paired.compare_files(Path(export_dir) / "model.onnx", theirs, prepared_dir,
                                    champion.version)  # fmt: skip


def _log_pytorch(model_path: Path) -> tuple[str, str]:
    """Log the checkpoint as an MLflow pytorch model; returns (model uri, dataset sha256)."""
    import mlflow.pytorch
    import numpy as np
    import torch

    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    size = int(meta.get("input_size", 28))
    # Batch 2, not 1: torch.export keeps a size-1 batch dimension static.
    example = np.zeros((2, int(meta["in_chans"]), size, size), dtype=np.float32)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri, str(meta.get("dataset_sha256", "unknown"))


@contextlib.contextmanager
def _active_run(cfg: RegisterConfig) -> Iterator[str]:
    """Id of the wrapper's active run, or of a run of our own for the block."""
    import mlflow

    from tlpipe import tracking

    active = mlflow.active_run()
    if active is not None:
        yield active.info.run_id
        return
    with tracking.step_run("register", cfg) as step:
        yield step.run_id
