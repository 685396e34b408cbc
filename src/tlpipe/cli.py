"""`tlpipe` command line: one command per step, each a few lines over `tlpipe.runner.run_step`.

Every command resolves the parameters (the defaults in `tlpipe.params`, then params.yaml, then
`--set section.key=value`), and the runner runs the step as an MLflow child run of the pipeline
run (`--no-track` to skip). A user error prints one line and exits 1, without a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from tlpipe.errors import Terminated, TlpipeError
from tlpipe.kfp import pipeline_cli
from tlpipe.params import SOURCE_STRATEGIES, STRATEGY_NAMES
from tlpipe.params.options import PARAMS, SET

app = typer.Typer(
    help="tlpipe: transfer learning from a big source dataset to a small target dataset, "
    "as a pipeline: fetch → prepare → pretrain → match → finetune → evaluate → export → "
    "register. `make run` runs it all with DVC; each command runs one step.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings reflow to the terminal (rich mode kept each break)
)

app.add_typer(pipeline_cli.app, name="pipeline")

TRACK = typer.Option(True, "--track/--no-track", help="Log the step to MLflow.")
PREPARED = typer.Option(Path("data/prepared"), help="Prepared data (output of `prepare`).")
FINETUNED = typer.Option(Path("models/finetuned"), help="Folder of fine-tuned models.")
EVAL = typer.Option(Path("eval"), "--eval", help="Output of `evaluate` (names the selected model).")


def _step(step: str, resolved: Any, track: bool, **inputs: Any) -> Any:
    """Run the step through the runner (which picks its config), print its summary line."""
    from tlpipe import runner

    with _stopped_by_signal():
        result = runner.run_step(step, resolved, track=track, **inputs)
    if runner.is_main():  # under torchrun the other ranks wrote nothing worth a line
        typer.echo(result.summary, err=True)
    return result


class Stopped(Exception):  # noqa: N818
    """Ctrl-C or SIGTERM stopped a command (typer would turn a KeyboardInterrupt into exit 0)."""

    def __init__(self, terminated: bool):
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        super().__init__(f"{what}: run the same command again to resume")
        self.code = 143 if terminated else 130


@contextlib.contextmanager
def _stopped_by_signal() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt as e:
        raise Stopped(isinstance(e, Terminated)) from e


STRATEGY_HELP = (
    " | ".join(n for n in STRATEGY_NAMES if n not in SOURCE_STRATEGIES)
    + ", and with `--match` (the output of `tlpipe match`): "
    + " | ".join(SOURCE_STRATEGIES)
    + ". Default: finetune.strategy."
)


@app.command()
def fetch(
    out: Path = typer.Option(Path("data/raw"), help="Where the raw files go."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Copy or download the raw dataset (sha256-checked) into --out."""
    _step("fetch", _resolve(params, set_), track, out_dir=out)


@app.command()
def prepare(
    raw: Path = typer.Option(Path("data/raw"), help="Raw data (output of `fetch`)."),
    out: Path = PREPARED,
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Validate the raw data and build the scenario: source / target train / val / test."""
    _step("prepare", _resolve(params, set_), track, raw_dir=raw, out_dir=out)


@app.command()
def check(
    prepared: Path = PREPARED,
    out: Path = typer.Option(Path("checks"), help="report.json: what changed, what failed."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Compare the prepared data with the data the current champion was trained on."""
    _step("check", _resolve(params, set_), track, prepared_dir=prepared, out_dir=out)


@app.command()
def pretrain(
    prepared: Path = PREPARED,
    out: Path = typer.Option(Path("models/source.pt"), help="Source model checkpoint."),
    checkpoints: Path = typer.Option(
        Path("checkpoints/pretrain"), help="Per-epoch resume files: a killed run continues."
    ),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Train the source model on the source classes."""
    resolved = _resolve(params, set_)
    _step(
        "pretrain",
        resolved,
        track,
        prepared_dir=prepared,
        out_model=out,
        checkpoint_dir=checkpoints,
    )


@app.command()
def match(
    prepared: Path = PREPARED,
    source: Path = typer.Option(Path("models/source.pt"), help="Pretrained source model."),
    out: Path = typer.Option(Path("matching"), help="weights.npy, selected.npy, report.json."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Weight every source image by how much it resembles the target (domain discriminator)."""
    resolved = _resolve(params, set_)
    _step("match", resolved, track, prepared_dir=prepared, source_model=source, out_dir=out)


@app.command()
def finetune(
    strategy: str = typer.Option(None, help=STRATEGY_HELP),
    prepared: Path = PREPARED,
    source: Path = typer.Option(Path("models/source.pt"), help="Pretrained source model."),
    match: Path = typer.Option(None, help="Output of `match` (for strategies that use it)."),
    out: Path = typer.Option(None, help="Default: `models/finetuned/<strategy>.pt`."),
    checkpoints: Path = typer.Option(None, help="Default: `checkpoints/<strategy>`."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Fine-tune the source model on the few labelled target images (or the scratch baseline)."""
    resolved = _resolve(params, set_)
    name = strategy or resolved["finetune"].strategy
    _step(
        "finetune",
        resolved,
        track,
        strategy=name,
        prepared_dir=prepared,
        source_model=source,
        match_dir=match,
        out_model=out or Path("models/finetuned") / f"{name}.pt",
        checkpoint_dir=checkpoints or Path("checkpoints") / name,
    )


@app.command()
def evaluate(
    prepared: Path = PREPARED,
    finetuned: Path = FINETUNED,
    out: Path = typer.Option(Path("eval"), help="metrics.json, selected.txt, plots/."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Score every model on the target test split; choose the one to ship, scratch included.

    The choice is made on target validation, or by k-fold CV over train + val when validation
    is small (finetune.selection): the test split only scores. Reads the baseline and the
    `strategies` models from --finetuned."""
    resolved = _resolve(params, set_)
    names = [resolved["evaluate"].baseline, *resolved.strategies]
    models = {name: finetuned / f"{name}.pt" for name in names}
    _step("evaluate", resolved, track, prepared_dir=prepared, models=models, out_dir=out)
    report(out / "metrics.json")


@app.command()
def export(
    model: Path = typer.Option(None, help="Checkpoint to export; default: the selected one."),
    prepared: Path = PREPARED,
    finetuned: Path = FINETUNED,
    eval_dir: Path = EVAL,
    out: Path = typer.Option(Path("export"), help="model.onnx, model.int8.onnx, parity.json."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Export to ONNX (fp32 + INT8), check parity with torch on the target test images."""
    from tlpipe.steps.evaluate import selected_model

    model = model or selected_model(eval_dir, finetuned)
    resolved = _resolve(params, set_)
    _step("export", resolved, track, prepared_dir=prepared, out_dir=out, model_path=model)


@app.command()
def register(
    export_dir: Path = typer.Option(Path("export"), "--export", help="Output of `export`."),
    model: Path = typer.Option(None, help="Checkpoint to log; default: the selected one."),
    prepared: Path = PREPARED,
    finetuned: Path = FINETUNED,
    eval_dir: Path = EVAL,
    out: Path = typer.Option(Path("registry.json"), help="The decision, as JSON."),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Register the model in MLflow; alias `champion` only if it beats the current champion.

    The champion is scored again on this run's test split (--prepared), so the comparison is
    paired, on the same images."""
    from tlpipe.steps.evaluate import selected_model

    _step(
        "register",
        _resolve(params, set_),
        True,  # registering is logging: always tracked
        export_dir=export_dir,
        decision_path=out,
        model_path=model or selected_model(eval_dir, finetuned),
        prepared_dir=prepared,
    )


@app.command("params")
def params_(params: Path = PARAMS, set_: list[str] = SET) -> None:
    """Print every parameter in force: the defaults, then params.yaml, then --set."""
    import yaml

    typer.echo(
        yaml.safe_dump(
            _resolve(params, set_).as_dict(),
            sort_keys=False,
            default_flow_style=None,
            allow_unicode=True,
        ),
        nl=False,
    )


@app.command()
def report(metrics: Path = typer.Option(Path("eval/metrics.json"))) -> None:
    """Print the comparison table from a finished evaluate step."""
    from tlpipe.fsio import read_json
    from tlpipe.steps.evaluate import format_table

    typer.echo(format_table(read_json(metrics)))


@app.command()
def run(
    force: bool = typer.Option(False, help="Re-run every stage (dvc repro --force)."),
    track: bool = TRACK,
) -> None:
    """Run the whole pipeline with `dvc repro` under one MLflow parent run, then the table.

    DVC re-runs only the stages whose code, data or params.yaml section changed; with nothing
    changed it is a quick no-op (exit 0), so it is safe to call from cron. A second `tlpipe run`
    in the same project exits 1 while one is running. Ctrl-C or SIGTERM stops the running stage
    (its run ends KILLED; run again to resume).
    """
    from tlpipe import local_run

    with _stopped_by_signal():
        changed = local_run.run(force, track)
    typer.echo(local_run.describe(changed), err=True)
    if Path("eval/metrics.json").exists():
        report(Path("eval/metrics.json"))


def _resolve(params: Path, set_: list[str] | None) -> Any:
    from tlpipe.params import resolver

    return resolver.resolve(params, set_)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1; a mistyped command
    or option gets the usage message and status 2, never a traceback."""
    from tlpipe.tracking import TrackingLost, disable_mlflow_telemetry

    disable_mlflow_telemetry()  # for this process and its DVC stages (tlpipe.tracking: why)

    try:
        code = app(standalone_mode=False)  # typer.Exit(n) comes back as n
    except (TlpipeError, TrackingLost) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except Stopped as e:
        typer.echo(str(e), err=True)
        sys.exit(e.code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # typer's own click (not the click package) raises these
        if hasattr(e, "show"):  # click's usage errors: the usage line, then the error
            e.show()
        else:
            typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    if isinstance(code, int) and code:  # a command's typer.Exit(n); success returns normally
        sys.exit(code)


if __name__ == "__main__":
    main()
