"""The one step runner: every wrapper (CLI, DVC through the CLI, Kubeflow pods) calls a step here.

    result = run_step("pretrain", resolved, prepared_dir=..., out_model=..., checkpoint_dir=...)

picks the step's config from the params sections (`step_config`: the one place that knows a
step's cross-section values, such as check's model name from `register:` and finetune's
`per_strategy` overrides), runs `tlpipe.steps.pretrain.run(**inputs, cfg=cfg)` inside a
tracked child run (params, lineage tags, then the result's metrics, history and artifacts),
and owns the failures around the step, in one place:

- the step fails → the run ends FAILED with the error (`tlpipe.error` tag), the error goes on;
- SIGINT/SIGTERM → the step unwinds (temporary outputs removed), the run ends KILLED;
- the tracking server dies or hangs → the watchdog stops the step within one deadline, in one
  line, and nothing more waits on the server (`tracking.Watchdog`);
- resume files are deleted only after the run is safely closed, so a step that any of the
  above stopped continues from its last epoch when run again;
- under torchrun (`tlpipe.train.distributed`) rank 0 alone tracks and writes: the other ranks
  run the step untracked, with outputs (`out_*`) in a temporary folder that is then removed and
  no resume files of their own (rank 0's state reaches them through the process group).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError
from tlpipe.signals import sigterm_raises
from tlpipe.steps import StepResult

NO_TRACK_ENV = "TLPIPE_NO_TRACK"  # `tlpipe run --no-track` passes it to the stages
# =1: train in float64, to check that a data-parallel run reproduces one process (docs/training.md)
FLOAT64_ENV = "TLPIPE_FLOAT64"


def run_step(
    step: str,
    params: Mapping[str, Any],
    *,
    strategy: str | None = None,
    track: bool = True,
    tags: dict[str, str] | None = None,
    **inputs: Any,
) -> StepResult:
    """Run step `step` with its config from `params` and `inputs` (its `run()` arguments), tracked.

    Args:
        step: a module of `tlpipe.steps` (fetch, prepare, pretrain, match, finetune, …).
        params: the params sections' configs (a `tlpipe.params.Resolved`, or a mapping of
            the sections the step reads: see `step_config`).
        strategy: finetune: the strategy to train (default: `finetune.strategy`).
        track: False (or env TLPIPE_NO_TRACK) runs the step without MLflow.
        tags: extra tags for the run (lineage the inputs do not carry).
    """
    from tlpipe.tracking import disable_mlflow_telemetry

    disable_mlflow_telemetry()  # before any step imports mlflow (tlpipe.tracking says why)
    cfg, picked = step_config(step, params, strategy)
    inputs = {**picked, **inputs}
    run = importlib.import_module(f"tlpipe.steps.{step}").run
    name = f"{step}:{cfg.strategy}" if step == "finetune" else step
    with _float64_if_asked():
        if not is_main():
            return _replica(run, cfg, inputs)
        with sigterm_raises():
            if not track or os.environ.get(NO_TRACK_ENV):
                result = run(**inputs, cfg=cfg)
            else:
                lineage = {**_lineage(inputs), **_world(), **(tags or {})}
                result = _tracked(run, name, cfg, lineage, inputs)
    for path in result.resume_files:
        Path(path).unlink(missing_ok=True)
    return result


def step_config(
    step: str, params: Mapping[str, Any], strategy: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The config step `step` runs with, and the inputs it takes from other sections.

    The one place that knows them, for every wrapper: finetune trains `strategy` (default
    `finetune.strategy`) with its `per_strategy` overrides applied; check compares the data
    with the champion of `register.model_name`.
    """
    if step == "finetune":
        cfg = params["finetune"]
        return cfg.for_strategy(strategy or cfg.strategy), {}
    if step == "check":
        return params["check"], {"model_name": params["register"].model_name}
    return params[step], {}


def is_main() -> bool:
    """False in a non-zero rank of a distributed job (torchrun, a Kubeflow TrainJob)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from tlpipe.train import distributed

    return distributed.is_main()


def _replica(run: Any, cfg: Any, inputs: dict[str, Any]) -> StepResult:
    """A non-zero rank: the step trains its shards, untracked, and what it writes is dropped."""
    import tempfile

    with sigterm_raises(), tempfile.TemporaryDirectory(prefix="tlpipe-replica-") as tmp:
        mine = {
            k: Path(tmp) / k / Path(v).name if k.startswith("out_") else v
            for k, v in inputs.items()
        }
        if "checkpoint_dir" in mine:
            mine["checkpoint_dir"] = None
        return run(**mine, cfg=cfg)


@contextlib.contextmanager
def _float64_if_asked() -> Iterator[None]:
    """torch's default dtype float64 for the step when TLPIPE_FLOAT64=1, then as it was."""
    if os.environ.get(FLOAT64_ENV) != "1":
        yield
        return
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _world() -> dict[str, str]:
    """`tlpipe.world_size` of a data-parallel run (rank 0 tracks it for all ranks)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return {"tlpipe.world_size": str(size)} if size > 1 else {}


def _tracked(run: Any, name: str, cfg: Any, tags: dict[str, str], inputs: dict) -> StepResult:
    from mlflow.exceptions import MlflowException

    from tlpipe import tracking

    try:
        with tracking.step_run(name, cfg, tags=tags) as t:
            result = run(**inputs, cfg=cfg)
            t.log_result(result)
    except MlflowException as e:  # the server answered, with an error: say so in one line
        message = " ".join(str(e).split())  # one line, whole (up to a screenful)
        message = message if len(message) <= 2000 else message[:2000] + "…"
        raise TlpipeError(
            f"MLflow at {tracking.tracking_uri()} failed in `{name}`: {message}"
        ) from e
    return result


def _lineage(inputs: dict[str, Any]) -> dict[str, str]:
    """`tlpipe.dataset_sha256` of the prepared data the step reads, if it reads any."""
    prepared = inputs.get("prepared_dir")
    if prepared is None or not (Path(prepared) / "manifest.json").is_file():
        return {}
    from tlpipe.data.manifest import load_manifest

    return {"tlpipe.dataset_sha256": load_manifest(prepared).dataset_sha256}
