"""Release: which model is allowed to replace the champion, and on what evidence.

`promotion` is the pure rule (a candidate against the champion: paired McNemar test and a
per-class floor); `paired` scores two ONNX files on the very same images through the edge
runtime; `parity` reads the evidence export leaves (parity.json); `registry` is the MLflow
model registry (register a version, move the aliases race-safely, fetch the champion's files),
the one way the steps reach MLflow.

May import: `tlpipe.tracking` (registry only), `tlpipe.edge` (the runtime that scores ONNX
files), `tlpipe.data`, `tlpipe.params`, `tlpipe.fsio`, `tlpipe.errors`.
"""
