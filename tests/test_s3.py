"""fetch from S3-compatible storage (boto3) against a real S3 API server (moto, on 127.0.0.1)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import fetched, write_imagefolder

from tlpipe.data.manifest import load_manifest
from tlpipe.errors import TlpipeError
from tlpipe.params import fields, resolver
from tlpipe.steps import fetch, prepare


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A fresh bucket; the AWS settings in the environment, as a user would set them."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"data-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return client, name


def _spec(url: str, fmt: str = "imagefolder", **kw) -> fetch.FetchConfig:
    target = {"dataset": "pets", "format": fmt, "sources": [url], **kw}
    return fields.build(fetch.FetchConfig, {"source": None, "target": target})


def test_fetch_an_imagefolder_prefix_from_s3(bucket, tmp_path: Path) -> None:
    client, name = bucket
    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=4)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        client.upload_file(str(path), name, f"team/pets/{path.relative_to(folder).as_posix()}")
    result = fetch.run(_spec(f"s3://{name}/team/pets"), tmp_path / "raw")
    assert result.sources == {"target": f"s3://{name}/team/pets"}
    side = tmp_path / "raw/target"
    got = sorted(p.relative_to(side) for p in side.rglob("*") if p.is_file())
    assert got == [p.relative_to(folder) for p in files]
    cfg = resolver.resolve({"prepare": {"target": {"classes": []}, "input_size": 16}})["prepare"]
    prepare.run(tmp_path / "raw", tmp_path / "p", cfg)
    local = fetched(tmp_path / "raw2", folder, "imagefolder", None)
    prepare.run(local, tmp_path / "q", cfg)
    assert load_manifest(tmp_path / "p").splits == load_manifest(tmp_path / "q").splits


def test_fetch_one_archive_object_with_sha256(bucket, tmp_path: Path) -> None:
    import hashlib
    import shutil

    client, name = bucket
    folder = write_imagefolder(tmp_path / "pets", classes=("cat", "dog"), per_class=2)
    archive = shutil.make_archive(str(tmp_path / "pets"), "zip", folder)
    client.upload_file(archive, name, "pets.zip")
    digest = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
    fetch.run(_spec(f"s3://{name}/pets.zip", sha256=digest), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw/target").iterdir()) == ["test", "train"]
    with pytest.raises(TlpipeError, match="checksum mismatch"):
        fetch.run(_spec(f"s3://{name}/pets.zip", sha256="ab" * 32), tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def test_hostile_keys_and_missing_data(bucket, tmp_path: Path, s3_endpoint: str) -> None:
    client, name = bucket
    client.put_object(Bucket=name, Key="evil/train/cat/../../../../escape.png", Body=b"x")
    with pytest.raises(TlpipeError, match="would land outside the data folder: refused"):
        fetch.run(_spec(f"s3://{name}/evil"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not (tmp_path.parent / "escape.png").exists()
    with pytest.raises(TlpipeError, match=r"(?s)could not fetch.*no object there"):
        fetch.run(_spec(f"s3://{name}/nothing-here"), tmp_path / "raw")
    with pytest.raises(TlpipeError, match=r"(?s)could not fetch.*not found \(NoSuchBucket\)"):
        fetch.run(_spec("s3://no-such-bucket/x"), tmp_path / "raw")
