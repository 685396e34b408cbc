"""`tlpipe pipeline …`: the Kubeflow side of tlpipe, and what the KFP components call in a pod.

Commands (the DAG itself is `pipelines/transfer_learning.py` in the repository):

    tlpipe pipeline compile                      # → pipelines/transfer_learning.yaml
    tlpipe pipeline run-local                    # the whole DAG here, with kfp.local
    tlpipe pipeline submit   --host URL          # one run on a KFP cluster
    tlpipe pipeline schedule --host URL --cron "0 3 * * *"

Every command builds the pipeline's arguments from params.yaml (one JSON parameter per
section, `--set section.key=value` overrides), validated against the step configs first, so a
typo fails here and not in a pod an hour later.

The second half of this module is the small runtime the component bodies share (config from a
JSON parameter, the MLflow step run nested under the pipeline's parent run, the raw-data
version). It lives in the library because a lightweight component ships only its own function.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer

from tlpipe.errors import TlpipeError

T = TypeVar("T")

app = typer.Typer(
    help="Compile, run locally, submit or schedule the Kubeflow pipeline (KFP v2). "
    "Arguments come from params.yaml; the DAG is pipelines/transfer_learning.py.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# The params.yaml sections that become pipeline parameters `<section>_params` (JSON strings).
SECTIONS = ("fetch", "prepare", "pretrain", "match", "finetune", "evaluate", "export", "register")
# A key unique to one KFP run, the same in all its pods: the Argo workflow name (pod label
# workflows.argoproj.io/workflow) on a cluster, `local-…` under run-local.
RUN_KEY_ENV = "TLPIPE_KFP_RUN"
RUN_KEY_TAG = "tlpipe.kfp_run"

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read.")
SET = typer.Option(
    None, "--set", "-s", help="Override a param: section.key=value (repeatable), "
    "e.g. --set pretrain.train.epochs=1."
)  # fmt: skip
STRATEGY = typer.Option(None, help="Fine-tune strategy; default: finetune.strategy in params.")
HOST = typer.Option(
    None, envvar="KF_PIPELINES_ENDPOINT", help="KFP API endpoint, e.g. http://localhost:8080 "
    "after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`."
)  # fmt: skip
EXPERIMENT = typer.Option("tlpipe", help="KFP experiment the run goes to (created if missing).")
NAMESPACE = typer.Option(
    None, envvar="KFP_NAMESPACE", help="Kubeflow profile namespace (multi-user KFP), e.g. "
    "tlpipe; leave unset on single-user KFP."
)  # fmt: skip
ACCOUNT = typer.Option(None, help="Kubernetes service account of the pods, e.g. tlpipe-pipeline.")
CACHE = typer.Option(
    True, "--cache/--no-cache", help="--no-cache re-runs every step (fetch never is cached)."
)  # fmt: skip


# ---------------------------------------------------------------------------- commands


@app.command("compile")
def compile_(
    out: Path = typer.Option(None, help="Default: pipelines/transfer_learning.yaml in the repo."),
) -> None:
    """Compile the DAG to the KFP v2 pipeline YAML (commit it; a test fails when it is stale)."""
    tl = pipeline_module()
    path = tl.compile_pipeline(out or tl.PACKAGE)
    typer.echo(f"wrote {path}")


@app.command(
    "run-local",
    help="Run the whole DAG on this machine with kfp.local (SubprocessRunner, no containers, "
    "no retries).\n\nEach component runs in a subprocess of this Python interpreter, so it "
    "uses the installed tlpipe and this environment: MLFLOW_TRACKING_URI (default "
    "sqlite:///mlflow.db here), TLPIPE_EXPERIMENT. GPU requests, node selectors and secrets "
    "only apply on a cluster.",
)
def run_local(
    params: Path = PARAMS,
    set_: list[str] = SET,
    strategy: str = STRATEGY,
    root: Path = typer.Option(Path("local_outputs"), help="kfp.local pipeline root (outputs)."),
    cache: bool = typer.Option(
        False, "--cache/--no-cache", help="Use kfp.local's task cache (in ROOT/.kfp_cache)."
    ),
) -> None:
    """Run the DAG here with kfp.local (see the command's help)."""
    arguments = pipeline_arguments(params, set_, strategy)
    result = pipeline_module().run_local(arguments, root, cache=cache)
    typer.echo(f"outputs: {result.run_dir}")
    typer.echo(f"gate: {result.decision}; MLflow parent run: tag {RUN_KEY_TAG}={result.run_key}")


@app.command()
def submit(
    host: str = HOST,
    params: Path = PARAMS,
    set_: list[str] = SET,
    strategy: str = STRATEGY,
    experiment: str = EXPERIMENT,
    run_name: str = typer.Option(None, help="Default: tlpipe <date time>."),
    namespace: str = NAMESPACE,
    service_account: str = ACCOUNT,
    cache: bool = CACHE,
) -> None:
    """Compile the DAG and start one run of it on a Kubeflow Pipelines cluster."""
    arguments = pipeline_arguments(params, set_, strategy)
    run_id = pipeline_module().submit(
        _need_host(host), arguments, experiment=experiment, run_name=run_name,
        namespace=namespace, service_account=service_account, cache=cache,
    )  # fmt: skip
    typer.echo(f"run {run_id} submitted to {host} (experiment {experiment})")


@app.command(
    help="Upload the compiled DAG as a new pipeline version and run it on a cron schedule.\n\n"
    "At most one run at a time (max_concurrency=1), no catch-up of missed runs (no_catchup). "
    "A scheduled run on unchanged data hits the KFP cache after `fetch`: it costs a few small "
    "pods, trains nothing and registers nothing.",
)
def schedule(
    host: str = HOST,
    cron: str = typer.Option(
        ...,
        help='When to run: 5-field cron "min hour day month weekday" (e.g. "0 3 * * *" = '
        "daily at 03:00 in the KFP scheduler's time zone, usually UTC) or KFP's 6-field form "
        "with seconds first.",
    ),  # fmt: skip
    name: str = typer.Option("tlpipe-nightly", help="Recurring run name."),
    params: Path = PARAMS,
    set_: list[str] = SET,
    strategy: str = STRATEGY,
    experiment: str = EXPERIMENT,
    namespace: str = NAMESPACE,
    service_account: str = ACCOUNT,
) -> None:
    """Schedule the DAG on a KFP cluster (see the command's help)."""
    tl = pipeline_module()
    kfp_cron = tl.to_kfp_cron(cron)  # a bad expression fails before anything is uploaded
    arguments = pipeline_arguments(params, set_, strategy)
    job_id = tl.schedule(
        _need_host(host), kfp_cron, arguments, name=name, experiment=experiment,
        namespace=namespace, service_account=service_account,
    )  # fmt: skip
    typer.echo(f"recurring run {job_id} (cron {kfp_cron!r}) created on {host}")


def _need_host(host: str | None) -> str:
    if not host:
        raise TlpipeError("no KFP endpoint: pass --host URL or set KF_PIPELINES_ENDPOINT")
    return host


# ---------------------------------------------------------------------------- arguments


def pipeline_arguments(
    params: str | Path | dict, overrides: list[str] | None = None, strategy: str | None = None
) -> dict[str, str]:
    """The pipeline's arguments: each params.yaml section as JSON, checked against its config."""
    from tlpipe.config import load_section, read_params

    data = params if isinstance(params, dict) else read_params(params)
    by_section: dict[str, list[str]] = {}
    for pair in overrides or []:
        section, dot, rest = pair.partition(".")
        if not dot or section not in SECTIONS:
            raise TlpipeError(f"--set wants section.key=value with a section of {SECTIONS}")
        by_section.setdefault(section, []).append(rest)
    arguments: dict[str, str] = {}
    for section, cls in config_classes().items():
        cfg = load_section(cls, section, data, by_section.get(section))
        arguments[f"{section}_params"] = json.dumps(_plain(cfg), sort_keys=True)
    finetune = json.loads(arguments["finetune_params"])
    arguments["strategy"] = strategy or finetune["strategy"]
    return arguments


def config_classes() -> dict[str, type]:
    """params.yaml section → the step's config class."""
    from tlpipe.steps import evaluate, export, fetch, finetune, match, prepare, pretrain, register

    return {
        "fetch": fetch.FetchConfig, "prepare": prepare.PrepareConfig,
        "pretrain": pretrain.PretrainConfig, "match": match.MatchConfig,
        "finetune": finetune.FinetuneConfig, "evaluate": evaluate.EvaluateConfig,
        "export": export.ExportConfig, "register": register.RegisterConfig,
    }  # fmt: skip


def _plain(cfg: Any) -> Any:
    """A config as JSON-ready data (tuples → lists), full: defaults included."""
    from tlpipe.config import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))


# ---------------------------------------------------------------------------- the DAG module


def repo_root() -> Path:
    """The checkout holding `pipelines/transfer_learning.py`: the current dir or a parent of
    it, else the checkout tlpipe is installed from (editable install)."""
    here = Path.cwd().resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "pipelines" / "transfer_learning.py").is_file():
            return root
    raise TlpipeError(
        "pipelines/transfer_learning.py not found: run `tlpipe pipeline …` inside the tlpipe "
        "repository (the DAG and components/ are repository folders, not part of the wheel)"
    )


def pipeline_module() -> Any:
    """Import `pipelines.transfer_learning` (and `components`) from the repository."""
    import importlib

    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.transfer_learning")


# ---------------------------------------------------------------------------- in the pods


def component_config(cls: type[T], section: str, params_json: str) -> T:
    """Build a step config from a component's JSON parameter (`{}` = the defaults)."""
    from tlpipe.config import build

    try:
        values = json.loads(params_json or "{}")
    except json.JSONDecodeError as e:
        raise TlpipeError(f"{section}_params is not JSON ({e}): {params_json[:200]!r}") from e
    if not isinstance(values, dict):
        raise TlpipeError(f"{section}_params must be a JSON object, got {params_json[:200]!r}")
    return build(cls, values, where=f"{section}.")


@contextlib.contextmanager
def component_run(
    step: str, cfg: Any = None, prepared: str | Path | None = None, dataset_sha256: str = ""
) -> Iterator[Any]:
    """The MLflow child run of one component (`tracking.step_run`), under the pipeline's run.

    Checks that `prepared` is the dataset version the component was keyed on (its
    `dataset_sha256` input) and finds the parent run (see `adopt_parent_run`).
    """
    from tlpipe import tracking

    manifest = {"dataset_sha256": dataset_sha256} if dataset_sha256 else None
    if prepared is not None:
        from tlpipe.data import load_manifest

        manifest = load_manifest(Path(prepared))
        if dataset_sha256 and manifest.get("dataset_sha256") != dataset_sha256:
            raise TlpipeError(
                f"prepared data is version {manifest.get('dataset_sha256')}, but this step "
                f"was started for {dataset_sha256}: the inputs are inconsistent"
            )
    adopt_parent_run()
    with tracking.step_run(step, cfg, manifest=manifest) as run:
        yield run


def adopt_parent_run() -> str | None:
    """Set `TLPIPE_PARENT_RUN_ID` to this KFP run's parent MLflow run, found by its tag.

    The parent run id cannot be an *input* of the cached components: it changes every run, so
    it would change their cache keys and nothing would ever be cached (and KFP's exit handler
    may not take inputs from other tasks). Instead every pod of a run gets the same run key in
    env `TLPIPE_KFP_RUN` (its Argo workflow name, from a pod label) and looks up the run that
    `start-run` tagged with it. With no key or no such run, the step run is logged on its own
    rather than failing the step.
    """
    from tlpipe import tracking

    parent = os.environ.get(tracking.PARENT_ENV)
    key = os.environ.get(RUN_KEY_ENV, "")
    if parent or not key or "'" in key:
        return parent or None
    client = tracking.connect()
    experiment = client.get_experiment_by_name(tracking.experiment_name())
    found = []
    if experiment is not None:
        query = f"tags.`{RUN_KEY_TAG}` = '{key}'"
        found = client.search_runs([experiment.experiment_id], query, max_results=1)
    if not found:
        print(f"tlpipe: no MLflow run tagged {RUN_KEY_TAG}={key}; logging without a parent")
        return None
    os.environ[tracking.PARENT_ENV] = found[0].info.run_id
    return found[0].info.run_id


def start_parent_run(run_name: str, kfp_run_id: str = "") -> str:
    """Create the pipeline's parent MLflow run, tagged with the run key; return its id."""
    from tlpipe import tracking

    tags = {RUN_KEY_TAG: os.environ.get(RUN_KEY_ENV, ""), "tlpipe.kfp_run_id": kfp_run_id,
            "tlpipe.runner": "kubeflow"}  # fmt: skip
    return tracking.start_pipeline_run(run_name=run_name or None, tags=tags)


def end_parent_run(state: str) -> None:
    """Close the parent run: FINISHED if the KFP DAG `state` is SUCCEEDED, else FAILED."""
    from tlpipe import tracking

    run_id = adopt_parent_run()
    if run_id:
        tracking.connect().set_tag(run_id, "tlpipe.kfp_state", state)
        tracking.end_pipeline_run(run_id, failed=state != "SUCCEEDED")


def data_version(raw_dir: str | Path) -> str:
    """sha256 over the relative path and sha256 of every file under `raw_dir`."""
    from tlpipe.fsio import sha256_file

    raw_dir = Path(raw_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(raw_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def log_metrics(artifact: Any, values: dict[str, Any]) -> None:
    """Numeric `values` onto a KFP Metrics artifact (the UI's scalar table), then save_metadata."""
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
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
