"""Registry access: the MLflow model registry that `register` writes and `check` reads.

The one library module that talks to MLflow for a step: `tlpipe.steps.register` and
`tlpipe.steps.check` reach the registry only through here (an import-linter contract holds
it). Its settings come from the environment, read here and in `tlpipe.tracking`:
`MLFLOW_TRACKING_URI` and, for signed hashes, `TLPIPE_SIGNING_KEY`.

Race safety of `promote`: two registers running at once must never leave the worse model as
champion. Each version is created tagged `gate_decision=pending`; `promote` then replays, in
version-number order, the promotion rule (`tlpipe.release.promotion`) over every version that
was still in flight when it started or came after it, starting from the champion it read,
and compare-and-sets the alias until a re-read agrees. The outcome is the one a serial run
of the registers, in version order, would have given.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlpipe.data.manifest import Manifest
from tlpipe.edge.pull import sign
from tlpipe.errors import TlpipeError
from tlpipe.fsio import sha256_file
from tlpipe.params import RegisterConfig
from tlpipe.release.paired import Paired
from tlpipe.release.promotion import CHALLENGER, CHAMPION, Candidate, Decision, replay

PENDING = "pending"
SIGNING_KEY_ENV = "TLPIPE_SIGNING_KEY"  # devices with the key check the signed hashes
SIGNED_TAGS = ("onnx_sha256", "onnx_int8_sha256")
_STALE_MS = 10 * 60 * 1000  # a version pending this long belongs to a register that died
_MAX_ROUNDS = 20


def connect() -> Any:
    """A client of the registry the pipeline registers into (`tracking.connect`)."""
    from tlpipe import tracking

    return tracking.connect()


def _client() -> Any:
    """A client of the tracking URI in force (the one of the run we log into)."""
    import mlflow

    return mlflow.MlflowClient()


@contextlib.contextmanager
def logging_run(cfg: RegisterConfig) -> Iterator[str]:
    """Id of the run the wrapper opened (`tlpipe.runner`), or of a run of our own for the block.

    Registering is logging: a version points at a run's files, so there is always a run.
    """
    import mlflow

    from tlpipe import tracking

    active = mlflow.active_run()
    if active is not None:
        yield active.info.run_id
        return
    with tracking.step_run("register", cfg) as step:
        yield step.run_id


def log_files(files: list[tuple[Path, str | None]]) -> None:
    """Log (path, artifact folder) pairs into the active run."""
    import mlflow

    for path, folder in files:
        mlflow.log_artifact(str(path), folder)


def log_pytorch(model: Any, example: Any) -> str:
    """Log a torch module as an MLflow pytorch model (pinned torch); its model uri."""
    import mlflow.pytorch
    import torch

    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    return info.model_uri


def register_version(model_uri: str, model_name: str, tags: dict[str, str]) -> str:
    """Create a registry version tagged `gate_decision=pending`; its version number.

    With `TLPIPE_SIGNING_KEY` set, the ONNX files' hashes are signed too (`<tag>_hmac`).
    """
    import mlflow

    tags = {**tags, "gate_decision": PENDING}
    if key := os.environ.get(SIGNING_KEY_ENV):
        for name in [t for t in SIGNED_TAGS if t in tags]:  # no INT8 published: no tag
            tags[f"{name}_hmac"] = sign(tags[name], key)
    return str(mlflow.register_model(model_uri, model_name, tags=tags).version)


def tag_run(tags: dict[str, str]) -> None:
    """Tags on the active run."""
    import mlflow

    mlflow.set_tags(tags)


def promote(model_name: str, version: str, cfg: RegisterConfig) -> Decision:
    """Run the promotion rule for registered `version` race-safely; move the aliases, tag it."""
    client = _client()
    # Snapshot the versions *before* reading the champion: a register that finishes in
    # between has then either moved the alias before our read or is in our snapshot.
    versions = _versions(client, model_name)
    me = versions[version]
    if candidate(me) is None:
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
    base = champion(client, model_name)
    for _ in range(_MAX_ROUNDS):
        contenders = [
            c
            for v in versions.values()
            if (v.version in in_flight or int(v.version) >= int(version))
            and (c := candidate(v)) is not None
        ]
        target, decisions = replay(base, contenders, cfg)
        current = champion(client, model_name)
        if target is None or (current is not None and current.version == target.version):
            break
        _set_alias(client, model_name, CHAMPION, target.version)
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
            reason = f"{late.reason} (gated by v{version}'s register)"
            _set_tag(client, model_name, other, "gate_reason", reason)
    if not decision.promoted:
        _set_alias(client, model_name, CHALLENGER, version)
    return decision


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


def champion(client: Any, model_name: str) -> Candidate | None:
    """The current champion (tags it lacks read as unknown, so it compares as different)."""
    v = champion_version(client, model_name)
    if v is None:
        return None
    return candidate(v) or Candidate(str(v.version), math.nan, "", False)


def candidate(v: Any) -> Candidate | None:
    """Candidate from a version's tags; None if tlpipe did not register it."""
    try:
        accuracy = float(v.tags["accuracy"])
        passed = v.tags["parity_passed"] == "true"
        return Candidate(
            str(v.version), accuracy, v.tags["test_sha256"], passed, Paired.from_tags(v.tags)
        )
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def champion_onnx(model_name: str) -> Iterator[tuple[Path, str] | tuple[None, None]]:
    """(the champion's model.onnx downloaded for the block, its version), or (None, None)."""
    import mlflow

    client = _client()
    best = champion(client, model_name)
    uri = best and _versions(client, model_name)[best.version].tags.get("onnx_uri")
    if not uri:
        yield None, None
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        verify_champion_file(Path(path), _versions(client, model_name)[best.version])
        yield Path(path), best.version


def keep_champion(model_name: str, version: str, reason: str) -> Decision:
    """Leave `champion` where it is: `version` becomes the challenger, tagged with why."""
    client = _client()
    decision = Decision(CHALLENGER, reason)
    _set_tag(client, model_name, version, "gate_decision", decision.alias)
    _set_tag(client, model_name, version, "gate_reason", reason)
    _set_alias(client, model_name, CHALLENGER, version)
    return decision


class ChampionFileRefused(TlpipeError):
    """The champion's ONNX file in the artifact store is not the file its version recorded."""


def verify_champion_file(path: Path, mv: Any) -> None:
    """Check the downloaded champion file against its version's `onnx_sha256` tag (and that
    tag's HMAC when TLPIPE_SIGNING_KEY is set and the champion was signed), as a device does
    before serving it.

    Raises `ChampionFileRefused` (one line: the champion stays, nothing is promoted).
    """
    import hmac

    recorded = mv.tags.get("onnx_sha256", "").strip().lower()
    what = f"champion {mv.name} v{mv.version}'s model.onnx"
    keep = "kept the champion, promoted nothing; re-register the champion or fix the store"
    if not recorded:
        raise ChampionFileRefused(f"{what} has no recorded onnx_sha256 to verify: {keep}")
    actual = sha256_file(path)
    if actual != recorded:
        raise ChampionFileRefused(
            f"{what} in the artifact store has sha256 {actual[:12]}…, not the recorded "
            f"{recorded[:12]}… (tampered or damaged): {keep}"
        )
    # a champion registered before the key was set carries no signature: its sha256 alone
    signature = mv.tags.get("onnx_sha256_hmac", "").strip().lower()
    key = os.environ.get(SIGNING_KEY_ENV)
    if key and signature and not hmac.compare_digest(signature, sign(recorded, key)):
        raise ChampionFileRefused(
            f"{what}'s onnx_sha256 has a wrong signature for TLPIPE_SIGNING_KEY: {keep}"
        )


def champion_manifest(model_name: str) -> tuple[Manifest | None, str | None]:
    """The manifest stored with the current champion, and its version (None, None: none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    version = champion_version(connect(), model_name)
    if version is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path="data/manifest.json", dst_path=tmp
            )
        except MlflowException:  # registered before register stored the manifest
            print(f"check: champion v{version.version} has no stored manifest: not compared")
            return None, str(version.version)
        found = Manifest.from_dict(json.loads(Path(path).read_text()), f"{path} (champion's)")
        return found, str(version.version)


def _set_tag(client: Any, model_name: str, version: str, key: str, value: str) -> None:
    _write(client.set_model_version_tag, model_name, version, key, value)


def _set_alias(client: Any, model_name: str, alias: str, version: str) -> None:
    _write(client.set_registered_model_alias, model_name, alias, version)


_RACE_MARKS = ("unique constraint", "uniqueviolation", "integrityerror", "duplicate entry")


def _write(call: Any, *args: str) -> None:
    """Run a registry write (a tag, an alias); retried when a racing register wrote the same
    row at the same moment.

    MLflow's SQL store writes tags and aliases select-then-insert (`session.merge`): when two
    writers find no row, both insert and the second gets BAD_REQUEST for the unique key
    (sqlite "UNIQUE constraint failed", Postgres "duplicate key value violates unique
    constraint"). On the retry the row exists and is updated.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            call(*args)
            return
        except MlflowException as e:
            racing = e.error_code == "BAD_REQUEST" and any(
                mark in str(e).lower() for mark in _RACE_MARKS
            )
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
