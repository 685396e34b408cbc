"""`pull`: install the registry's current champion on this device, verified, atomically.

Integrity rule: a device installs only the file the pipeline published. `tlpipe register`
records the sha256 of each ONNX file as a version tag (`onnx_sha256`, `onnx_int8_sha256`);
pull streams the artifact, hashes it, and refuses a version without that tag or a file whose
hash differs. With a key the device trusts (TLPIPE_EDGE_HMAC_KEY), the tag must also carry a
valid HMAC-SHA256 of that hash (`onnx_sha256_hmac`, `onnx_int8_sha256_hmac`), so that write
access to the registry alone cannot publish a model. The model must also load with this
device's onnxruntime before it is swapped in.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re

from tlpipe.edge.model import EdgeModel
from tlpipe.edge.rest_client import ModelVersion, Registry
from tlpipe.edge.store import MODEL_FILE, Installed, ModelStore
from tlpipe.errors import TlpipeError

# variant → (run artifact, sha256 tag)
VARIANTS = {
    "fp32": ("onnx/model.onnx", "onnx_sha256"),
    "int8": ("onnx/model.int8.onnx", "onnx_int8_sha256"),
}
HMAC_KEY_ENV = "TLPIPE_EDGE_HMAC_KEY"


@dataclasses.dataclass(frozen=True)
class PullResult:
    installed: Installed
    changed: bool
    message: str


def pull(
    store: ModelStore,
    registry: Registry,
    name: str = "tlpipe",
    alias: str = "champion",
    variant: str = "fp32",
    force: bool = False,
) -> PullResult:
    """Install `name@alias` (the `variant` ONNX file) unless it is already current."""
    if variant not in VARIANTS:
        raise TlpipeError(f"unknown variant {variant!r}; choose {' or '.join(VARIANTS)}")
    with store.lock():
        current = store.current()
        try:
            return _pull(store, registry, name, alias, variant, force, current)
        except TlpipeError as e:
            if current is None:
                raise
            raise TlpipeError(f"{e}; {current} keeps serving") from e


def _pull(
    store: ModelStore,
    registry: Registry,
    name: str,
    alias: str,
    variant: str,
    force: bool,
    current: Installed | None,
) -> PullResult:
    mv = registry.alias(name, alias)
    sha = published_sha256(mv, variant)
    new = Installed(mv.name, mv.version, variant, sha, mv.tags)
    if current is not None and current.slot == new.slot and current.sha256 == sha and not force:
        return PullResult(current, False, f"{current} is {name}@{alias} already; nothing to do")
    if store.rolled_back() == new.slot and not force:
        keep = current or new
        return PullResult(
            keep,
            False,
            f"{new} was rolled back on this device; keeping {keep} (pull --force installs it)",
        )
    if store.has_intact(new.slot, sha):  # still on disk as `previous`: no download
        store.install(None, new)
    else:
        with store.staging() as staged:
            artifact = VARIANTS[variant][0]
            with open(staged / MODEL_FILE, "wb") as f:
                got = registry.download(mv.run_id, artifact, f)
            if got != sha:
                raise TlpipeError(
                    f"{artifact} of {new} has sha256 {got[:16]}…, not the "
                    f"{sha[:16]}… recorded at registration: refused (tampered "
                    "or damaged on the way)"
                )
            EdgeModel(staged / MODEL_FILE, provider="cpu")  # it must load here, before the swap
            store.install(staged, new)
    was = f" (was {current})" if current is not None else ""
    return PullResult(new, True, f"installed {new} from {name}@{alias}{was}")


def published_sha256(mv: ModelVersion, variant: str) -> str:
    """The sha256 the pipeline recorded for this variant's file; checks its HMAC if keyed."""
    tag = VARIANTS[variant][1]
    sha = mv.tags.get(tag, "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        if variant == "int8" and not sha:
            raise TlpipeError(
                f"{mv.name} v{mv.version} has no INT8 file: it failed its parity at export "
                "(parity.json's int8.reason) or was not made; pull the fp32 variant"
            )
        raise TlpipeError(
            f"{mv.name} v{mv.version} has no valid {tag} tag, so its {variant} "
            "file cannot be verified: refused (register it with a tlpipe that "
            "records it)"
        )
    key = os.environ.get(HMAC_KEY_ENV, "")
    if key:
        signature = mv.tags.get(f"{tag}_hmac", "").strip().lower()
        if not hmac.compare_digest(signature, sign(sha, key)):
            what = "a wrong" if signature else "no"
            raise TlpipeError(
                f"{mv.name} v{mv.version} has {what} {tag}_hmac signature for "
                f"the key in {HMAC_KEY_ENV}: refused"
            )
    return sha


def sign(sha256: str, key: str) -> str:
    """HMAC-SHA256 of a file's sha256 hex digest: the tag register writes when it has the key."""
    return hmac.new(key.encode(), sha256.encode(), "sha256").hexdigest()
