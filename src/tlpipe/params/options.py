"""The `--params` / `--set` options of every command that resolves params (typer).

`tlpipe <step>`, `tlpipe params` and `tlpipe pipeline run-local | submit | schedule` take the
same two options and hand them to `tlpipe.params.resolver.resolve`. Imported by the command
lines only (typer is not a dependency of the library).
"""

from __future__ import annotations

from pathlib import Path

import typer

PARAMS = typer.Option(
    Path("params.yaml"), "--params", "-p", help="Scenario file: overrides of the defaults."
)
SET = typer.Option(
    None,
    "--set",
    "-s",
    help="Override one param for this run: section.key=value (repeatable), "
    "e.g. --set pretrain.train.epochs=2 --set 'strategies=[full,lp_ft]'.",
)
