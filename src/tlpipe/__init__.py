"""tlpipe: a transfer-learning MLOps pipeline.

Importing the package is cheap: heavy libraries (torch, mlflow, onnx, kfp) are imported inside
the functions that need them.
"""

__version__ = "0.1.0"
