"""Step 2: train the source model on the source classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.params import PretrainConfig
from tlpipe.steps import StepResult


@dataclass(frozen=True)
class TrainResult(StepResult):
    """What a training step wrote (pretrain and finetune); history and metrics in the base."""

    model_path: Path


def run(
    prepared_dir: Path, out_model: Path, cfg: PretrainConfig, checkpoint_dir: Path | None = None
) -> TrainResult:
    """Train `cfg.model` on the source split, selecting the epoch by source-val accuracy.

    Args:
        prepared_dir: output of `prepare`.
        out_model: where the checkpoint goes (written atomically at the end).
        checkpoint_dir: per-epoch resume checkpoints; a killed run restarted with the same
            directory continues after the last finished epoch.
    """
    from tlpipe.data import load_manifest, load_split
    from tlpipe.models import build_model, save_checkpoint
    from tlpipe.training import ArrayBatches, fit

    manifest = load_manifest(prepared_dir)
    source, source_val = load_split(prepared_dir, "source"), load_split(prepared_dir, "source_val")
    t, resume = cfg.train, _resume_file(checkpoint_dir, "pretrain")
    model = build_model(cfg.model, len(manifest["source_classes"]), *_shape(manifest),
                        pretrained=cfg.pretrained, seed=t.seed)  # fmt: skip
    batches = ArrayBatches(
        source.x, source.y, t.batch_size, t.seed, steps_per_epoch=t.steps_per_epoch
    )
    result = fit(
        model,
        batches,
        t,
        mean=manifest["mean"],
        std=manifest["std"],
        val=(source_val.x, source_val.y) if len(source_val) else None,
        checkpoint=resume,
        resume_key=f"{cfg!r}|{manifest.get('dataset_sha256')}",
        desc="pretrain",
    )
    meta = checkpoint_meta(manifest, cfg.model, "source", manifest["source_classes"], result)
    save_checkpoint(out_model, model, meta)
    metrics = {"source_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
               "train_seconds": result.seconds}  # fmt: skip
    summary = f"wrote {out_model}: source val accuracy {result.best_val_accuracy:.4f}"
    return TrainResult(Path(out_model), history=result.history, metrics=metrics,
                       resume_files=(resume,) if resume else (), summary=summary)  # fmt: skip


def checkpoint_meta(manifest: dict, arch: str, strategy: str, classes: list[str], result) -> dict:
    """The metadata every tlpipe checkpoint carries (export and the edge runtime read it)."""
    in_chans, input_size = _shape(manifest)
    meta: dict[str, Any] = {
        "arch": arch,
        "num_classes": len(classes),
        "in_chans": in_chans,
        "input_size": input_size,
        "classes": list(classes),
        "mean": list(manifest["mean"]),
        "std": list(manifest["std"]),
        "strategy": strategy,
        "dataset_sha256": manifest.get("dataset_sha256", ""),
        "history": result.history,
        "best_epoch": result.best_epoch,
    }
    return meta


def _shape(manifest: dict) -> tuple[int, int]:
    c, h, _ = manifest["input_shape"]
    return c, h


def _resume_file(checkpoint_dir: Path | None, name: str) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}.resume.pt"
