"""Untrusted data: symlinks out of the dataset, decompression bombs, cut or trickled downloads,
and resume files that were altered. Real files in tmp_path, real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    fetched,
    make_patterns,
    mine,
    png_header_only,
    write_idx_dataset,
    write_imagefolder,
)

from tlpipe.data.manifest import load_manifest
from tlpipe.data.prepared import load_split
from tlpipe.data.readers import read_raw
from tlpipe.errors import TlpipeError
from tlpipe.params import fields, resolver
from tlpipe.steps import fetch, prepare
from tlpipe.train.loop import ArrayBatches, TrainConfig, fit
from tlpipe.train.models import build_model

# ---------------------------------------------------------------------------- symlinks


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A credentials file outside every dataset folder."""
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text("aws_secret_access_key = SECRET\n")
    return path


def _tree(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "a.png").write_bytes(split.encode())
    return root


def _holds_secret(root: Path) -> bool:
    return root.exists() and any(
        b"SECRET" in p.read_bytes() for p in root.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_fetch_refuses_a_symlink_out_of_the_source(tmp_path: Path, secret: Path, kind) -> None:
    tree = _tree(tmp_path / "data")
    link = tree / "train" / "cat" / "b.png" if kind == "file" else tree / "train" / "dog"
    link.symlink_to(secret if kind == "file" else secret.parent)
    out = tmp_path / "raw"
    cfg = mine((str(tree),))
    with pytest.raises(TlpipeError, match=rf"{link.name} is a symlink that leads out of .*data"):
        fetch.run(cfg, out)
    assert not out.exists() and not _holds_secret(tmp_path / "raw")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fetch_copies_links_inside_the_source_and_refuses_loops(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "data")
    (tree / "train" / "cat" / "b.png").symlink_to("a.png")  # inside the root: copied as a file
    result = fetch.run(mine((str(tree),)), tmp_path / "r")
    copied = tmp_path / "r" / "target" / "train" / "cat" / "b.png"
    assert not copied.is_symlink() and copied.read_bytes() == b"train" and len(result.files) == 5
    (tree / "train" / "cat" / "loop").symlink_to("..")
    with pytest.raises(TlpipeError, match="loop is a symlink to a folder that holds it"):
        fetch.run(mine((str(tree),)), tmp_path / "r2")
    (tree / "train" / "cat" / "loop").unlink()
    (tree / "train" / "cat" / "gone.png").symlink_to("missing.png")
    with pytest.raises(TlpipeError, match="gone.png is a broken symlink"):
        fetch.run(mine((str(tree),)), tmp_path / "r2")


def test_fetch_refuses_an_archive_link_out(tmp_path: Path, secret: Path) -> None:
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as t:
        info = tarfile.TarInfo("train/cat/creds.png")
        info.type, info.linkname = tarfile.SYMTYPE, str(secret)
        t.addfile(info)
    with pytest.raises(TlpipeError, match="d.tar: cannot unpack"):
        fetch.run(mine((str(archive),)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_readers_and_prepare_refuse_symlinks_out(tmp_path: Path, secret: Path) -> None:
    folder = write_imagefolder(tmp_path / "folder")
    outside = write_imagefolder(tmp_path / "elsewhere")
    link = folder / "train" / "dog" / "z.png"
    link.symlink_to(outside / "train" / "dog" / "img0.png")  # a real image, but not in the root
    with pytest.raises(TlpipeError, match=r"z.png is a symlink that leads out of .*folder"):
        read_raw(folder, "imagefolder", size=16)
    idx = write_idx_dataset(tmp_path / "idx")
    images = idx / "train-images-idx3-ubyte.gz"
    os.replace(images, tmp_path / "moved.gz")
    images.symlink_to(tmp_path / "moved.gz")
    raw = fetched(tmp_path / "raw", write_idx_dataset(tmp_path / "idx2"), "idx")
    images = raw / "source" / "train-images-idx3-ubyte.gz"  # a link planted in data/raw
    os.replace(images, tmp_path / "moved.gz")
    images.symlink_to(tmp_path / "moved.gz")
    with pytest.raises(TlpipeError, match="train-images-idx3-ubyte.gz is a symlink that leads"):
        prepare.run(raw, tmp_path / "prepared", prepare.PrepareConfig())
    with pytest.raises(TlpipeError, match="train-images-idx3-ubyte.gz is a symlink that leads"):
        read_raw(idx, "idx")
    assert not (tmp_path / "prepared").exists()
    npz = tmp_path / "npz"
    npz.mkdir()
    (npz / "train.npz").symlink_to(secret)
    with pytest.raises(TlpipeError, match="train.npz is a symlink that leads out"):
        read_raw(npz, "npz")


def test_a_linked_dataset_folder_is_fine(tmp_path: Path) -> None:
    """data/raw may itself be a link (another disk): only links *out of* it are refused."""
    real = write_imagefolder(tmp_path / "disk" / "folder")
    (tmp_path / "raw").symlink_to(real)
    assert len(read_raw(tmp_path / "raw", "imagefolder", size=16)) == 18


# ---------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(
    ("side", "match"),
    [
        (13_300, r"13300x13300 = 176,890,000 pixels is over prepare.max_image_pixels = 50,000,000"),
        (20_000, "refused, too many pixels to decode safely"),
    ],  # PIL's own hard limit, first
)
def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path, side, match) -> None:
    folder = write_imagefolder(tmp_path / "folder")
    bomb = folder / "train" / "cat" / "bomb.png"
    bomb.write_bytes(png_header_only(side, side))
    # the check reads the header only: decoding this file would fail with another message
    cfg = resolver.resolve(
        {"prepare": {"input_size": 16, "source": {"classes": [0]}, "target": {"classes": [1, 2]}}}
    )["prepare"]
    assert cfg.max_image_pixels == 50_000_000
    raw = fetched(tmp_path / "raw", folder, "imagefolder")
    with pytest.raises(TlpipeError, match=rf"bomb.png: {match}"):
        prepare.run(raw, tmp_path / "prepared", cfg)
    assert not (tmp_path / "prepared").exists()


def test_the_pixel_limit_is_a_per_dataset_param(tmp_path: Path) -> None:
    folder = write_imagefolder(tmp_path / "folder")  # images up to 34 x 40 = 1360 pixels
    values = {
        "input_size": 16,
        "source": {"classes": [0]},
        "target": {"classes": [1, 2], "val_fraction": 0.5},
        "seed": 1,
    }
    raw = fetched(tmp_path / "raw", folder, "imagefolder")
    small = resolver.resolve({"prepare": {**values, "max_image_pixels": 1000}})["prepare"]
    with pytest.raises(TlpipeError, match=r"cat/img2.jpg: 30x34 = 1,020 pixels is over .* = 1,000"):
        prepare.run(raw, tmp_path / "p", small)
    enough = resolver.resolve({"prepare": {**values, "max_image_pixels": 1360}})["prepare"]
    prepare.run(raw, tmp_path / "p", enough)
    assert load_manifest(tmp_path / "p").scenario["max_image_pixels"] == 1360
    with pytest.raises(TlpipeError, match="max_image_pixels = 0 is out of range: it must be >= 1"):
        fields.build(prepare.PrepareConfig, {**values, "max_image_pixels": 0})


# ---------------------------------------------------------------------------- downloads


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch):
    """serve(handler) → base URL of a real HTTP server on 127.0.0.1 calling handler(request)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(handle: Callable[[BaseHTTPRequestHandler], None]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with contextlib.suppress(OSError):  # the client hung up (a deadline)
                    handle(self)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _files(tmp_path: Path) -> dict[str, bytes]:
    """Small archives of every checkable kind (all of one real image tree)."""
    tree = _tree(tmp_path / "tree")
    (tree / "train" / "cat" / "big.png").write_bytes(os.urandom(30_000))  # a cut loses data
    out = {}
    for name, mode in (("d.tar", "w"), ("d.tar.gz", "w:gz"), ("d.tar.xz", "w:xz")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            t.add(tree, arcname=".")
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(tree.rglob("*.png")):
            z.write(p, p.relative_to(tree).as_posix())
    out["d.zip"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, x=make_patterns(2)[0], y=make_patterns(2)[1])
    out["train.npz"] = buf.getvalue()
    out["train-images-idx3-ubyte.gz"] = gzip.compress(os.urandom(50_000))
    return out


def _no_length(files: dict[str, bytes], cut: float = 1.0):
    """Answer without Content-Length (HTTP/1.0, the body ends when the server closes)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        body = files.get(request.path.lstrip("/"))
        if body is None:
            request.send_error(404)
            return
        request.send_response(200)
        request.end_headers()
        request.wfile.write(body[: int(len(body) * cut)])

    return handle


@pytest.mark.parametrize(
    "name", ["d.tar", "d.tar.gz", "d.tar.xz", "d.zip", "train.npz", "train-images-idx3-ubyte.gz"]
)
def test_a_cut_download_without_length_or_checksum_is_not_stored(serve, tmp_path, name) -> None:
    files = _files(tmp_path)
    whole, cut = serve(_no_length(files)), serve(_no_length(files, cut=0.6))
    ok = fetch.run(mine((f"{whole}/{name}",)), tmp_path / "a")
    assert ok.files  # complete: read to its end and kept (archives unpacked)
    out = tmp_path / "b"
    with pytest.raises(TlpipeError, match=f"{name} is cut short or damaged"):
        fetch.run(mine((f"{cut}/{name}",)), out)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_tar_cut_at_a_member_boundary_is_caught(serve, tmp_path: Path) -> None:
    """tarfile reads such a file without complaint: the missing end-of-archive block tells."""
    body = _files(tmp_path)["d.tar"]
    with tarfile.open(fileobj=io.BytesIO(body)) as t:
        boundary = t.getmembers()[-1].offset
    url = serve(_no_length({"d.tar": body[:boundary]}))
    with pytest.raises(TlpipeError, match="d.tar is cut short or damaged.*end-of-archive"):
        fetch.run(mine((f"{url}/d.tar",)), tmp_path / "r")


def test_an_uncheckable_download_needs_a_length_or_a_checksum(serve, tmp_path: Path) -> None:
    body = b"path,label\na.png,cat\n"
    url = serve(_no_length({"labels.csv": body})) + "/labels.csv"
    with pytest.raises(TlpipeError, match="labels.csv cannot be checked for completeness: set"):
        fetch.run(mine((url,)), tmp_path / "r")
    digest = hashlib.sha256(body).hexdigest()
    fetch.run(mine((url,), sha256=digest), tmp_path / "r")
    assert (tmp_path / "r" / "target" / "labels.csv").read_bytes() == body


def test_a_short_content_length_is_caught(serve, tmp_path: Path) -> None:
    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "1000")
        request.end_headers()
        request.wfile.write(b"x" * 400)

    url = serve(handle) + "/data.bin"
    with pytest.raises(TlpipeError, match="broke off at 400/1000 bytes"):
        fetch.run(mine((url,)), tmp_path / "r")


def _trickle(where: str):
    """Send one byte every 50 ms, in the body or in the headers: never idle for `timeout`."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        if where == "body":
            request.send_response(200)
            request.send_header("Content-Length", "100000")
            request.end_headers()
        else:
            request.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(100_000):  # ends when the client hangs up
            request.wfile.write(b"a")
            request.wfile.flush()
            time.sleep(0.05)

    return handle


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_server_hits_the_deadline(serve, tmp_path: Path, where: str) -> None:
    url = serve(_trickle(where)) + "/slow.zip"
    cfg = mine((url,), timeout=30, deadline=0.5)
    with pytest.raises(TlpipeError, match=r"slow.zip took over fetch.deadline = 0.5 s"):
        fetch.run(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(TlpipeError, match="deadline must be > 0"):
        fetch.FetchConfig(deadline=0)


# ---------------------------------------------------------------------------- resume files


def _fit(prepared: Path, ckpt: Path):
    m, src = load_manifest(prepared), load_split(prepared, "source")
    cfg = TrainConfig(epochs=2, batch_size=32, steps_per_epoch=2, seed=0)
    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    res = fit(
        model,
        ArrayBatches(src.x, src.y, 32, steps_per_epoch=2),
        cfg,
        mean=m.mean,
        std=m.std,
        checkpoint=ckpt,
    )
    return res, model


def test_a_bit_flipped_resume_file_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ck.pt"
    first, _ = _fit(tiny_prepared, ckpt)
    assert _fit(tiny_prepared, ckpt)[0].resumed_from == 2  # intact: resumes
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the weights
    ckpt.write_bytes(bytes(data))
    with pytest.raises(TlpipeError, match="ck.pt fails its sha256 check.*delete it to start over"):
        _fit(tiny_prepared, ckpt)


class _Payload:
    """Unpickling this runs code (it touches `marker`): what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_resume_file_runs_no_code(tiny_prepared: Path, tmp_path: Path) -> None:
    from tlpipe.train.resume import _RESUME_MAGIC

    marker, ckpt = tmp_path / "pwned", tmp_path / "ck.pt"
    buf = io.BytesIO()
    torch.save({"desc": "train", "key": "", "epoch": 0, "x": _Payload(marker)}, buf)
    payload = buf.getvalue()  # a correct hash: the file could have been written by anyone
    ckpt.write_bytes(_RESUME_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(
        TlpipeError, match=r"ck.pt is refused \(it holds more than tensors.*delete it"
    ):
        _fit(tiny_prepared, ckpt)
    assert not marker.exists()


def test_an_unchecked_resume_file_is_not_loaded(tiny_prepared, tmp_path, capsys) -> None:
    """A plain torch.save file (an older tlpipe's, or anyone's) is never unpickled: start over."""
    marker, ckpt = tmp_path / "pwned", tmp_path / "ck.pt"
    torch.save({"desc": "train", "x": _Payload(marker)}, ckpt)
    res, model = _fit(tiny_prepared, ckpt)
    assert res.resumed_from == 0 and not marker.exists()
    assert "not a checked resume file" in capsys.readouterr().err
    again, model2 = _fit(tiny_prepared, tmp_path / "fresh.pt")
    for k, v in model.state_dict().items():  # the restart trained exactly like a fresh run
        torch.testing.assert_close(model2.state_dict()[k], v, msg=k)
