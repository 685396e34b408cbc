"""Pipeline steps: each module has one `run(inputs…, cfg) -> <Step>Result` function.

Steps are pure: paths and a config in, files and a result out; no argv, no environment, no
tracking. `tlpipe.runner.run_step` is the one way the wrappers (CLI, DVC through the CLI, KFP
components) call them, and it logs what every result carries the same way.
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
