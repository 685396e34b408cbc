"""The CLI as users run it: help texts, one-line errors, overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlpipe.errors import TlpipeError
from tlpipe.params import FinetuneConfig
from tlpipe.params.fields import build
from tlpipe.params.resolver import parse_overrides, resolve


def tlpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TLPIPE_NO_TRACK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tlpipe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_step(tmp_path: Path) -> None:
    out = tlpipe("--help", cwd=tmp_path).stdout
    for cmd in ("fetch", "prepare", "pretrain", "finetune", "evaluate", "run", "report", "params"):
        assert cmd in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["pretrain", "--set", "pretrain.train.lr=-1"],
            "pretrain.train.lr = -1.0 is out of range: it must be > 0",
        ),
        (["pretrain", "--set", "pretrain.train.epochs=two"], "pretrain.train.epochs must be int"),
        (["pretrain", "--set", "pretrain.trian.lr=0.1"], "unknown parameter(s) pretrain.trian"),
        (["pretrain", "--set", "train.lr=0.1"], "unknown params section(s) train"),
        (["pretrain", "--set", "nonsense"], "--set wants section.key=value"),
        (["pretrain"], "not found"),  # no prepared data yet
        (["finetune", "--strategy", "magic"], "unknown strategy 'magic'"),
        (["report"], "eval/metrics.json not found"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message) -> None:
    res = tlpipe(*args, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evalute"], "No such command 'evalute'. Did you mean 'evaluate'?"),
        (["pipeline", "compile"], "No such command 'compile'"),
        (["finetune", "--bogus"], "No such option: --bogus"),
        (["finetune", "--strategy"], "Option '--strategy' requires an argument"),
        ([], "Usage:"),  # no command: the help
    ],
)
def test_mistyped_commands_get_the_usage_not_a_traceback(tmp_path, args, message) -> None:
    res = tlpipe(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_help_shows_bracketed_and_angled_text(tmp_path: Path) -> None:
    """Help is reflowed markdown: `[...]` and `<...>` in it must survive the rendering."""
    res = subprocess.run(
        [sys.executable, "-m", "tlpipe.cli", "finetune", "--help"],
        env={**os.environ, "COLUMNS": "300"},  # one line an option: nothing wrapped
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--set 'strategies=[full,lp_ft]'." in res.stdout
    assert "Default: models/finetuned/<strategy>.pt." in res.stdout


def test_bad_params_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("pretrain: [unclosed\n")
    res = tlpipe("pretrain", cwd=tmp_path)
    assert res.returncode == 1 and "not valid YAML" in res.stderr


def test_overrides_parse_yaml_values() -> None:
    pairs = ["p.k=5", "p.lr=1e-3", "p.cls=[5, 6]", "p.name=lp_ft", "strategies=[full]"]
    assert parse_overrides(pairs) == {
        "p.k": 5,
        "p.lr": 1e-3,
        "p.cls": [5, 6],
        "p.name": "lp_ft",
        "strategies": ["full"],
    }
    resolved = resolve(
        {"finetune": {"l2sp": 0.1}}, ["finetune.train.epochs=3", "finetune.l2sp=0.5"]
    )
    cfg = resolved["finetune"]
    assert cfg.train.epochs == 3 and cfg.l2sp == 0.5 and cfg.train.lr == FinetuneConfig().train.lr
    with pytest.raises(TlpipeError, match="must be float"):
        build(FinetuneConfig, {"l2sp": "high"})


def test_cli_trains_on_prepared_data(tiny_prepared: Path, tmp_path: Path) -> None:
    args = ["--prepared", str(tiny_prepared), "--out", "m/source.pt"]
    res = tlpipe(
        "pretrain",
        *args,
        "-s",
        "pretrain.train.epochs=1",
        "-s",
        "pretrain.train.batch_size=32",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "source val accuracy" in res.stderr
    assert (tmp_path / "m/source.pt").exists()


def test_configs_the_cli_and_the_kubeflow_client_import_no_torch() -> None:
    code = (
        "import sys; from tlpipe import cli, params; from tlpipe.kfp import client, runtime\n"
        "params.resolve('params.yaml'); runtime.default_arguments()\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
