"""Pipeline steps: each module has one `run(inputs…, cfg) -> <Step>Result` function.

Steps are pure: paths and a config in, files and a result out; no argv, no environment
variables, no tracking. `tlpipe.runner.run_step` is the one way the wrappers (CLI, DVC through
the CLI, KFP components) call them: it picks each step's config, opens the tracked run and logs
what every result carries the same way. `register` and `check`, whose job is the model
registry, reach it only through `tlpipe.release.registry`, which reads the registry's settings
from the environment and logs into the runner's run (or, for a `register.run` called on its
own, a run it opens).

Steps do not import each other (an import-linter contract): what two steps share lives in the
library subpackage of its responsibility (the prepared data's manifest in `tlpipe.data`,
checkpoint metadata in `tlpipe.train`, parity.json and the registry in `tlpipe.release`), or
here when it is a result type.

May import: every library subpackage (`tlpipe.release`, `tlpipe.match`, `tlpipe.train`,
`tlpipe.data`, `tlpipe.params`, `tlpipe.edge`, `tlpipe.fsio`, `tlpipe.errors`); never
`tlpipe.tracking`, mlflow, the runner, the CLI or `tlpipe.kfp`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What every step returns besides its own fields.

    Attributes:
        metrics: Numbers for the tracking run (non-numbers are skipped when logged).
        history: Per-epoch rows, logged as metric curves (step = `epoch`).
        artifacts: Files or folders logged to the tracking run.
        resume_files: Per-epoch resume checkpoints. The runner deletes them only once the step's
            tracking run is safely closed, so a step stopped by a dead tracking server resumes.
        summary: One line for a person, printed by the CLI.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    artifacts: tuple[Path, ...] = ()
    resume_files: tuple[Path, ...] = ()
    summary: str = ""


@dataclass(frozen=True)
class TrainResult(StepResult):
    """What a training step wrote (pretrain and finetune); history and metrics in the base."""

    model_path: Path
