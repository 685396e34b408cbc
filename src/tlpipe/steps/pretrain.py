"""Step 2: train the source model on the source classes.

Without a source dataset (a scenario with `fetch.source: null`) there is nothing to train:
the source model is then the pretrained backbone itself (`pretrain.pretrained`), written with
an empty head, and the fine-tune strategies that need only a backbone start from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tlpipe.errors import TlpipeError
from tlpipe.params import PretrainConfig
from tlpipe.steps import TrainResult
from tlpipe.train.checkpoint import CheckpointMeta

if TYPE_CHECKING:
    from tlpipe.data.manifest import SourceManifest
    from tlpipe.train.models import Weights


def run(
    prepared_dir: Path, out_model: Path, cfg: PretrainConfig, checkpoint_dir: Path | None = None
) -> TrainResult:
    """Train `cfg.model` on the source split, selecting the epoch by source-val accuracy.

    The model starts from `cfg.pretrained` when given, and then trains and runs with the
    normalisation of those weights (ImageNet's for torchvision weights) instead of the
    prepared data's; the checkpoint records it for every later step.

    Args:
        prepared_dir: output of `prepare`.
        out_model: where the checkpoint goes (written atomically at the end).
        checkpoint_dir: per-epoch resume checkpoints; a killed run restarted with the same
            directory continues after the last finished epoch.
    """
    from tlpipe.data.manifest import load_source_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.train.loop import ArrayBatches, FitResult, fit
    from tlpipe.train.models import build_model, load_weights, save_checkpoint

    manifest = load_source_manifest(prepared_dir)  # only the source side: see dvc.yaml
    weights = load_weights(cfg.model, cfg.pretrained) if cfg.pretrained else None
    mean, std = normalisation(manifest, weights)
    t, origin = cfg.train, weights.origin if weights else None
    if not manifest.has_source:
        if weights is None:
            raise TlpipeError(
                "no source dataset and no pretrained backbone: nothing to transfer from; set "
                "pretrain.pretrained (e.g. imagenet, with a torchvision pretrain.model) or give "
                "the scenario a source dataset (fetch.source)"
            )
        model = build_model(
            cfg.model, 0, manifest.in_chans, manifest.input_size, pretrained=weights, seed=t.seed
        )
        meta = CheckpointMeta.for_data(
            manifest, cfg.model, "backbone", [], FitResult(), norm=(mean, std), pretrained=origin
        )
        save_checkpoint(out_model, model, meta)
        summary = f"wrote {out_model}: the {origin} backbone as is (no source dataset to train on)"
        return TrainResult(Path(out_model), summary=summary)

    source, source_val = load_split(prepared_dir, "source"), load_split(prepared_dir, "source_val")
    resume = _resume_file(checkpoint_dir, "pretrain")
    classes = manifest.source_classes
    model = build_model(
        cfg.model,
        len(classes),
        manifest.in_chans,
        manifest.input_size,
        pretrained=weights,
        seed=t.seed,
    )
    batches = ArrayBatches(
        source.x, source.y, t.batch_size, t.seed, steps_per_epoch=t.steps_per_epoch
    )
    result = fit(
        model,
        batches,
        t,
        mean=mean,
        std=std,
        val=(source_val.x, source_val.y) if len(source_val) else None,
        checkpoint=resume,
        resume_key=f"{cfg!r}|{manifest.dataset_sha256}",
        desc="pretrain",
    )
    meta = CheckpointMeta.for_data(
        manifest, cfg.model, "source", classes, result, norm=(mean, std), pretrained=origin
    )
    save_checkpoint(out_model, model, meta)
    metrics = {
        "source_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "train_seconds": result.seconds,
    }
    summary = f"wrote {out_model}: source val accuracy {result.best_val_accuracy:.4f}"
    return TrainResult(
        Path(out_model),
        history=result.history,
        metrics=metrics,
        resume_files=(resume,) if resume else (),
        summary=summary,
    )


def normalisation(
    manifest: SourceManifest, weights: Weights | None = None
) -> tuple[list[float], list[float]]:
    """(mean, std) a model starting from `weights` trains with: theirs, else the data's."""
    own = weights.normalisation(manifest.in_chans) if weights is not None else None
    return own or (list(manifest.mean), list(manifest.std))


def _resume_file(checkpoint_dir: Path | None, name: str) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{name}.resume.pt"
