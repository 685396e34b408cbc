"""The README's edge install for real: a fresh venv gets `.[edge]`, no torch, and serves a model."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlpipe.data import load_manifest
from tlpipe.models import build_model, save_checkpoint
from tlpipe.steps import export

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # pip downloads onnxruntime etc.: CI runs it via `make test-slow`
def test_edge_install_has_no_torch_and_predicts(tiny_prepared: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_prepared)
    classes = manifest["target_classes"]
    net = build_model("small_cnn", len(classes))
    meta = {"arch": "small_cnn", "num_classes": len(classes), "in_chans": 1, "input_size": 28,
            "classes": classes, "mean": manifest["mean"], "std": manifest["std"]}  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", net, meta)
    result = export.run(tmp_path / "m.pt", tiny_prepared, tmp_path / "export",
                        export.ExportConfig(int8=False))  # fmt: skip

    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # a regular (not editable) install from this checkout, as the README says
    subprocess.run([py, "-m", "pip", "install", "-q", f"{REPO}[edge]"], check=True, timeout=900)
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], check=True,
                            capture_output=True, text=True).stdout.lower()  # fmt: skip
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "onnxruntime" in names and "tlpipe" in names
    assert not names & {"torch", "torchvision", "mlflow", "dvc", "kfp"}, names

    image = tmp_path / "shoe.png"
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(image)
    out = subprocess.run([env_dir / "bin" / "tlpipe-edge", "predict", str(result.onnx_path),
                          str(image)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "shoe.png" in out.stdout and any(c in out.stdout for c in classes)
