"""`evaluate:`, `export:`, `register:`: what ships, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from tlpipe.params.fields import above, at_least, between

Score = Literal["accuracy", "probability", "log_likelihood"]  # evaluate's per-image scores


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate:`.

    Attributes:
        baseline: The strategy every other one is compared with.
        plots: Write the confusion-matrix PNGs.
        on_tie: What ships when the best strategy's paired interval over the baseline includes
            0 (the verdict says "tie" either way): ``best`` (the higher estimate, the verdict
            saying it is NOT shown to beat the baseline) or ``baseline`` (a transfer ships only
            when it demonstrably helps, at the price of shipping scratch when a transfer model
            was better but the evidence too small to show it). Both measured:
            benchmarks/README.md, "Selection regret".
        select_by: The per-image score the selection and the paired interval use, on the
            out-of-fold predictions (or validation): ``probability`` (the default: the
            probability the model gives the true class, a smoother, less noisy estimate on few
            images), ``accuracy`` (0/1 correct) or ``log_likelihood`` (its log, a proper
            scoring rule that punishes confident mistakes). Measured side by side:
            benchmarks/README.md, "Selection regret".
        guard: A second per-image score a transfer must not lose in: the model that would ship
            must also score, on the same images, a mean no lower than the baseline's in
            ``guard``, or the baseline ships (the verdict says why). ``null``: no guard. The
            default pair, ``select_by: probability`` and ``guard: accuracy``, ships a transfer
            when the probability of the true class shows it helps and it is right on no fewer
            of the images; it passed a test registered before its fresh draws (the
            "accuracy guard" section of benchmarks/README.md).
    """

    baseline: str = "scratch"
    plots: bool = True
    on_tie: Literal["best", "baseline"] = "baseline"
    select_by: Score = "probability"
    guard: Score | None = "accuracy"


Calibration = Literal["minmax", "entropy", "percentile"]
CALIBRATION_SPLITS = ("target_val", "target_train", "source_val", "source")  # never target_test


@dataclass(frozen=True)
class ExportConfig:
    """`export:`.

    Attributes:
        opset: ONNX opset (≥ 18: the torch.export-based exporter's lowest).
        tolerance: Largest allowed |logit difference| between ONNX Runtime and torch.
        min_agreement: Smallest allowed share of test images with the same argmax.
        int8: Also quantize to `model.int8.onnx`; it is published (kept in the export) only
            when it passes the two thresholds below on the test split, else parity.json says why.
        int8_method: ``static`` (QDQ, per-channel int8 weights, uint8 activations calibrated
            on target images: the fast one on x86) or ``dynamic`` (weights only, activations
            quantized at run time; no calibration).
        int8_min_agreement: Smallest share of test images where INT8 and fp32 agree (argmax).
        int8_max_accuracy_drop: Largest test-accuracy loss of INT8 against fp32, in points.
        calibration_images: How many images calibrate the INT8 activation ranges.
        calibration_splits: Prepared splits the calibration images come from, in order: all
            of the first (up to `calibration_images`), then the next, … Never the test split.
        calibration_method: ONNX Runtime calibration method.
        fp32_first_last: Keep the first Conv and the classifier (Gemm) in float in the INT8
            file: on Fashion-MNIST, 8-bit there cost 1.6 accuracy points (0.2 without), for
            under 1 % of small_cnn's weights.
        model_version: Written into the metadata; empty = the checkpoint's sha256 prefix.
        batch_size: Images per ONNX Runtime call when measuring parity and accuracy.
    """

    opset: Annotated[int, at_least(18)] = 18
    tolerance: Annotated[float, above(0)] = 1e-4
    min_agreement: Annotated[float, between(0, 1, "(]")] = 0.999
    int8: bool = True
    int8_method: Literal["static", "dynamic"] = "static"
    int8_min_agreement: Annotated[float, between(0, 1)] = 0.99
    int8_max_accuracy_drop: Annotated[float, at_least(0)] = 1.0
    calibration_images: Annotated[int, at_least(1)] = 500
    calibration_splits: tuple[str, ...] = ("target_val", "target_train")
    calibration_method: Calibration = "minmax"
    fp32_first_last: bool = True
    model_version: str = ""
    batch_size: Annotated[int, at_least(1)] = 256

    def __post_init__(self) -> None:
        if self.opset < 18:
            raise ValueError(f"opset must be ≥ 18 (torch.export ONNX exporter), got {self.opset}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")
        if not 0 <= self.int8_min_agreement <= 1 or not self.int8_max_accuracy_drop >= 0:
            raise ValueError("int8_min_agreement must be in [0, 1], int8_max_accuracy_drop ≥ 0")
        bad = set(self.calibration_splits) - set(CALIBRATION_SPLITS)
        if bad or not self.calibration_splits:
            raise ValueError(f"calibration_splits must be from {CALIBRATION_SPLITS}, got {bad}")
        if self.calibration_images < 1 or self.batch_size < 1:
            raise ValueError("calibration_images and batch_size must be ≥ 1")


@dataclass(frozen=True)
class RegisterConfig:
    """`register:`. Where the registry is comes from the environment (MLFLOW_TRACKING_URI).

    Attributes:
        model_name: The registered model.
        accuracy_floor: Never promote below this target test accuracy.
        min_improvement: Must beat the champion (same test images) by more than this (a
            fraction: 0.005 = half a point).
        significance: ...and significantly: one-sided McNemar p-value below this.
        max_class_recall_drop: ...and no class may lose more recall than this (a fraction)
            against the champion: a model that wins on average but loses one class badly
            stays challenger.
    """

    model_name: str = "tlpipe"
    accuracy_floor: Annotated[float, at_least(0)] = 0.5  # > 1: never promote
    min_improvement: Annotated[float, between(0, 1, "[)")] = 0.0
    significance: Annotated[float, between(0, 1, "()")] = 0.05
    max_class_recall_drop: Annotated[float, between(0, 1)] = 0.05


# params.yaml section → its config class, in pipeline order
