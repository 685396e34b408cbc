"""Champion vs challenger on the same images: a paired comparison for the registry gate.

New data changes the test split, so accuracies measured at different times cannot be compared.
`register` therefore scores the current champion's ONNX file on *this* run's test split, next
to the new model's, and the gate reads the paired result:

- the accuracy gain on identical images;
- McNemar's exact test on the images where exactly one model is right (n01: only the new one,
  n10: only the champion): the one-sided p-value of a gain at least this large if both models
  were equally good, P(X ≥ n01) for X ~ Binomial(n01 + n10, 1/2);
- the largest drop in per-class recall, so a model that wins on average but loses one class
  badly is not promoted.

numpy and onnxruntime only (no torch): models are scored through the edge runtime.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Paired:
    """The new model against `champion` on `n` identical test images."""

    champion: str  # the champion's version
    n: int
    new_accuracy: float
    champion_accuracy: float
    n01: int  # only the new model right
    n10: int  # only the champion right
    p_value: float
    worst_class: str
    worst_recall_drop: float  # champion's recall minus the new model's, for the worst class

    @property
    def gain(self) -> float:
        return self.new_accuracy - self.champion_accuracy

    def verdict(self, min_gain: float, significance: float, max_drop: float) -> tuple[bool, str]:
        """Should the new model replace the champion? And why, in one sentence."""
        eps, same = 1e-9, f"on the same {self.n} test images"
        vs = f"champion v{self.champion} ({self.champion_accuracy:.4f})"
        if not (self.gain > eps and self.gain >= min_gain - eps):
            by = f" by at least {min_gain:g}" if min_gain > 0 else ""
            return False, (
                f"accuracy {self.new_accuracy:.4f} does not beat {vs}{by} {same} "
                f"(gain {self.gain:+.4f})"
            )
        if not self.p_value < significance:
            return False, (
                f"gain {100 * self.gain:+.2f} points over {vs} {same} is within "
                f"noise: McNemar p = {self.p_value:.3g} ≥ {significance:g} (only "
                f"new right: {self.n01}, only champion right: {self.n10})"
            )
        if self.worst_recall_drop > max_drop + eps:
            return False, (
                f"wins on average ({100 * self.gain:+.2f} points) but recall of "
                f"class {self.worst_class!r} drops {100 * self.worst_recall_drop:.1f}"
                f" points against {vs} (limit {100 * max_drop:g})"
            )
        return True, (
            f"accuracy {self.new_accuracy:.4f} beats {vs} by {100 * self.gain:+.2f} "
            f"points {same} (McNemar p = {self.p_value:.3g}; no class recall drops "
            f"more than {100 * max_drop:g} points)"
        )

    def tags(self) -> dict[str, str]:
        """The version tags that record it (`from_tags` reads them back)."""
        return {"paired_comparison": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Paired | None:
        try:
            return cls(**json.loads(tags["paired_comparison"]))
        except (KeyError, TypeError, ValueError):
            return None


def compare(
    y: np.ndarray, new: np.ndarray, champion: np.ndarray, classes: list[str], version: str
) -> Paired:
    """Compare predicted labels `new` and `champion` for true labels `y`."""
    new_ok, champ_ok = new == y, champion == y
    n01, n10 = int((new_ok & ~champ_ok).sum()), int((~new_ok & champ_ok).sum())
    drops = [
        (float(champ_ok[y == c].mean() - new_ok[y == c].mean()), name)
        for c, name in enumerate(classes)
        if (y == c).any()
    ]
    drop, worst = max(drops) if drops else (0.0, "")
    return Paired(
        version,
        len(y),
        float(new_ok.mean()),
        float(champ_ok.mean()),
        n01,
        n10,
        mcnemar_p(n01, n10),
        worst,
        drop,
    )


def compare_files(new: Path, champion: Path, prepared_dir: Path, version: str) -> Paired | None:
    """`compare` two exported ONNX files on the target test split of `prepared_dir`.

    None (with a line saying why) when the champion cannot read this data: other input
    shape or other classes; the gate then treats it as not comparable.
    """
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.errors import TlpipeError

    test = load_split(prepared_dir, "target_test")
    classes = list(load_manifest(prepared_dir).target_classes)
    try:
        theirs = onnx_labels(champion, test.x, classes)
    except TlpipeError as e:
        print(f"register: champion v{version} cannot be scored on this data: {e}")
        return None
    return compare(test.y, onnx_labels(new, test.x, classes), theirs, classes, version)


def mcnemar_p(n01: int, n10: int) -> float:
    """One-sided exact McNemar p-value: P(X ≥ n01), X ~ Binomial(n01 + n10, 1/2)."""
    n = n01 + n10
    if n == 0:
        return 1.0
    log_half = n * math.log(0.5)
    terms = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half
        for k in range(n01, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def onnx_labels(path: Path, x: np.ndarray, classes: list[str], batch_size: int = 256) -> np.ndarray:
    """Predicted labels of an exported tlpipe ONNX file for uint8 images (N, C, H, W).

    Scored through the edge runtime (`tlpipe.edge.model.EdgeModel`): the file's own metadata
    says how to normalise and what it reads, so a champion trained on older data is scored
    exactly as it serves on a device.
    """
    from tlpipe.edge.model import EdgeModel
    from tlpipe.errors import TlpipeError

    model = EdgeModel(path, provider="cpu")
    if model.classes != list(classes):
        raise TlpipeError(f"{path} predicts {model.classes}, not the classes {list(classes)}")
    if model.input_shape != tuple(x.shape[1:]):
        raise TlpipeError(
            f"{path} reads images of shape {model.input_shape}, the data is {tuple(x.shape[1:])}"
        )
    labels = [
        model.logits(model.preprocess(np.asarray(x[i : i + batch_size]))).argmax(1)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)
