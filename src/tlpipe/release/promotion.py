"""The promotion rule: should a new model version replace the champion? Pure, no MLflow.

`decide` compares one candidate with the champion (parity, accuracy floor, then the paired
comparison on the same test images or, without one, accuracy on the same test data);
`replay` applies it over racing versions in version order (`tlpipe.release.registry.promote`).
"""

from __future__ import annotations

import dataclasses

from tlpipe.params import RegisterConfig
from tlpipe.release.paired import Paired

CHAMPION, CHALLENGER = "champion", "challenger"
_EPS = 1e-9  # accuracies are ratios of counts; float noise must not decide a tie


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What the gate knows about one registered version."""

    version: str
    accuracy: float
    test_sha256: str
    parity_passed: bool
    paired: Paired | None = None  # against the champion of its time, on its test split


@dataclasses.dataclass(frozen=True)
class Decision:
    alias: str
    reason: str

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def decide(new: Candidate, champion: Candidate | None, cfg: RegisterConfig) -> Decision:
    """The gate: should `new` replace `champion` (None: there is none)? Pure, no MLflow."""
    acc = new.accuracy
    if not new.parity_passed:
        return Decision(
            CHALLENGER,
            "ONNX parity check failed: the exported model disagrees "
            "with the PyTorch model; fix the export before promoting",
        )
    if not acc >= cfg.accuracy_floor - _EPS:
        return Decision(
            CHALLENGER, f"accuracy {acc:.4f} is below the floor {cfg.accuracy_floor:.4f}"
        )
    if champion is None:
        return Decision(
            CHAMPION,
            f"no champion yet; accuracy {acc:.4f} passes the floor "
            f"{cfg.accuracy_floor:.4f} and ONNX parity passed",
        )
    if champion.version == new.version:
        return Decision(CHAMPION, f"v{new.version} is already the champion")
    if new.paired is not None and new.paired.champion == champion.version:
        return _decide_paired(new.paired, cfg)
    if champion.test_sha256 != new.test_sha256:
        return Decision(
            CHALLENGER,
            f"champion v{champion.version} was evaluated on different test data (test_sha256 "
            f"{champion.test_sha256[:12] or 'unknown'}, ours {new.test_sha256[:12]}); "
            "re-evaluate it on this test set, or move the alias by hand",
        )
    gain = acc - champion.accuracy
    if not (gain > _EPS and gain >= cfg.min_improvement - _EPS):
        return Decision(
            CHALLENGER,
            f"accuracy {acc:.4f} does not beat champion v{champion.version} "
            f"({champion.accuracy:.4f})"
            + (f" by at least {cfg.min_improvement:g}" if cfg.min_improvement > 0 else "")
            + f" (gain {gain:+.4f})",
        )
    return Decision(
        CHAMPION,
        f"accuracy {acc:.4f} beats champion v{champion.version} ({champion.accuracy:.4f}) "
        f"by {gain:+.4f} on the same test data",
    )


def _decide_paired(p: Paired, cfg: RegisterConfig) -> Decision:
    promote, reason = p.verdict(cfg.min_improvement, cfg.significance, cfg.max_class_recall_drop)
    return Decision(CHAMPION if promote else CHALLENGER, reason)


def replay(
    base: Candidate | None, contenders: list[Candidate], cfg: RegisterConfig
) -> tuple[Candidate | None, dict[str, Decision]]:
    """Apply the gate to `contenders` one by one in version order, starting from `base`."""
    champion, decisions = base, {}
    for c in sorted(contenders, key=lambda c: int(c.version)):
        decisions[c.version] = decide(c, champion, cfg)
        if decisions[c.version].promoted:
            champion = c
    return champion, decisions
