"""The package works installed, outside a checkout: no reliance on pipelines/ or components/."""

from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

import pytest
from conftest import write_idx_dataset
from test_kfp import _scenario

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds and installs the wheel, then runs the DAG: CI runs it (make test-slow)
def test_installed_package_runs_steps_and_the_kubeflow_dag_outside_a_checkout(
    tmp_path: Path,
) -> None:
    env_dir, work = tmp_path / "venv", tmp_path / "elsewhere"
    venv.create(env_dir, with_pip=True)
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    # The dependencies (torch, mlflow, kfp, …) come from this test's environment through a .pth
    # file, which saves installing gigabytes again; tlpipe itself is a regular, non-editable
    # install of this checkout (a .pth line adds a folder, it runs no editable-install hook).
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", str(REPO)], check=True, timeout=600
    )
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLPIPE_", "MLFLOW_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert not check or res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    where = run(str(py), "-c", "import tlpipe; print(tlpipe.__file__)").stdout
    assert where.startswith(purelib), where  # the installed copy, not the checkout's src/
    assert "prepare" in run(str(bin_dir / "tlpipe"), "--help").stdout

    idx = write_idx_dataset(tmp_path / "idx", 30, 10)
    spec = f"{{dataset: synthetic, format: idx, sources: [{idx}]}}"
    run(
        str(bin_dir / "tlpipe"),
        "fetch",
        "--out",
        "raw",
        "--set",
        f"fetch.source={spec}",
        "--set",
        f"fetch.target={spec}",
    )
    run(str(bin_dir / "tlpipe"), "prepare", "--raw", "raw", "--out", "prepared")
    assert (work / "prepared/manifest.json").is_file() and (work / "mlflow.db").is_file()

    # the DAG shipped in the wheel, and the pods' runtime from it: kfp.local runs every
    # component with this venv's python; no --package, no checkout
    shipped = run(str(py), "-c", "from tlpipe.kfp import client; print(client.SHIPPED)").stdout
    assert shipped.startswith(purelib), shipped
    params = _scenario(tmp_path)
    done = run(str(bin_dir / "tlpipe"), "pipeline", "run-local", "-p", str(params))
    assert "gate: pass" in done.stdout, done.stdout
