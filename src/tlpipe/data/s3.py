"""Read datasets from S3 or an S3-compatible store (MinIO, Ceph, moto) with boto3.

Credentials and the endpoint come from the environment, as for every AWS tool:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile), and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for a store that is not AWS. A source is ``s3://bucket/key`` (one
object: a file or an archive) or ``s3://bucket/prefix`` (every object under it, the folder
layout kept). Keys are untrusted: one that would land outside the destination (``..``, an
absolute path) is refused. Each object's size is checked after download, and the whole
transfer must finish within the fetch deadline.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tlpipe.data.download import Unreachable
from tlpipe.errors import TlpipeError


def _parse(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise TlpipeError(f"{url}: not an s3://bucket/key URL")
    return parts.netloc, parts.path.lstrip("/")


def _client(timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 3})
    return boto3.client("s3", config=config)


def _errors(url: str):
    """Turn boto errors into Unreachable (try the next source) or one-line TlpipeErrors."""
    from contextlib import contextmanager

    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    @contextmanager
    def guard():
        try:
            yield
        except NoCredentialsError as e:
            raise TlpipeError(
                f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_ENDPOINT_URL for MinIO)"
            ) from e
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
                raise Unreachable(f"not found ({code})") from e
            raise TlpipeError(f"{url}: S3 refused ({code or e})") from e
        except BotoCoreError as e:  # endpoint down, timeouts, DNS
            raise Unreachable(str(e)) from e

    return guard()


def is_prefix(url: str, timeout: float) -> bool:
    """True when `url` names objects under a prefix, False when it names one object."""
    bucket, key = _parse(url)
    client = _client(timeout)
    with _errors(url):
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return False
            except Exception as e:  # a 404 on head: maybe a prefix
                if "404" not in str(e) and "Not Found" not in str(e):
                    raise
        page = client.list_objects_v2(Bucket=bucket, Prefix=_prefix(key), MaxKeys=1)
    if not page.get("KeyCount"):
        raise Unreachable("no object there")
    return True


def _prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key else ""


def download_prefix(url: str, dest: Path, timeout: float, deadline: float) -> None:
    """Download every object under `url`'s prefix into the new folder `dest`."""
    bucket, key = _parse(url)
    prefix, client, start = _prefix(key), _client(timeout), time.monotonic()
    dest.mkdir()
    with _errors(url):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel.endswith("/"):  # a "folder" marker, no data
                    continue
                _get(
                    client,
                    bucket,
                    obj["Key"],
                    obj["Size"],
                    _inside(dest, rel, url),
                    start,
                    deadline,
                )


def download_object(url: str, target: Path, timeout: float, deadline: float) -> None:
    """Download the one object `url` to `target`."""
    bucket, key = _parse(url)
    client = _client(timeout)
    with _errors(url):
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        _get(client, bucket, key, size, target, time.monotonic(), deadline)


def _inside(dest: Path, rel: str, url: str) -> Path:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts:
        raise TlpipeError(f"{url}: object key {rel!r} would land outside the data folder: refused")
    return dest.joinpath(*path.parts)


def _get(
    client: Any, bucket: str, key: str, size: int, target: Path, start: float, deadline: float
) -> None:
    def progress(_n: int) -> None:
        if time.monotonic() - start > deadline:
            raise TlpipeError(
                f"s3://{bucket}/{key}: download took over fetch.deadline = "
                f"{deadline:.0f} s; raise it for slow links"
            )

    target.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(bucket, key, str(target), Callback=progress)
    progress(0)
    got = target.stat().st_size
    if got != size:
        raise TlpipeError(f"s3://{bucket}/{key}: got {got} bytes of {size}: incomplete download")


def upload(source: Path, url: str, timeout: float = 60) -> None:
    """Upload a file to the object `url`, or a folder's files under the prefix `url`."""
    bucket, key = _parse(url)
    client, source = _client(timeout), Path(source)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    with _errors(url):
        for path in files:
            name = key if path == source else f"{_prefix(key)}{path.relative_to(source).as_posix()}"
            client.upload_file(str(path), bucket, name)
    if not files:
        raise TlpipeError(f"{source}: nothing to upload")
