"""parity.json: what `export` proves about its ONNX files, and what the gate reads from it.

`tlpipe.steps.export` writes it (ONNX Runtime against torch on the target test images);
`tlpipe.steps.register` and the Kubeflow gate read it with `read_parity`, which checks the
fields the promotion rule needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError

PARITY_FILE = "parity.json"


def read_parity(export_dir: Path) -> dict[str, Any]:
    """parity.json of an export dir, checked for what the registry gate reads."""
    from tlpipe.fsio import read_json

    path = Path(export_dir) / PARITY_FILE
    parity = read_json(path)
    try:
        float(parity["fp32"]["accuracy"])
        if not isinstance(parity["passed"], bool) or not parity["test_sha256"]:
            raise ValueError
    except (KeyError, TypeError, ValueError) as e:
        raise TlpipeError(
            f"{path} lacks passed / fp32.accuracy / test_sha256: re-run `tlpipe export`"
        ) from e
    return parity
