"""The edge runtime: follow the registry's champion and classify images — no torch, no mlflow.

Needs numpy, pillow and onnxruntime (`pip install tlpipe[edge]`) and the standard library.
Everything needed to serve a model — class names, input shape, mean/std — is in the ONNX
file's metadata_props (written by the export step)::

    tlpipe-edge pull                      # MLFLOW_TRACKING_URI's tlpipe@champion, verified
    tlpipe-edge predict photos/           # the installed model; or: predict model.onnx x.png
    tlpipe-edge rollback                  # back to the model pull replaced
    tlpipe-edge bench --batch 1 --runs 200

Modules: `model` (the ONNX wrapper and image loading), `rest_client` (the MLflow registry
over REST), `store` (the model directory), `pull` (verify and swap), `commands` (the CLI).

May import: `tlpipe.errors` only.

Python::

    from tlpipe.edge import EdgeModel
    EdgeModel("model.onnx").predict(["shoe.png"])   # → [("Sandal", 0.97)]
"""

from tlpipe.edge.commands import main
from tlpipe.edge.model import EdgeModel, bench, image_files, select_providers, softmax
from tlpipe.edge.pull import pull
from tlpipe.edge.rest_client import Registry
from tlpipe.edge.store import ModelStore

__all__ = [
    "EdgeModel",
    "ModelStore",
    "Registry",
    "bench",
    "image_files",
    "main",
    "pull",
    "select_providers",
    "softmax",
]
