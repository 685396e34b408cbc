"""Resume files: the training loop's state after each epoch, so a killed run continues.

A resume file is "<magic><sha256 of the bytes>\\n", then torch.save's bytes, loaded with
weights_only=True (tensors, dicts, lists, numbers, strings: unpickling runs no code). A file
written with other settings, data or starting model (`key`) is not resumed from.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from tlpipe.errors import TlpipeError
from tlpipe.fsio import atomic_path

_RESUME_MAGIC = b"tlpipe-resume-v1 sha256="


def save(path, model, optimizer, scheduler, result, best_state, epoch, desc, key):
    """Write the state after `epoch` to `path`, atomically, behind its sha256."""
    state = {
        "desc": desc,
        "key": key,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": result.history,
        "best": [result.best_epoch, result.best_val_accuracy],
        "best_state": best_state,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_RESUME_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The state saved in `path`; None if it is not in the checked format (an older tlpipe's).

    A hash mismatch is an error, not a silent restart: writes are atomic, so no kill causes
    one; the file was damaged or altered after it was written, which the user should hear.
    """
    data = path.read_bytes()
    end = data.find(b"\n")
    if not data.startswith(_RESUME_MAGIC) or end < 0:
        return None
    payload = memoryview(data)[end + 1 :]
    if hashlib.sha256(payload).hexdigest().encode() != data[len(_RESUME_MAGIC) : end]:
        raise TlpipeError(
            f"checkpoint {path} fails its sha256 check: it was damaged or altered after it was "
            "written; delete it to start over"
        )
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol: refused below if unsafe
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch's weights-only message is a page long)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        if isinstance(e, pickle.UnpicklingError):
            why = "it holds more than tensors, numbers and strings"
        raise TlpipeError(f"checkpoint {path} is refused ({why}); delete it to start over") from e


def load(path: Path, device: torch.device, desc: str, key: str) -> dict[str, Any] | None:
    """The state to resume from, or None (not resumable: train from the start; says why)."""
    state = load_state(path, device)
    if state is None:
        print(
            f"{path} is not a checked resume file (an older tlpipe's?): not resuming from it, "
            "training from the start",
            file=sys.stderr,
        )
        return None
    if state.get("desc") != desc:
        raise TlpipeError(f"checkpoint {path} belongs to {state.get('desc')!r}, not {desc!r}")
    if state.get("key") != key:
        print(
            f"{path} was written with other settings, data or starting model: "
            "not resuming from it, training from the start",
            file=sys.stderr,
        )
        return None
    return state


def restore(state, model, optimizer, scheduler, result):
    """Load a `load`ed state into the model, optimizer, scheduler and `result`; the epoch to
    start at and the best weights so far."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.history = state["history"]
    result.best_epoch, result.best_val_accuracy = state["best"]
    result.resumed_from = state["epoch"] + 1
    return state["epoch"] + 1, state["best_state"]
