"""The TrainJob's node side (`tlpipe.kfp.trainjob.node`) as the Kubeflow SDK runs it: the
function's source plus its call in a script that torchrun starts on 2 processes, inputs and
outputs through a real S3 API server (moto). No cluster: the submitting side needs one (or the
SDK's container backend)."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlpipe.data import s3
from tlpipe.kfp import trainjob
from tlpipe.params.fields import to_dict
from tlpipe.params.resolver import resolve

PREFIX = "tlpipe-pretrain-test"


@pytest.fixture
def staging(monkeypatch: pytest.MonkeyPatch):
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="jobs")
    yield f"s3://jobs/{PREFIX}", boto3.client("s3")
    server.stop()


@pytest.mark.slow
def test_two_nodes_train_from_s3_and_rank_0_alone_uploads(
    tiny_prepared: Path, tmp_path: Path, staging
) -> None:
    url, client = staging
    s3.upload(tiny_prepared, f"{url}/in/prepared_dir")
    cfg = resolve({}, ["pretrain.train.epochs=2", "pretrain.train.batch_size=32"])["pretrain"]
    spec = {
        "step": "pretrain",
        "params_json": json.dumps(to_dict(cfg)),
        "strategy": None,
        "staging": url,
        "inputs": {"prepared_dir": True},
    }
    # what the SDK's CustomTrainer ships: the function's source, then the call
    call = f"tlpipe_node(**{ {'spec': trainjob.encode_spec(spec)}!r})"
    script = f"{inspect.getsource(trainjob.tlpipe_node)}\n{call}\n"
    (tmp_path / "trainjob.py").write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "trainjob.py",
    ]
    env = {**os.environ, "TLPIPE_NO_TRACK": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "rank 0/2 trains" in out and "rank 1/2 trains" in out
    assert "tlpipe node: rank 1/2 done, wrote nothing" in out
    assert out.count("uploaded") == 1
    listed = client.list_objects_v2(Bucket="jobs", Prefix=f"{PREFIX}/out/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    assert keys == [f"{PREFIX}/out/model.pt", f"{PREFIX}/out/result.json"]
    s3.download_object(f"{url}/out/result.json", tmp_path / "result.json", 60, 600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and 0 <= result["metrics"]["source_val_accuracy"] <= 1
    s3.download_object(f"{url}/out/model.pt", tmp_path / "model.pt", 60, 600)
    meta = torch.load(tmp_path / "model.pt", weights_only=True)["meta"]
    assert meta["arch"] == "small_cnn" and len(meta["history"]) == 2
