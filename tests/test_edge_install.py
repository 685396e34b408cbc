"""The README's edge install for real: a fresh venv gets `.[edge]` (no torch, no mlflow), pulls
the champion from a real MLflow server over REST, and serves it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.data.manifest import load_manifest
from tlpipe.steps import export
from tlpipe.train.checkpoint import CheckpointMeta
from tlpipe.train.models import build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _publish(uri: str, export_dir: Path) -> None:
    """Register the exported files as `tlpipe register` does (artifacts + sha256 tags)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("edge-install")).info.run_id
    client.log_artifact(run_id, str(export_dir / "model.onnx"), "onnx")
    client.set_terminated(run_id)
    sha = hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()
    client.create_registered_model("edge-install")
    mv = client.create_model_version(
        "edge-install", f"runs:/{run_id}/onnx", run_id, tags={"onnx_sha256": sha}
    )
    client.set_registered_model_alias("edge-install", "champion", mv.version)


@pytest.mark.slow  # pip downloads onnxruntime etc.: CI runs it via `make test-slow`
def test_edge_install_has_no_torch_and_predicts(
    tiny_prepared: Path, tmp_path: Path, mlflow_server: str
) -> None:
    manifest = load_manifest(tiny_prepared)
    classes = manifest.target_classes
    net = build_model("small_cnn", len(classes))
    meta = CheckpointMeta(
        arch="small_cnn",
        in_chans=1,
        input_size=28,
        classes=classes,
        mean=manifest.mean,
        std=manifest.std,
    )
    save_checkpoint(tmp_path / "m.pt", net, meta)
    result = export.run(
        tmp_path / "m.pt", tiny_prepared, tmp_path / "export", export.ExportConfig(int8=False)
    )
    _publish(mlflow_server, tmp_path / "export")

    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # a regular (not editable) install from this checkout, as the README says
    subprocess.run([py, "-m", "pip", "install", "-q", f"{REPO}[edge]"], check=True, timeout=900)
    listed = subprocess.run(
        [py, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "onnxruntime" in names and "tlpipe" in names
    assert not names & {"torch", "torchvision", "mlflow", "dvc", "kfp"}, names

    image = tmp_path / "shoe.png"
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(image)
    exe = str(env_dir / "bin" / "tlpipe-edge")
    direct = subprocess.run(
        [exe, "predict", str(result.onnx_path), str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert direct.returncode == 0, direct.stderr
    assert "shoe.png" in direct.stdout and any(c in direct.stdout for c in classes)

    # pull over REST with the standard library, then serve from the model directory
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "TLPIPE_EDGE_MODEL_DIR": str(tmp_path / "models"),
    }
    out = subprocess.run(
        [exe, "pull", "--name", "edge-install"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "installed edge-install v1 (fp32)" in out.stdout, out.stderr
    served = subprocess.run(
        [exe, "predict", str(image)], env=env, capture_output=True, text=True, timeout=120
    )
    assert served.returncode == 0 and served.stdout == direct.stdout, served.stderr
