"""End to end: the real DVC pipeline on a small real Fashion-MNIST scenario."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from projects import merge, start_run

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# Real training on real images, small enough for 1.5 min. Not a claim that transfer wins: with
# 5 labelled images a class drawn by content hash, lp_ft beat scratch by +1.2 pt on test here
# (2026-12-04; +10 to +21 before hash splits drew other images), inside one draw's noise.
# Whether the pipeline ships the right model is benchmarks/selection.py's question.
SMALL = {
    "prepare": {"source": {"max_per_class": 1000}, "target": {"max_test_per_class": 200}},
    "pretrain": {"train": {"epochs": 3, "batch_size": 64}},
    "strategies": ["lp_ft"],
    "finetune": {
        "train": {"epochs": 6},
        "probe": {"epochs": 4},
        "per_strategy": {"scratch": {"train": {"lr": 0.05, "epochs": 10}}},
    },
    "export": {"calibration_images": 100},
    "register": {"accuracy_floor": 0.3},  # this test is about the plumbing, not the accuracy
}


@pytest.mark.slow  # 1.5 min of real training; the DVC plumbing is also in test_retraining_loop
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_dvc_pipeline_on_real_fashion_mnist(tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", "src"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMALL)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
    }

    def sh(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    first = sh(sys.executable, "-m", "tlpipe.cli", "run")
    # 25 validation images (< finetune.selection.min_val): every model is also cross-validated
    assert "← selected (by CV)" in first.stdout and "extra fits" in first.stdout

    metrics = json.loads((work / "eval/metrics.json").read_text())
    accuracy = {name: m["accuracy"] for name, m in metrics["models"].items()}
    assert set(accuracy) == {"scratch", "lp_ft"} and min(accuracy.values()) > 0.5, accuracy
    # a transfer model ships only when its interval over scratch excludes 0, and then the one
    # with the higher CV estimate; otherwise (a tie, or no transfer ahead) scratch ships
    cv = {name: m["cv_accuracy"] for name, m in metrics["models"].items()}
    if metrics["transfer_helped"]:
        assert cv[metrics["selected"]] == max(cv.values()), metrics["verdict"]
    else:
        assert metrics["selected"] == "scratch", metrics["verdict"]
    assert metrics["transfer_helped"] == metrics["verdict"].startswith("transfer helped")
    assert not metrics["transfer_helped"] or metrics["selected"] != "scratch"
    assert (work / "eval/plots/confusion_scratch.png").exists()

    # a scheduled re-run on the same data: fetch runs (it checks the data), nothing else does;
    # two started together: one runs, the other says so in one line and exits non-zero
    both = [start_run(work, env) for _ in range(2)]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in both]
    assert sorted(code for code, _, _ in outs) == [0, 1], outs
    (_, again, log), (_, _, refused) = sorted(outs)
    assert "another `tlpipe run` is running in this project" in refused
    assert refused.strip().count("\n") == 0, refused
    assert "nothing retrained" in log and "← selected (by CV)" in again
    ran = {line.split("'")[1] for line in again.splitlines() if line.startswith("Running stage")}
    assert ran == {"fetch", "check"}, again  # the two that always run: nothing else

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tlpipe")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tlpipe.kind") == "pipeline"]
    parents.sort(key=lambda r: r.info.start_time)
    assert len(parents) == 2 and parents[1].data.tags["tlpipe.changed_stages"] == "check"
    children = {
        r.data.tags["tlpipe.step"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    steps = {
        "prepare",
        "check",
        "pretrain",
        "match",
        "finetune:scratch",
        "finetune:lp_ft",
        "evaluate",
    }
    assert steps | {"export", "register"} <= children
    registry = json.loads((work / "registry.json").read_text())
    assert registry["alias"] == "champion" and registry["promoted"]
