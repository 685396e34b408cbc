"""`tlpipe` command line: one command per step, each a few lines over `tlpipe.steps.<step>.run`.

Every command reads its params.yaml section; `--set key=value` overrides single fields
(`--set train.epochs=2`). Each step run is tracked in MLflow as a child of the pipeline run
(`--no-track` to skip). A user error prints one line and exits 1, without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import typer

from tlpipe import kfp_cli
from tlpipe.errors import TlpipeError

app = typer.Typer(
    help="tlpipe: transfer learning from a big source dataset to a small target dataset, "
    "as a pipeline: fetch → prepare → pretrain → match → finetune → evaluate → export → "
    "register. `make run` runs it all with DVC; each command runs one step.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(kfp_cli.app, name="pipeline")

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read.")
SET = typer.Option(None, "--set", "-s", help="Override a param: key=value (repeatable).")
TRACK = typer.Option(True, "--track/--no-track", help="Log the step to MLflow.")
PREPARED = typer.Option(Path("data/prepared"), help="Prepared data (output of `prepare`).")


@contextlib.contextmanager
def _tracked(step: str, cfg, prepared: Path | None, track: bool):
    """A child MLflow run for this step (or a no-op recorder with --no-track)."""
    if not track or os.environ.get("TLPIPE_NO_TRACK"):
        yield _NoTrack()
        return
    from tlpipe import tracking

    manifest = None
    if prepared is not None and (Path(prepared) / "manifest.json").exists():
        from tlpipe.data import load_manifest

        manifest = load_manifest(prepared)
    with tracking.step_run(step, cfg, manifest=manifest) as run:
        yield run


class _NoTrack:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command()
def fetch(
    out: Path = typer.Option(Path("data/raw"), help="Where the raw files go."),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Copy or download the raw dataset (sha256-checked) into --out."""
    from tlpipe.config import load_section
    from tlpipe.steps import fetch as step

    cfg = load_section(step.FetchConfig, "fetch", params, set_)
    result = step.run(cfg, out)
    _say(f"fetched {len(result.files)} files into {out} from {result.source}")


@app.command()
def prepare(
    raw: Path = typer.Option(Path("data/raw"), help="Raw data (output of `fetch`)."),
    out: Path = PREPARED,
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Validate the raw data and build the scenario: source / target train / val / test."""
    from tlpipe.config import load_section
    from tlpipe.steps import prepare as step

    cfg = load_section(step.PrepareConfig, "prepare", params, set_)
    result = step.run(raw, out, cfg)
    with _tracked("prepare", cfg, out, track) as t:
        t.log_metrics(result.metrics)
        t.log_artifact(Path(out) / "manifest.json")
    _say(f"prepared {out}: {result.metrics}")


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
    from tlpipe.config import load_section
    from tlpipe.steps import pretrain as step

    cfg = load_section(step.PretrainConfig, "pretrain", params, set_)
    with _tracked("pretrain", cfg, prepared, track) as t:
        result = step.run(prepared, out, cfg, checkpoint_dir=checkpoints)
        t.log_history(result.history)
        t.log_metrics(result.metrics)
    _say(f"wrote {out}: source val accuracy {result.metrics['source_val_accuracy']:.4f}")


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
    from tlpipe.config import load_section
    from tlpipe.steps import match as step

    cfg = load_section(step.MatchConfig, "match", params, set_)
    with _tracked("match", cfg, prepared, track) as t:
        result = step.run(prepared, source, out, cfg)
        t.log_metrics(result.metrics)
        t.log_artifacts(out)
    _say(f"wrote {out}: {cfg.matcher} weights, {result.metrics}")


@app.command()
def finetune(
    strategy: str = typer.Option(
        None,
        help="linear_probe | partial | full | lp_ft | scratch, and with `--match` (the output "
        "of `tlpipe match`): joint | specialist; "
        "default: finetune.strategy in params.yaml.",
    ),
    prepared: Path = PREPARED,
    source: Path = typer.Option(Path("models/source.pt"), help="Pretrained source model."),
    match: Path = typer.Option(None, help="Output of `match` (for strategies that use it)."),
    out: Path = typer.Option(None, help="Default: models/finetuned/<strategy>.pt"),
    checkpoints: Path = typer.Option(None, help="Default: checkpoints/<strategy>"),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Fine-tune the source model on the few labelled target images (or the scratch baseline)."""
    from tlpipe.config import load_section
    from tlpipe.steps import finetune as step

    cfg = load_section(step.FinetuneConfig, "finetune", params, set_)
    cfg = cfg.for_strategy(strategy or cfg.strategy)
    out = out or Path("models/finetuned") / f"{cfg.strategy}.pt"
    checkpoints = checkpoints or Path("checkpoints") / cfg.strategy
    with _tracked(f"finetune:{cfg.strategy}", cfg, prepared, track) as t:
        result = step.run(prepared, source, out, cfg, match_dir=match, checkpoint_dir=checkpoints)
        t.log_history(result.history)
        t.log_metrics(result.metrics)
    _say(f"wrote {out}: target val accuracy {result.metrics['target_val_accuracy']:.4f}")


@app.command()
def evaluate(
    prepared: Path = PREPARED,
    baseline: Path = typer.Option(Path("models/scratch.pt"), help="The from-scratch model."),
    finetuned: Path = typer.Option(Path("models/finetuned"), help="Folder of fine-tuned models."),
    out: Path = typer.Option(Path("eval"), help="metrics.json, selected.txt, plots/."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Score every model on the target test split and pick one by validation accuracy."""
    from tlpipe.config import load_section
    from tlpipe.fsio import read_json
    from tlpipe.steps import evaluate as step

    cfg = load_section(step.EvaluateConfig, "evaluate", params, set_)
    models = {p.stem: p for p in sorted(Path(finetuned).glob("*.pt"))}
    models[cfg.baseline] = baseline
    with _tracked("evaluate", cfg, prepared, track) as t:
        result = step.run(prepared, models, out, cfg)
        t.log_metrics(result.metrics)
        t.log_artifacts(out)
    typer.echo(step.format_table(read_json(result.metrics_path)))


def _selected_model(model: Path | None, finetuned: Path, eval_dir: Path) -> Path:
    """--model, or the strategy `evaluate` selected (by validation accuracy)."""
    if model is not None:
        return model
    selected = Path(eval_dir) / "selected.txt"
    if not selected.exists():
        raise TlpipeError(f"{selected} not found: run `tlpipe evaluate` first, or pass --model")
    return Path(finetuned) / f"{selected.read_text().strip()}.pt"


@app.command()
def export(
    model: Path = typer.Option(None, help="Checkpoint to export; default: the selected one."),
    prepared: Path = PREPARED,
    finetuned: Path = typer.Option(Path("models/finetuned"), help="Folder of fine-tuned models."),
    eval_dir: Path = typer.Option(Path("eval"), "--eval", help="Output of `evaluate`."),
    out: Path = typer.Option(Path("export"), help="model.onnx, model.int8.onnx, parity.json."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    track: bool = TRACK,
) -> None:
    """Export to ONNX (fp32 + INT8), check parity with torch on the target test images."""
    from tlpipe.config import load_section
    from tlpipe.steps import export as step

    cfg = load_section(step.ExportConfig, "export", params, set_)
    model = _selected_model(model, finetuned, eval_dir)
    with _tracked("export", cfg, prepared, track) as t:
        result = step.run(model, prepared, out, cfg)
        t.log_metrics(result.metrics)
        t.log_artifact(Path(out) / "parity.json")
    passed = "passed" if result.metrics.get("parity_passed") else "FAILED"
    _say(f"wrote {out}: parity {passed}; {result.metrics}")


@app.command()
def register(
    export_dir: Path = typer.Option(Path("export"), "--export", help="Output of `export`."),
    model: Path = typer.Option(None, help="Checkpoint to log; default: the selected one."),
    prepared: Path = PREPARED,
    finetuned: Path = typer.Option(Path("models/finetuned"), help="Folder of fine-tuned models."),
    eval_dir: Path = typer.Option(Path("eval"), "--eval", help="Output of `evaluate`."),
    out: Path = typer.Option(Path("registry.json"), help="The decision, as JSON."),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Register the model in MLflow; alias `champion` only if the gate passes."""
    from tlpipe import tracking
    from tlpipe.config import load_section
    from tlpipe.data import load_manifest
    from tlpipe.fsio import write_json
    from tlpipe.steps import register as step

    cfg = load_section(step.RegisterConfig, "register", params, set_)
    model = _selected_model(model, finetuned, eval_dir)
    with tracking.step_run("register", cfg, uri=cfg.tracking_uri,
                           manifest=load_manifest(prepared)) as t:  # fmt: skip
        result = step.run(export_dir, model, cfg)
        t.log_metrics(result.metrics)
    write_json(out, {"version": result.version, "alias": result.alias,
                     "promoted": result.promoted, "reason": result.reason})  # fmt: skip
    _say(f"{cfg.model_name} v{result.version} → {result.alias}: {result.reason}")


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

    DVC re-runs only the stages whose code, data or params.yaml section changed.
    """
    env = dict(os.environ)
    if track:
        from tlpipe import tracking
        from tlpipe.config import params_hash, read_params

        tags = {"tlpipe.params_hash": params_hash(read_params("params.yaml"))}
        env["TLPIPE_PARENT_RUN_ID"] = tracking.start_pipeline_run(run_name="pipeline", tags=tags)
    else:
        env["TLPIPE_NO_TRACK"] = "1"
    cmd = [sys.executable, "-m", "dvc", "repro"] + (["--force"] if force else [])
    code = subprocess.call(cmd, env=env)
    if track:
        tracking.end_pipeline_run(env["TLPIPE_PARENT_RUN_ID"], failed=code != 0)
    if code != 0:
        raise TlpipeError(f"`dvc repro` failed (exit {code}); the stage's error is printed above")
    report(Path("eval/metrics.json"))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1."""
    import click

    try:
        app(standalone_mode=False)
    except TlpipeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: re-run the same command to resume from the last epoch", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
