"""`tlpipe pipeline …`: run the compiled Kubeflow pipeline here, or on a KFP cluster.

    tlpipe pipeline run-local                    # the whole DAG here, with kfp.local
    tlpipe pipeline submit   --host URL          # one run on a KFP cluster
    tlpipe pipeline schedule --host URL --cron "0 3 * * *"

Every command takes the compiled pipeline (`--package`, default: the one shipped inside
tlpipe, compiled from a checkout's pipelines/ by `make pipeline`) and builds its arguments from
params.yaml and `--set section.key=value`, checked against the step configs first, so a typo
fails here and not in a pod an hour later. Only typer, the standard library and the torch-free
`tlpipe.params` are imported at module level.
"""

from __future__ import annotations

from pathlib import Path

import typer

from tlpipe.params.options import PARAMS, SET

app = typer.Typer(
    help="Run the compiled Kubeflow pipeline (KFP v2) here, or submit or schedule it on a "
    "cluster. Arguments come from params.yaml; compile the DAG with "
    "`python -m pipelines.transfer_learning`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # as tlpipe's own help (cli.py)
)

PACKAGE = typer.Option(
    None,
    "--package",
    help="A compiled pipeline (python -m pipelines.transfer_learning writes one). "
    "Default: the pipeline shipped with this tlpipe.",
    show_default=False,
)
HOST = typer.Option(
    None,
    envvar="KF_PIPELINES_ENDPOINT",
    help="KFP API endpoint, e.g. http://localhost:8080 "
    "after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`.",
)
EXPERIMENT = typer.Option("tlpipe", help="KFP experiment the run goes to (created if missing).")
NAMESPACE = typer.Option(
    None,
    envvar="KFP_NAMESPACE",
    help="Kubeflow profile namespace (multi-user KFP), e.g. "
    "tlpipe; leave unset on single-user KFP.",
)
ACCOUNT = typer.Option(None, help="Kubernetes service account of the pods, e.g. tlpipe-pipeline.")


@app.command(
    "run-local",
    help="Run the whole DAG on this machine with kfp.local (SubprocessRunner, no containers, "
    "no retries).\n\nEach component runs in a subprocess of this Python interpreter, so it "
    "uses the installed tlpipe and this environment: MLFLOW_TRACKING_URI (default "
    "sqlite:///mlflow.db here), TLPIPE_EXPERIMENT. GPU requests, node selectors and secrets "
    "only apply on a cluster.",
)
def run_local(
    package: Path | None = PACKAGE,
    params: Path = PARAMS,
    set_: list[str] = SET,
    root: Path = typer.Option(Path("local_outputs"), help="kfp.local pipeline root (outputs)."),
    cache: bool = typer.Option(
        False, "--cache/--no-cache", help="Use kfp.local's task cache (in ROOT/.kfp_cache)."
    ),
) -> None:
    """Run the DAG here with kfp.local (see the command's help)."""
    from tlpipe.kfp import client, runtime
    from tlpipe.tracking import RUN_KEY_TAG

    arguments = runtime.arguments(params, set_)
    result = client.run_local(package or client.SHIPPED, arguments, root, cache=cache)
    cached = "unchanged (cached)"
    typer.echo(f"outputs: {result.run_dir}")
    typer.echo(
        f"selected: {result.selected or cached}; gate: {result.decision or cached}; "
        f"MLflow parent run: tag {RUN_KEY_TAG}={result.run_key}"
    )


@app.command()
def submit(
    host: str = HOST,
    package: Path | None = PACKAGE,
    params: Path = PARAMS,
    set_: list[str] = SET,
    experiment: str = EXPERIMENT,
    run_name: str = typer.Option(None, help="Default: `tlpipe-<date>-<time>`."),
    namespace: str = NAMESPACE,
    service_account: str = ACCOUNT,
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="--no-cache re-runs every step (fetch never is cached)."
    ),
) -> None:
    """Start one run of the compiled pipeline on a Kubeflow Pipelines cluster."""
    from tlpipe.kfp import client, runtime

    arguments = runtime.arguments(params, set_)
    run_id = client.submit(
        _need_host(host),
        package or client.SHIPPED,
        arguments,
        experiment=experiment,
        run_name=run_name,
        namespace=namespace,
        service_account=service_account,
        cache=cache,
    )
    typer.echo(f"run {run_id} submitted to {host} (experiment {experiment})")


@app.command(
    help="Upload the compiled pipeline as a new pipeline version and run it on a cron "
    "schedule.\n\nAt most one run at a time (max_concurrency=1), no catch-up of missed runs "
    "(no_catchup). A scheduled run on unchanged data hits the KFP cache after `fetch`: it "
    "costs a few small pods, trains nothing and registers nothing.",
)
def schedule(
    host: str = HOST,
    cron: str = typer.Option(
        ...,
        help='When to run: 5-field cron "min hour day month weekday" (e.g. "0 3 * * *" = '
        "daily at 03:00 in the KFP scheduler's time zone, usually UTC) or KFP's 6-field form "
        "with seconds first.",
    ),
    name: str = typer.Option("tlpipe-nightly", help="Recurring run name."),
    package: Path | None = PACKAGE,
    params: Path = PARAMS,
    set_: list[str] = SET,
    experiment: str = EXPERIMENT,
    namespace: str = NAMESPACE,
    service_account: str = ACCOUNT,
) -> None:
    """Schedule the compiled pipeline on a KFP cluster (see the command's help)."""
    from tlpipe.kfp import client, runtime

    kfp_cron = client.to_kfp_cron(cron)  # a bad expression fails before any request
    arguments = runtime.arguments(params, set_)
    job_id = client.schedule(
        _need_host(host),
        package or client.SHIPPED,
        kfp_cron,
        arguments,
        name=name,
        experiment=experiment,
        namespace=namespace,
        service_account=service_account,
    )
    typer.echo(f"recurring run {job_id} (cron {kfp_cron!r}) created on {host}")


def _need_host(host: str | None) -> str:
    from tlpipe.errors import TlpipeError

    if not host:
        raise TlpipeError("no KFP endpoint: pass --host URL or set KF_PIPELINES_ENDPOINT")
    return host
