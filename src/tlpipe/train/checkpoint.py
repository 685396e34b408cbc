"""Checkpoint metadata: what every tlpipe checkpoint carries besides its weights.

Written by pretrain and finetune (`tlpipe.train.models.save_checkpoint`), read by match,
finetune, evaluate, export and register: the architecture, the input it reads, its classes and
normalisation, where its weights came from and the data it was trained on.
"""

from __future__ import annotations

from typing import Any


def checkpoint_meta(
    manifest: dict,
    arch: str,
    strategy: str,
    classes: list[str],
    result,
    *,
    norm: tuple[list[float], list[float]] | None = None,
    pretrained: str | None = None,
) -> dict:
    """The metadata every tlpipe checkpoint carries (export and the edge runtime read it).

    Args:
        norm: the model's input (mean, std); default the prepared data's statistics.
        pretrained: where the starting weights came from (recorded for lineage).
    """
    in_chans, input_size = manifest["input_shape"][0], manifest["input_shape"][1]
    mean, std = norm or (manifest["mean"], manifest["std"])
    meta: dict[str, Any] = {
        "arch": arch,
        "num_classes": len(classes),
        "in_chans": in_chans,
        "input_size": input_size,
        "classes": list(classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "strategy": strategy,
        "pretrained": pretrained,
        "dataset_sha256": manifest.get("dataset_sha256", ""),
        "history": result.history,
        "best_epoch": result.best_epoch,
    }
    return meta
