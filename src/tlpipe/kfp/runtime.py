"""What a Kubeflow pod runs: the bodies of the KFP components in `components/`, and the
pipeline's arguments.

A component file is the typed interface of one step; its body is one call to the function of
the same name here, which builds the params sections from the component's JSON parameters,
calls the one step runner (`tlpipe.runner.run_step`: the step's config, tracked child run,
failures, logging of the result) and fills the component's KFP outputs (Metrics, HTML and
Markdown reports, the selected model's confusion matrix, model metadata). It lives in the
package, not in `components/`, because a lightweight component ships only its own function's
source: everything it calls must be installed in the image.

Pipeline parameters are one JSON string per params.yaml section (`prepare_params`, …) plus the
`strategies` list. `arguments()` builds them with `tlpipe.params.resolve`; with no params file
that is the dataclass defaults (`tlpipe.params`), which is what the DAG's parameter defaults are
(`default_arguments()`): the UI, `tlpipe pipeline` and `make run` describe one scenario.
JSON strings rather than dicts: a KFP dict parameter travels as a protobuf Struct, which turns
every int into a float, and the step configs are strict about types.

No torch, kfp or mlflow at import time: this module is imported by the DAG at compile time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError

# KFP's final states (PipelineTaskFinalStatus.state) → the parent MLflow run's status.
_FINAL_STATUS = {"SUCCEEDED": "FINISHED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}


# ---------------------------------------------------------------------------- arguments


def arguments(
    params: str | Path | dict = "params.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """The pipeline's arguments: every section's full config as JSON, and `strategies`.

    Args:
        params: params.yaml (or its data); `{}` = the dataclass defaults.
        overrides: `section.key=value` strings, as for the step commands.
    """
    from tlpipe.params import SECTIONS
    from tlpipe.params.resolver import resolve

    data = resolve(params, overrides).as_dict()
    args: dict[str, Any] = {f"{s}_params": json.dumps(data[s], sort_keys=True) for s in SECTIONS}
    args["strategies"] = list(data["strategies"])
    return args


def default_arguments() -> dict[str, Any]:
    """The DAG's parameter defaults: `arguments` of the dataclass defaults alone."""
    return arguments({})


def config_for(section: str, params_json: str) -> Any:
    """A section's config from a component's JSON parameter (`{}` = the defaults)."""
    from tlpipe.params import SECTIONS
    from tlpipe.params.fields import build

    try:
        values = json.loads(params_json or "{}")
    except json.JSONDecodeError as e:
        raise TlpipeError(f"{section}_params is not JSON ({e}): {params_json[:200]!r}") from e
    if not isinstance(values, dict):
        raise TlpipeError(f"{section}_params must be a JSON object, got {params_json[:200]!r}")
    return build(SECTIONS[section], values, where=f"{section}.")


# ---------------------------------------------------------------------------- in the pods
#
# One function per component (`components/<step>.py`), taking the component's interface in
# order: the component's body is one call to it.


def fetch(fetch_params: str) -> str:
    """The raw data's version (a sha256 of its files), fetched into a temporary folder.

    Only the version leaves the fetch task: an artifact from an uncached task would be new
    every run and so defeat the cache of every task after it.
    """
    from tlpipe import runner

    params = {"fetch": config_for("fetch", fetch_params)}
    with tempfile.TemporaryDirectory() as tmp:
        return runner.run_step("fetch", params, out_dir=Path(tmp) / "raw").version


def prepare(
    fetch_params: str, data_version: str, prepare_params: str, prepared: Any, metrics: Any
) -> str:
    """Fetch raw data version `data_version` again, build the scenario; its dataset_sha256.

    Fails if the raw data changed since the fetch task looked at it.
    """
    from tlpipe import runner

    params = {"fetch": config_for("fetch", fetch_params)}
    with tempfile.TemporaryDirectory() as tmp:  # the fetch task's run logged this fetch
        raw = runner.run_step("fetch", params, track=False, out_dir=Path(tmp) / "raw")
        if raw.version != data_version:
            raise TlpipeError("the raw data changed since `fetch` ran: run the pipeline again")
        params["prepare"] = config_for("prepare", prepare_params)
        result = _run("prepare", params, metrics=metrics, raw_dir=raw.out_dir, out_dir=prepared)
    prepared.metadata.update(
        {"dataset_sha256": result.dataset_sha256, "data_version": data_version}
    )
    return result.dataset_sha256


def check(
    prepared: Any,
    dataset_sha256: str,
    check_params: str,
    register_params: str,
    report: Any,
    metrics: Any,
) -> None:
    """The data check against the champion of `register.model_name` (`tlpipe.steps.check`)."""
    params = {
        "check": config_for("check", check_params),
        "register": config_for("register", register_params),
    }
    _run("check", params, dataset_sha256, metrics=metrics, prepared_dir=prepared, out_dir=report)


def pretrain(
    prepared: Any, dataset_sha256: str, pretrain_params: str, model: Any, metrics: Any
) -> None:
    """The source model on the source split."""
    params = {"pretrain": config_for("pretrain", pretrain_params)}
    _run(
        "pretrain", params, dataset_sha256, metrics=metrics, prepared_dir=prepared, out_model=model
    )


def match(
    prepared: Any,
    dataset_sha256: str,
    source_model: Any,
    match_params: str,
    matching: Any,
    metrics: Any,
    report: Any,
) -> None:
    """Importance weights of the source samples for the target."""
    params = {"match": config_for("match", match_params)}
    _run(
        "match",
        params,
        dataset_sha256,
        metrics=metrics,
        report=report,
        prepared_dir=prepared,
        source_model=source_model,
        out_dir=matching,
    )


def finetune(
    prepared: Any,
    source_model: Any,
    matching: Any,
    strategy: str,
    finetune_params: str,
    model: Any,
    metrics: Any,
) -> None:
    """Fine-tune with `strategy`; the model's metadata names it (evaluate reads it)."""
    params = {"finetune": config_for("finetune", finetune_params)}
    _run(
        "finetune",
        params,
        strategy=strategy,
        metrics=metrics,
        prepared_dir=prepared,
        source_model=source_model,
        match_dir=matching,
        out_model=model,
    )


def baseline(
    prepared: Any, dataset_sha256: str, finetune_params: str, model: Any, metrics: Any
) -> None:
    """The from-scratch baseline (strategy `scratch`) on the target images only."""
    params = {"finetune": config_for("finetune", finetune_params)}
    _run(
        "finetune",
        params,
        dataset_sha256,
        strategy="scratch",
        metrics=metrics,
        prepared_dir=prepared,
        source_model=None,
        out_model=model,
    )


def evaluate(
    prepared: Any,
    dataset_sha256: str,
    baseline_model: Any,
    models: list[Any],
    evaluate_params: str,
    evaluation: Any,
    model: Any,
    metrics: Any,
    confusion: Any,
    report: Any,
) -> str:
    """Compare the baseline and the fine-tuned `models`; copy the one selected by validation.

    Each model artifact names its strategy in its metadata (set by the finetune task). The
    selected checkpoint is copied to `model`, which export and register take: the DAG needs
    no branch per strategy. The UI gets every model's scores and the selected model's
    confusion matrix.
    """
    from tlpipe.fsio import read_json
    from tlpipe.params import check_strategies
    from tlpipe.steps.evaluate import format_table

    cfg = config_for("evaluate", evaluate_params)
    names = [m.metadata.get("strategy", "") for m in models]
    check_strategies(names, baseline=cfg.baseline)  # the list may come from the KFP UI
    paths = {cfg.baseline: Path(baseline_model.path)}
    paths |= {name: Path(m.path) for name, m in zip(names, models, strict=True)}
    result = _run(
        "evaluate",
        {"evaluate": cfg},
        dataset_sha256,
        prepared_dir=prepared,
        models=paths,
        out_dir=evaluation,
    )
    shutil.copyfile(paths[result.selected], model.path)
    model.metadata.update({"framework": "pytorch", "strategy": result.selected})
    table = read_json(result.metrics_path)
    chosen = table["models"][result.selected]
    confusion.log_confusion_matrix(list(chosen["per_class"]), chosen["confusion"])
    save_metadata(confusion)
    scores = {
        f"{name}.{key}": values[key]
        for name, values in table["models"].items()
        for key in ("accuracy", "macro_f1", "val_accuracy")
    }
    log_metrics(metrics, {**scores, **result.metrics})
    plots = sorted((Path(evaluation.path) / "plots").glob("confusion_*.png"))
    write_html(report.path, "Evaluation", result.metrics, plots, format_table(table))
    return result.selected


def export(
    model: Any, prepared: Any, dataset_sha256: str, export_params: str, onnx: Any, metrics: Any
) -> None:
    """model.onnx, model.int8.onnx and parity.json of the selected `model`."""
    params = {"export": config_for("export", export_params)}
    _run(
        "export",
        params,
        dataset_sha256,
        metrics=metrics,
        model_path=model,
        prepared_dir=prepared,
        out_dir=onnx,
    )
    onnx.metadata.update({"framework": "onnx", "strategy": model.metadata.get("strategy", "")})


def gate(onnx: Any, register_params: str, verdict: Any) -> str:
    """ "pass" if ONNX parity passed and accuracy ≥ register.accuracy_floor, else "fail".

    Beating the current champion is register's decision, made against the registry; this
    only keeps a model that could never be promoted out of the registry.
    """
    from tlpipe.steps import register as step

    decision = step.precheck(Path(onnx.path), config_for("register", register_params))
    outcome = "pass" if decision.promoted else "fail"
    Path(verdict.path).write_text(f"**gate: {outcome}**\n\n{decision.reason}\n")
    return outcome


def register(
    onnx: Any, model: Any, prepared: Any, dataset_sha256: str, register_params: str, report: Any
) -> tuple[str, str]:
    """Register the selected model; (version, alias). The champion is re-scored on this run's
    test split (`prepared`) for the paired comparison; the report says why that alias."""
    params = {"register": config_for("register", register_params)}
    result = _run(
        "register", params, dataset_sha256, export_dir=onnx, model_path=model, prepared_dir=prepared
    )
    name = params["register"].model_name
    Path(report.path).write_text(
        f"**{name} v{result.version}** → `{result.alias}`\n\n{result.reason}\n"
    )
    return result.version, result.alias


def _run(
    step: str,
    params: dict[str, Any],
    dataset_sha256: str = "",
    *,
    strategy: str | None = None,
    metrics: Any = None,
    report: Any = None,
    **inputs: Any,
) -> Any:
    """Check the data version, run the step through the runner, fill the component's outputs.

    Args:
        params: the sections' configs the step reads (`tlpipe.runner.step_config`).
        dataset_sha256: The prepared data's version this task was started (and cached) for.
        strategy: For `finetune`: the strategy to train.
        metrics: The component's `Output[Metrics]`: gets the result's numeric metrics.
        report: The component's `Output[HTML]`: a page with the metrics, the result's summary
            and the PNG plots among its artifacts.
        inputs: The step's `run()` inputs: KFP artifacts (their `.path`) or paths. An
            `out_model` artifact gets metadata {framework, strategy}.
    """
    from tlpipe import runner

    paths = {name: _path(value) for name, value in inputs.items()}
    if dataset_sha256:
        check_dataset(paths["prepared_dir"], dataset_sha256)
    cfg, _ = runner.step_config(step, params, strategy)
    if getattr(getattr(cfg, "workers", None), "nodes", 1) > 1:
        result = _trainjob(step, cfg, paths)  # the nodes train, track and upload
    else:
        result = runner.run_step(step, params, strategy=strategy, **paths)
    if metrics is not None:
        log_metrics(metrics, result.metrics)
    if report is not None:
        plots = sorted(png for a in result.artifacts for png in Path(a).rglob("*.png"))
        write_html(report.path, step, result.metrics, plots, result.summary)
    if hasattr(inputs.get("out_model"), "metadata"):
        trained = strategy or "source"  # pretrain's model is the source model
        inputs["out_model"].metadata.update({"framework": "pytorch", "strategy": trained})
    return result


def _trainjob(step: str, cfg: Any, paths: dict[str, Any]) -> Any:
    """Run the training step as a Kubeflow Trainer TrainJob (`tlpipe.kfp.trainjob`)."""
    from tlpipe.kfp import trainjob
    from tlpipe.params.fields import to_dict
    from tlpipe.steps import StepResult

    params = json.dumps(to_dict(cfg), sort_keys=True)
    done = trainjob.submit(step, params, cfg.workers, **paths)
    metrics = {**done["metrics"], "workers.world_size": done["world_size"]}
    return StepResult(metrics=metrics, summary=f"TrainJob {done['job']}: {done['summary']}")


def _path(value: Any) -> Any:
    """A KFP artifact → its local path; anything else passes through."""
    return Path(value.path) if hasattr(value, "path") else value


def check_dataset(prepared_dir: Path, dataset_sha256: str) -> None:
    """Fail if `prepared_dir` is not the data version the task was started for."""
    from tlpipe.data.manifest import load_manifest

    found = load_manifest(prepared_dir).dataset_sha256
    if found != dataset_sha256:
        raise TlpipeError(
            f"prepared data is version {found}, but this step was started for "
            f"{dataset_sha256}: the inputs are inconsistent"
        )


def start_run(run_name: str, kfp_run_id: str) -> str:
    """Open the pipeline's parent MLflow run, tagged with this KFP run's key; its id.

    The steps find it by that key (`tracking.parent_run_id`), not through an input: the id
    changes every run, so as an input it would defeat every task's cache.
    """
    from tlpipe import tracking

    tags = {
        tracking.RUN_KEY_TAG: os.environ.get(tracking.RUN_KEY_ENV, ""),
        "tlpipe.kfp_run_id": kfp_run_id,
        "tlpipe.runner": "kubeflow",
    }
    return tracking.start_pipeline_run(run_name=run_name or None, tags=tags)


def finish_run(state: str) -> None:
    """Close the parent run: FINISHED if the DAG's `state` is SUCCEEDED, KILLED if it was
    cancelled, else FAILED. Nothing to close if start-run never opened one."""
    from tlpipe import tracking

    run_id = tracking.parent_run_id()
    if run_id:
        tracking.end_pipeline_run(run_id, _FINAL_STATUS.get(state, "FAILED"))


# ---------------------------------------------------------------------------- KFP outputs


def log_metrics(artifact: Any, values: dict[str, Any]) -> None:
    """Finite numeric `values` onto a KFP Metrics artifact (the UI's scalar table), then save
    it (NaN, e.g. the validation accuracy of a model refit on validation, is not valid JSON)."""
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            artifact.log_metric(key, float(value))
    save_metadata(artifact)


def save_metadata(artifact: Any) -> None:
    """Write a metrics artifact's metadata to its file as JSON.

    KFP keeps (Classification)Metrics in metadata and needs no file, but kfp.local's cache
    counts an output artifact without a file as missing and never hits; on a cluster the file
    is simply uploaded next to the others.
    """
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(artifact.metadata, indent=1, default=str))


def write_html(path: str | Path, title: str, metrics: dict, images=(), text: str = "") -> None:
    """A self-contained HTML page (KFP's HTML viewer): a metrics table, text, inline PNGs."""
    import base64
    import html

    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v:.4g}</td></tr>"
        for k, v in metrics.items()
        if isinstance(v, int | float)
    )
    pngs = "".join(
        f'<img alt="{html.escape(Path(p).stem)}" style="max-width:48%" '
        f'src="data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}">'
        for p in images
    )
    body = f"<h3>{html.escape(title)}</h3><table>{rows}</table>"
    body += f"<pre>{html.escape(text)}</pre>" if text else ""
    Path(path).write_text(f"<!doctype html><html><body>{body}{pngs}</body></html>\n")
