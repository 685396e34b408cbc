"""The retraining loop (issue 12), end to end, against a real `mlflow server` on 127.0.0.1.

A git + DVC project in a temp dir runs the repository's dvc.yaml through `tlpipe run`, on the
preset scenarios/fashion-to-digits.yaml with tiny epochs and a tiny synthetic IDX source in
place of Fashion-MNIST. The target is scikit-learn's real handwritten digits, written as an
ImageFolder by benchmarks/digits_imagefolder.py, and it grows between runs:

1. run 1 on the first digits: v1 champion; `tlpipe-edge pull` installs it and it classifies
   the digit PNGs;
2. more labelled digits arrive: run 2 re-runs the stages that depend on the target data, no
   image already there changes split, v1 and v2 are scored on the same new test images and
   v2 becomes champion with the paired comparison in its tags; pull swaps the device to v2,
   rollback returns it to v1;
3. two `tlpipe run` at once on unchanged data: one is a quick no-op (exit 0, nothing trained
   or registered), the other says in one line that a run holds the lock and exits 1;
4. `tlpipe register` SIGKILLed between creating its version and gating it: v3 stays `pending`,
   and the champion does not move;
5. a batch with a labelling mistake (ones filed as sevens) arrives: run 4's model wins on
   average on the new test images but loses class '1', so v4 stays challenger with the
   reason in its tags; its register gates the orphan v3 (not promoted). The device, rolled
   back, keeps serving v1.

The data decides the outcomes, not luck: v1 learns from a tenth of the digits and v2 from
half; the mislabelled batch is three shifted copies of every '1', filed under '7'.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shlex
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from projects import benchmark, dvc_project, merge, project_env, start_run, synthetic

from tlpipe import edge
from tlpipe.data.prepared import load_split
from tlpipe.edge.store import ModelStore
from tlpipe.release.paired import Paired

REPO = Path(__file__).resolve().parents[1]
TARGET_SPLITS = ("target_train", "target_val", "target_test")
FIRST, GROWN = 180, 900  # digits in the target folder at run 1, and from run 2 on
# The stages new target images re-run: all but pretrain, which reads only the source splits
# (fetch and check run every time).
RETRAINED = {
    "fetch",
    "prepare",
    "check",
    "match",
    "baseline",
    "finetune@full",
    "evaluate",
    "export",
    "register",
}

# The preset, made tiny: a synthetic IDX dataset (`projects.synthetic`) as the source, short
# training at 16 px, one transfer strategy next to the scratch baseline, and a low accuracy
# floor (v1 learns from 180 images).
TINY = {
    "prepare": {"source": {"max_per_class": 30}, "input_size": 16},
    "pretrain": {"train": {"epochs": 1, "batch_size": 64, "augment": False}},
    "match": {"plots": False},
    "finetune": {
        "train": {"epochs": 6, "batch_size": 32, "steps_per_epoch": 0, "augment": False},
        "probe": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 0},
        # the cross-validated selection runs (val < 100) with a third of the epochs per fit
        "selection": {"epoch_fraction": 0.34},
    },
    "export": {"calibration_images": 32},
    "register": {"accuracy_floor": 0.2},
    "strategies": ["full"],
}


digits = benchmark("digits_imagefolder")


@pytest.fixture
def project(tmp_path: Path, mlflow_server: str) -> tuple[Path, dict[str, str], str]:
    """(project dir, environment for its commands, registered model name)."""
    name = f"loop-{uuid.uuid4().hex[:8]}"
    params = merge(yaml.safe_load((REPO / "scenarios/fashion-to-digits.yaml").read_text()), TINY)
    source = synthetic(tmp_path)["fetch"]["source"]
    work = dvc_project(
        tmp_path, merge(params, {"fetch": {"source": source}, "register": {"model_name": name}})
    )
    # One torch thread per stage: with two on two cores that other processes share, each
    # training step of this tiny CNN waits on the other thread (measured 45x slower).
    return work, project_env(mlflow_server, OMP_NUM_THREADS="1"), name


# Five `tlpipe run`s of 9 stages, ~3 min on 2 cores (each stage imports torch and MLflow):
# `make test-slow`, which CI runs. The default suite runs every step through the compiled DAG
# (test_kfp) and `tlpipe run` under SIGTERM (test_runner).
@pytest.mark.slow
def test_the_retraining_loop(project, mlflow_server, tmp_path, capsys) -> None:
    import mlflow

    work, env, name = project
    client = mlflow.MlflowClient(mlflow_server)
    device = tmp_path / "device"
    pull = ["pull", "--model-dir", str(device), "--name", name, "--tracking-uri", mlflow_server]
    target = work / "data/digits"

    # 1) the first digits → v1 champion, on the device, reading the digits' own PNGs
    digits.write_digits(target, range(FIRST))
    _run(work, env)
    assert _decision(work) == ("1", "champion")
    before = _identities(work / "data/prepared")
    assert edge.main(pull) == 0 and _serving(device) == "1"
    capsys.readouterr()
    pngs = sorted(target.glob("*/*.png"))[::9]
    assert edge.main(["predict", "--model-dir", str(device), *map(str, pngs)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    right = sum(Path(path).parent.name == label for path, label, _ in rows)
    assert len(rows) == len(pngs) and right > 0.6 * len(rows), rows

    # 2) more labelled digits → run 2 retrains on them; v2 beats v1 on the same new test images
    digits.write_digits(target, range(GROWN))
    ran, log = _run(work, env)
    assert ran == RETRAINED, ran
    after = _identities(work / "data/prepared")
    # no training image moved; val/test lose only a small class's promoted image, which goes
    # back to training once the class has one of its own there (docs/data.md)
    assert before["target_train"] <= after["target_train"]
    for split in ("target_val", "target_test"):
        left = before[split] - after[split]
        assert left <= after["target_train"] | after["target_val"], split
        assert len(left) <= 10, split  # at most one per class
    assert sum(map(len, after.values())) == GROWN
    assert _decision(work) == ("2", "champion") and "registered v2 → champion" in log
    comparison = Paired.from_tags(_tags(client, name, "2"))
    assert comparison.champion == "1" and comparison.n == len(after["target_test"])
    assert comparison.n > len(before["target_test"])  # the new test images are in it
    assert comparison.gain > 0 and comparison.p_value < 0.05, comparison
    assert "McNemar p" in _tags(client, name, "2")["gate_reason"]

    assert edge.main(pull) == 0 and _serving(device) == "2"
    assert edge.main(["rollback", "--model-dir", str(device)]) == 0 and _serving(device) == "1"

    # 3) a scheduled run on unchanged data, started twice at once: one no-op, one refusal
    both = [start_run(work, env) for _ in range(2)]
    outs = sorted(_finish(p) for p in both)
    assert [code for code, _, _ in outs] == [0, 1], outs
    (_, no_op, log), (_, _, refused) = outs
    assert "another `tlpipe run` is running in this project" in refused
    assert refused.strip().count("\n") == 0, refused
    assert "nothing retrained" in log and _stages(no_op) == {"fetch", "check"}, no_op
    assert sorted(_versions(client, name)) == ["1", "2"]

    # 4) a register killed between creating its version and gating it leaves v3 pending
    orphan = _killed_register(work, env, mlflow_server)
    assert orphan == "3" and _tags(client, name, "3")["gate_decision"] == "pending"
    assert "gate_reason" not in _tags(client, name, "3")
    assert _champion(client, name) == "2"

    # 5) a batch with a labelling mistake: better on average on the new test images, but
    # class '1' is lost → challenger; and v4's register gates the orphan, which stays out
    _mislabelled_ones(target)
    _run(work, env)
    assert _decision(work) == ("4", "challenger")
    reason = _tags(client, name, "4")["gate_reason"]
    assert "wins on average" in reason and "recall of class '1' drops" in reason, reason
    late = _tags(client, name, "3")
    assert late["gate_decision"] == "challenger", late
    assert late["gate_reason"].endswith("(gated by v4's register)"), late
    assert _champion(client, name) == "2"
    assert edge.main(pull) == 0 and _serving(device) == "1"  # rolled back: stays on v1


# ---------------------------------------------------------------------------- helpers


def _run(work: Path, env: dict[str, str]) -> tuple[set[str], str]:
    """`tlpipe run` in `work`; returns (the stages DVC ran, the run's log on stderr)."""
    res = subprocess.run(
        [sys.executable, "-m", "tlpipe.cli", "run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return _stages(res.stdout), res.stderr


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a `_popen_run`, once it has ended."""
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _stages(stdout: str) -> set[str]:
    """The stages `dvc repro` ran (its "Running stage 'name':" lines)."""
    return {line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")}


def _decision(work: Path) -> tuple[str, str]:
    """(version, alias) of the last register, from registry.json."""
    d = json.loads((work / "registry.json").read_text())
    return d["version"], d["alias"]


def _identities(prepared: Path) -> dict[str, set[bytes]]:
    """Each target split's images, by the content keys prepare writes (`<split>.id.npy`)."""
    found = {}
    for split in TARGET_SPLITS:
        ids = load_split(prepared, split).ids
        assert ids is not None, f"{prepared}: prepare wrote no content keys for {split}"
        found[split] = set(ids.tolist())
    return found


def _versions(client, name: str) -> dict[str, dict[str, str]]:
    return {v.version: v.tags for v in client.search_model_versions(f"name = '{name}'")}


def _tags(client, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def _champion(client, name: str) -> str:
    return client.get_model_version_by_alias(name, "champion").version


def _serving(device: Path) -> str:
    """The registry version the device's model directory serves."""
    return ModelStore(device).current().version


def _mislabelled_ones(target: Path) -> None:
    """A labelling mistake: three shifted copies of every '1' of the digits, filed under 7/."""
    images, labels = digits.load()
    for i in np.flatnonzero(labels == 1):
        for dy, dx in ((0, 1), (1, 0), (1, 1)):
            shifted = np.roll(images[i], (dy, dx), axis=(0, 1))
            (target / "7" / f"one-{i:04d}-{dy}{dx}.png").write_bytes(digits.png_bytes(shifted))


def _killed_register(work: Path, env: dict[str, str], server: str) -> str:
    """Run the register stage's own command in `work`, SIGKILLed at its first request after
    creating its model version; returns that version."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["register"]["cmd"]
    argv = shlex.split(cmd.replace("registry.json", "killed.json"))
    with _killing_proxy(server) as (proxy, victim):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlpipe.cli", *argv[1:]],
            cwd=work,
            env={**env, "MLFLOW_TRACKING_URI": proxy},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        victim.append(proc)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-3000:]  # SIGKILLed, not failed
    assert not (work / "killed.json").exists()
    return victim[1]


@contextlib.contextmanager
def _killing_proxy(upstream: str) -> Iterator[tuple[str, list]]:
    """An HTTP proxy to `upstream` that SIGKILLs `victim[0]` (a Popen the caller appends) at
    its first request after a model version was created, and appends that version."""
    victim: list = []
    created = threading.Event()

    class Forward(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            if created.is_set():  # the register's next call (its gate): killed right here
                victim[0].kill()
                self.send_error(503)
                return
            size = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(size) if size else None
            request = urllib.request.Request(upstream + self.path, body, method=self.command)
            for key, value in self.headers.items():
                if key.lower() not in ("host", "content-length", "connection"):
                    request.add_header(key, value)
            try:
                with urllib.request.urlopen(request, timeout=60) as reply:
                    status, body, ctype = reply.status, reply.read(), reply.headers["Content-Type"]
            except urllib.error.HTTPError as e:
                status, body, ctype = e.code, e.read(), e.headers["Content-Type"]
            if self.command == "POST" and self.path.endswith("/model-versions/create"):
                victim.append(json.loads(body)["model_version"]["version"])
                created.set()  # before the reply: the next request surely sees it
            self.send_response(status)
            self.send_header("Content-Type", ctype or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", victim
    finally:
        httpd.shutdown()
        httpd.server_close()
