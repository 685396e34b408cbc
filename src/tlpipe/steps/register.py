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

Registering is this step's job; it reaches the registry through `tlpipe.release.registry`
(race-safe alias moves, signing, the champion's files), logging into the run the runner
opened for it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.fsio import sha256_file, write_json
from tlpipe.params import RegisterConfig
from tlpipe.release import paired, registry
from tlpipe.release.paired import Paired
from tlpipe.release.parity import PARITY_FILE, read_parity
from tlpipe.release.promotion import CHAMPION, Candidate, Decision, decide
from tlpipe.steps import StepResult


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
    floor = f"{cfg.accuracy_floor:.4f}"
    return Decision(CHAMPION, f"ONNX parity passed and accuracy {acc:.4f} ≥ floor {floor}")


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
    with registry.logging_run(cfg) as run_id:
        files = [(p, "onnx") for p in onnx_files] + [(export_dir / PARITY_FILE, None)]
        if prepared_dir is not None:  # what `tlpipe check` compares the next run's data with
            files.append((Path(prepared_dir) / "manifest.json", "data"))
        registry.log_files(files)
        model_uri, dataset_sha = _log_pytorch(Path(model_path))
        paired, refused = None, ""
        if prepared_dir is not None:
            try:
                paired = _score_champion(cfg.model_name, export_dir, prepared_dir)
            except (
                registry.ChampionFileRefused
            ) as e:  # never compare with (or replace) on a bad file
                refused = str(e)
        tags = {
            "accuracy": repr(parity["fp32"]["accuracy"]),
            "int8_accuracy": repr((parity.get("int8") or {}).get("accuracy", float("nan"))),
            "test_sha256": parity["test_sha256"],
            "dataset_sha256": dataset_sha,
            "parity_passed": str(bool(parity["passed"])).lower(),
            "onnx_uri": f"runs:/{run_id}/onnx/model.onnx",
            "onnx_sha256": sha256_file(onnx_files[0]),
            **(paired.tags() if paired else {}),
        }
        if len(onnx_files) > 1:  # no tag, no INT8 for devices: `pull --variant int8` refuses
            tags["onnx_int8_sha256"] = sha256_file(onnx_files[1])
        version = registry.register_version(model_uri, cfg.model_name, tags)
        if refused:  # the champion stays; this version is only a challenger
            decision = registry.keep_champion(cfg.model_name, version, refused)
        else:
            decision = registry.promote(cfg.model_name, version, cfg)
        registry.tag_run(
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
        metrics |= {
            "champion_accuracy_same_images": paired.champion_accuracy,
            "paired_gain_points": 100 * paired.gain,
            "mcnemar_p": paired.p_value,
            "worst_class_recall_drop_points": 100 * paired.worst_recall_drop,
        }
    summary = f"{cfg.model_name} v{version} → {decision.alias}: {decision.reason}"
    if decision_path is not None:
        outcome = {
            "version": str(version),
            "alias": decision.alias,
            "promoted": decision.promoted,
            "reason": decision.reason,
        }
        write_json(decision_path, outcome)
    return RegisterResult(
        str(version),
        decision.alias,
        decision.promoted,
        decision.reason,
        metrics=metrics,
        summary=summary,
    )


def _score_champion(name: str, export_dir: Path, prepared_dir: Path) -> Paired | None:
    """The new model against the current champion on this run's test split (None: none)."""
    with registry.champion_onnx(name) as (theirs, version):
        if theirs is None:
            return None
        return paired.compare_files(export_dir / "model.onnx", theirs, prepared_dir, version)


def _log_pytorch(model_path: Path) -> tuple[str, str]:
    """Log the checkpoint as an MLflow pytorch model; returns (model uri, dataset sha256)."""
    import numpy as np

    from tlpipe.train.models import load_checkpoint

    model, meta = load_checkpoint(model_path)
    # Batch 2, not 1: torch.export keeps a size-1 batch dimension static.
    example = np.zeros((2, *meta.input_shape), dtype=np.float32)
    return registry.log_pytorch(model, example), meta.dataset_sha256 or "unknown"
