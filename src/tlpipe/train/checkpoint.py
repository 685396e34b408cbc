"""Checkpoint metadata: what every tlpipe checkpoint carries besides its weights.

`CheckpointMeta` is the one definition of it: written by pretrain and finetune
(`tlpipe.train.models.save_checkpoint`), read by match, finetune, evaluate, export and register
(`load_checkpoint`), always through attributes. `from_dict` still reads older checkpoints:

- version 1 (no `version` key): no `pretrained` (read as None).
- version 2: `version` and `pretrained`.

Every version carries `arch`, `in_chans`, `input_size`, `classes`, `mean` and `std`; a file
without one of them is refused with its name, never completed with a guess.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError

CHECKPOINT_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """A checkpoint's metadata.

    Attributes:
        arch: The architecture (a name in `tlpipe.train.models.MODELS`).
        in_chans: Input channels.
        input_size: Side of the square input images, in pixels.
        classes: Class names, by output index (empty: a bare backbone).
        mean: Per-channel input mean the model was trained with (its weights' own when it
            started from pretrained weights, else the data's), in [0, 1].
        std: Per-channel input standard deviation, likewise.
        strategy: How it was trained: `source`, `backbone` or a fine-tune strategy.
        pretrained: Where the starting weights came from (lineage), None: from scratch.
        dataset_sha256: The prepared data it was trained on.
        history: Per-epoch rows of its training.
        best_epoch: The epoch whose weights it holds.
        selection_cv: k-fold CV evidence over target train + val, kept when validation was
            too small to select on (`tlpipe.steps.finetune.cross_validate`); None otherwise.
        logme: LogME of the starting features on the labelled target before fine-tuning
            (`tlpipe.train.logme`); None: not measured.
        skipped: Why the strategy was skipped untrained (`finetune.skip`); evaluate never
            ships such a model. None: it trained.
        version: The schema version (`CHECKPOINT_VERSION` when written by this tlpipe).
    """

    arch: str
    in_chans: int
    input_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    strategy: str = ""
    pretrained: str | None = None
    dataset_sha256: str = ""
    history: tuple[dict[str, Any], ...] = ()
    best_epoch: int = 0
    selection_cv: dict[str, Any] | None = None
    logme: float | None = None
    skipped: str | None = None
    version: int = CHECKPOINT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it reads."""
        return self.in_chans, self.input_size, self.input_size

    @classmethod
    def for_data(
        cls,
        data: Any,
        arch: str,
        strategy: str,
        classes: Any,
        result: Any,
        *,
        norm: tuple[Any, Any] | None = None,
        pretrained: str | None = None,
    ) -> CheckpointMeta:
        """The metadata of a model trained on prepared data `data` (a `Manifest` or
        `SourceManifest`).

        Args:
            result: the training loop's `FitResult` (history, best epoch).
            norm: the model's input (mean, std); default the prepared data's statistics.
            pretrained: where the starting weights came from (recorded for lineage).
        """
        mean, std = norm or (data.mean, data.std)
        return cls(
            arch=arch,
            in_chans=data.in_chans,
            input_size=data.input_size,
            classes=tuple(classes),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            strategy=strategy,
            pretrained=pretrained,
            dataset_sha256=data.dataset_sha256,
            history=tuple(result.history),
            best_epoch=result.best_epoch,
        )

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint file, in this schema version (`num_classes` too, for
        older readers)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            version=CHECKPOINT_VERSION,
            num_classes=self.num_classes,
            classes=list(self.classes),
            mean=list(self.mean),
            std=list(self.std),
            history=[dict(row) for row in self.history],
        )
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = "checkpoint") -> CheckpointMeta:
        """Read the metadata of any checkpoint version (see the module docstring)."""
        if not isinstance(data, dict):
            raise TlpipeError(f"{where} has no metadata: not a tlpipe checkpoint")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise TlpipeError(
                f"{where}: checkpoint version {version!r} is newer than this tlpipe reads "
                f"({CHECKPOINT_VERSION}): upgrade tlpipe"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise TlpipeError(
                f"{where}: checkpoint metadata lacks {', '.join(missing)}: "
                "re-run the step that trained it"
            )
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        try:
            values.update(
                in_chans=int(data["in_chans"]),
                input_size=int(data["input_size"]),
                classes=tuple(data["classes"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                history=tuple(data.get("history") or ()),
                version=version,
            )
        except (TypeError, ValueError) as e:
            raise TlpipeError(f"{where}: damaged checkpoint metadata ({e})") from e
        return cls(**values)


_REQUIRED = ("arch", "in_chans", "input_size", "classes", "mean", "std")
