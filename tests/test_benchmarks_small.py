"""benchmarks/digits_imagefolder.py (the digits ImageFolder: exact, deterministic, growing),
benchmarks/selection.py's scenarios and summaries, benchmarks/transferability.py's estimators,
and smoke runs of the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from projects import benchmark

from tlpipe.errors import TlpipeError
from tlpipe.fsio import read_json

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


digits = benchmark("digits_imagefolder")


def test_pixels_are_the_digits_scaled_exactly() -> None:
    from sklearn.datasets import load_digits

    levels = load_digits().images
    images, labels = digits.load()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(labels, load_digits().target)
    assert sorted(np.unique(images).tolist()) == [(255 * v + 8) // 16 for v in range(17)]
    assert np.array_equal(np.round(images / 255 * 16), levels)  # invertible: one level each


def test_written_once_then_grown_without_touching_a_file(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    first = digits.write_digits(out, range(30))
    assert len(first) == 30 and sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    images, labels = digits.load()
    png = out / str(labels[7]) / "0007.png"
    assert png in first and np.array_equal(np.asarray(Image.open(png)), images[7])
    old = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first}

    grown = digits.write_digits(out, range(50))  # 20 more arrive: added, none rewritten
    assert len(grown) == 20 and all(int(p.stem) >= 30 for p in grown)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first} == old
    assert digits.write_digits(out, range(50)) == []  # idempotent
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temp folder left

    again = tmp_path / "again"  # deterministic: the same files, byte for byte
    digits.write_digits(again, [49, 7, 7])
    assert (again / png.relative_to(out)).read_bytes() == png.read_bytes()

    png.write_bytes(b"someone else's file")
    with pytest.raises(TlpipeError, match="exists with other content"):
        digits.write_digits(out, range(10))


def test_command_line(tmp_path: Path, capsys) -> None:
    assert digits.main([str(tmp_path / "d"), "--first", "12"]) == 0
    assert capsys.readouterr().out.strip().endswith("wrote 12 PNGs, 12 digits in the folder")
    assert digits.main([str(tmp_path / "d")]) == 0
    assert "wrote 1785 PNGs, 1797 digits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        digits.main(["--help"])
    assert e.value.code == 0 and "(255 * v + 8) // 16" in capsys.readouterr().out


def test_tinted_digits_are_the_grey_ones_in_a_fixed_colour(tmp_path: Path) -> None:
    images, labels = digits.load()
    colours = digits.tints()
    assert colours.shape == (1797, 3) and colours.min() >= 0.4 and colours.max() < 1.0
    assert np.array_equal(colours, digits.tints())  # the same colours every run
    digits.write_digits(tmp_path / "rgb", [3, 9], tint=True)
    png = Image.open(tmp_path / "rgb" / str(labels[9]) / "0009.png")
    assert png.mode == "RGB"
    want = np.clip(images[9][..., None] * colours[9], 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(png), want)
    assert (np.asarray(png)[images[9] == 0] == 0).all()  # the background stays black


selection = benchmark("selection")
transferability = benchmark("transferability")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_every_selection_scenario_resolves_on_the_data_it_writes(tmp_path: Path) -> None:
    from tlpipe.data.readers import read_idx
    from tlpipe.params.resolver import resolve

    for name in selection.SCENARIOS:
        for budget in ("reduced", "full"):
            resolved = resolve(selection.scenario_params(name, budget, tmp_path))
            for side in ("source", "target"):
                for src in getattr(resolved["fetch"], side).sources:
                    if not src.startswith("/usr/share"):
                        assert Path(src).is_absolute() and Path(src).is_dir(), (name, src)
    tinted = resolve(selection.scenario_params("tinted-digits-resnet18", "reduced", tmp_path))
    assert tinted["pretrain"].model == "resnet18" and tinted["prepare"].input_size == 64
    assert tinted["prepare"].source.max_per_class == 300  # the scenario's own reduction
    full = resolve(selection.scenario_params("tinted-digits-resnet18", "full", tmp_path))
    assert full["prepare"].source.max_per_class == 3000  # ... only under the reduced budget
    pngs = tmp_path / "fashion-pngs"
    assert len(list(pngs.glob("train/*/*.png"))) == 3000
    assert len(list(pngs.glob("test/*/*.png"))) == 5000
    x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    first = sorted((pngs / "test" / "Ankle boot").iterdir())[0]
    assert np.array_equal(np.asarray(Image.open(first)), x[int(first.stem)])


def _metrics(logme: dict[str, float], acc: dict[str, float], selected: str) -> dict:
    models = {n: {"logme": logme[n], "accuracy": acc[n], "arch": "small_cnn"} for n in logme}
    seconds = {n: 10.0 for n in logme}
    return {
        "models": models,
        "baseline": "scratch",
        "selected": selected,
        "extra_fits": 9,
        "seconds": seconds,
    }


def test_selection_summaries_of_a_run() -> None:
    m = _metrics(
        {"scratch": -0.5, "linear_probe": -0.6, "full": -0.6},
        {"scratch": 0.80, "linear_probe": 0.70, "full": 0.84},
        "scratch",
    )
    assert selection.transfer_gaps(m) == pytest.approx((-0.1, 0.04))
    fits, secs, lost = selection.skip_savings(m)  # both transfer models: 1 + 3 CV fits each
    assert (fits, secs) == (8, 20.0) and lost == pytest.approx(4.0)
    assert selection.run_tau(m) == pytest.approx(0.0)  # one pair agrees, one does not
    assert selection.outcome(m) == pytest.approx((4.0, 0.0))  # full was 4 pt better on test
    m2 = m | {"selected": "linear_probe"}
    assert selection.outcome(m2) == pytest.approx((14.0, -10.0))
    rows = [{"baseline": selection.outcome(m), "best": selection.outcome(m2)}]
    assert selection.last_line(rows, "best") == (
        "selection regret mean = 14.00 pt; shipped below scratch by > 1 pt in 1 of 1 runs"
    )
    m["models"]["full"]["logme"] = m["models"]["linear_probe"]["logme"] = -0.4
    assert selection.skip_savings(m)[:2] == (0, 0.0)
    # the probe counterfactual: the probe's estimate (CV, else validation) below scratch's
    # skips the other transfer strategies (full), never the probe itself
    for n, cv in {"scratch": 0.8, "linear_probe": 0.6, "full": 0.9}.items():
        m["models"][n]["cv_accuracy"] = cv
    assert selection.skipped_by(m, "probe") == ["full"]
    fits, secs, lost = selection.skip_savings(m, "probe")
    assert (fits, secs) == (4, 10.0) and lost == pytest.approx(4.0)  # full: 4 pt over scratch
    m["models"]["linear_probe"]["cv_accuracy"] = 0.8
    assert selection.skipped_by(m, "probe") == []


def run_quick(script: str, work: Path, *more: str) -> subprocess.CompletedProcess:
    """`benchmarks/<script>.py --quick` in a subprocess, as a user runs it; it must succeed."""
    cmd = [sys.executable, str(REPO / f"benchmarks/{script}.py"), "--quick", "--work", str(work)]
    cmd += more
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two threads on two shared cores crawl
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_transferability_estimators_on_features_of_known_quality() -> None:
    """benchmarks/transferability.py's estimators: clustered features beat noise of the same
    scale; LEEP of perfect soft labels is log 1, of uniform ones log 1/C; NLEEP does not
    depend on the features' scale (a random init's are ~1e-4); the vectorised leave-one-out
    nearest class mean is the plain loop."""
    t = transferability
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 10)
    clustered = rng.normal(size=(5, 16))[y] + 0.5 * rng.normal(size=(50, 16))
    noise = rng.normal(size=(50, 16)) * clustered.std()
    for score in (t.logme, t.nleep, t.h_score, t.loo_knn, t.loo_ncm):
        assert score(clustered, y) > score(noise, y) + 0.05, score.__name__
    assert t.leep(np.eye(5)[y], y) == pytest.approx(0.0, abs=1e-9)
    assert t.leep(np.full((50, 5), 0.2), y) == pytest.approx(np.log(0.2))
    assert t.nleep(clustered * 1e-4, y) == pytest.approx(t.nleep(clustered, y), abs=0.02)

    u = clustered / np.linalg.norm(clustered, axis=1, keepdims=True)
    right = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        means = np.stack([u[rest & (y == c)].mean(0) for c in range(5)])
        right += int((means @ u[i]).argmax() == y[i])
    assert t.loo_ncm(clustered, y) == right / len(y)


@pytest.mark.slow  # ~40 s: the default suite keeps under 10 min on 2 cores
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_two_datasets_benchmark_quick(tmp_path: Path) -> None:
    done = run_quick("two_datasets", tmp_path)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table[1:]] == [
        "| scratch",
        "| linear_probe",
        "| joint",
        "| selected by val (ships)",
    ]
    assert table[0] == "| model | k = 10 | all labels |"
    last = done.stdout.splitlines()[-1]
    assert last.startswith("gain over scratch (points) — k = 10: best transfer "), last


@pytest.mark.slow  # about 30 s of real training; the selection logic has fast tests
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_selection_benchmark_quick(tmp_path: Path) -> None:
    done = run_quick("selection", tmp_path)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| default | 0 |")]
    assert len(rows) == 1 and "Kendall τ(LogME" in done.stdout
    last = done.stdout.splitlines()[-1]
    assert last.startswith("selection regret mean = ") and last.endswith(" of 1 runs"), last


@pytest.mark.slow  # about a minute of real training
@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_transferability_benchmark_quick(tmp_path: Path) -> None:
    from tlpipe.data.manifest import load_manifest

    run_quick("selection", tmp_path)  # a selection run in the folder: the across-runs reading
    done = run_quick("transferability", tmp_path)
    lines = done.stdout.splitlines()
    assert "| target | seed | start | LogME | LEEP | NLEEP | H-score | kNN | NCM | " in lines[1]
    rows = [line for line in lines if line.startswith("| default | 0 |")]
    assert [row.split(" | ")[2] for row in rows] == ["fashion-0-4", "fashion-0-1", "random-init"]
    assert rows[2].endswith(" | – | " + rows[2].split(" | ")[-1])  # random init has no probe
    assert all(len(row.split(" | ")) == 12 for row in rows)  # 7 scores + 2 accuracies
    taus = [line for line in lines if line.startswith("| default | full | ")]
    assert len(taus) == 1 and len(taus[0].split(" | ")) == 9  # one τ per estimator
    assert f"Across the 1 runs of benchmarks/selection.py under {tmp_path}:" in lines
    across = [line for line in lines if line.endswith(" of 1 |")]
    assert [row.split(" | ")[0] for row in across] == [f"| {e}" for e in transferability.ESTIMATORS]
    assert (tmp_path / "default/eval-s0/estimators.json").is_file()
    # a start that changes the source classes pretrains on its own prepared source
    own = load_manifest(tmp_path / "default/prep-source-fashion-0-1")
    assert own.source_classes == ("T-shirt/top", "Trouser")
    assert len(load_manifest(tmp_path / "default/prep-source").source_classes) == 5

    again = run_quick("transferability", tmp_path, "--reseed", "1").stdout.splitlines()
    assert [line for line in again if line.startswith("| default | 0 |")] == rows  # cached
    taus = [line for line in again if line.startswith("| default | full | ")]
    assert len(taus) == 1 and len(taus[0].split(" | ")) == 10  # … and the reseeded ceiling
    assert (tmp_path / "zoo/default-s0/results-reseed1.json").is_file()
    assert (tmp_path / "zoo/default-s0/fashion-0-4-full-reseed1.pt").is_file()

    # the two probe solvers side by side, on the same sources and draw
    solver = run_quick("probe_solver", tmp_path).stdout.splitlines()
    assert [line.split(" | ")[:3] for line in solver[2:4]] == [
        ["| default", "linear_probe", "2"],  # 1 draw × 2 starts
        ["| default", "lp_ft", "2"],
    ]
    results = read_json(tmp_path / "probe-solver/results.json")
    assert sorted({k.split("|")[-1] for k in results}) == ["lbfgs", "sgd"] and len(results) == 8


def test_decode_benchmark_runs_and_prints_its_ratio(tmp_path: Path) -> None:
    """benchmarks/decode.py --quick: the table and its last line (the ratio, no timing assert)."""
    out = run_quick("decode", tmp_path).stdout.splitlines()
    assert out[0].startswith("| photo | output px |") and len(out) == 5, out
    assert out[-1].startswith("JPEG decode speed-up, 0.3 MP photo to 224 px (--quick): ")
