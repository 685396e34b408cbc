"""A throw-away tlpipe project for the tests that run `tlpipe run` / `dvc repro` for real.

`dvc_project` copies the repository's dvc.yaml and src/ into a fresh git + DVC project and
writes its params.yaml; `project_env` is the environment a run in it gets (this venv's
commands first, a tracking URI, an experiment of its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from conftest import write_idx_dataset

from tlpipe.params.fields import merge

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "fetch",
    "prepare",
    "check",
    "pretrain",
    "match",
    "finetune",
    "evaluate",
    "export",
    "register",
)


def benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util

    if name in sys.modules:  # loaded already (its dataclasses need it registered)
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def synthetic(tmp_path: Path) -> dict:
    """fetch's params for a tiny synthetic IDX dataset (10 classes, 30 + 10 images each),
    split by class like the benchmark."""
    raw = write_idx_dataset(tmp_path / "raw", 30, 10)
    spec = {"dataset": "synthetic", "format": "idx", "sources": [str(raw)]}
    return {"fetch": {"source": spec, "target": spec}}


def dvc_project(tmp_path: Path, params: dict | None = None) -> Path:
    """A git + DVC project running the repository's dvc.yaml with `params` (default: the tiny
    synthetic scenario, a long pretrain, strategy full); returns its folder."""
    work = tmp_path / "project"
    work.mkdir()
    if params is None:
        params = merge(
            synthetic(tmp_path),
            {"pretrain": {"train": {"epochs": 400, "batch_size": 32}}, "strategies": ["full"]},
        )
    params = {**{s: {} for s in SECTIONS}, **params}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    return work


def project_env(uri: str, **extra: str) -> dict[str, str]:
    """The environment of a run: this venv's commands, tracking at `uri`, a new experiment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLPIPE_")}
    bin_dir = str(Path(sys.executable).parent)
    return {
        **env,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": bin_dir + os.pathsep + env["PATH"],
        "TLPIPE_EXPERIMENT": f"run-{uuid.uuid4().hex[:8]}",
        **extra,
    }


def start_run(work: Path, env: dict[str, str]) -> subprocess.Popen:
    """`tlpipe run` in project `work`, started in the background (text pipes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tlpipe.cli", "run"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
