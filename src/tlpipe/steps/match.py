"""Step 3b: weight every source sample by how much it resembles the target domain.

Source and target images are embedded with the pretrained backbone, a matcher from
`tlpipe.match.matchers.MATCHERS` turns the embeddings into importance weights (mean 1), and the top
`top_fraction` is the selected subset. `finetune --strategy joint` co-trains on them.

The target side is `target_train` (+ `target_val` with `use_target_val`): images only, never
labels, and never `target_test`.

Embeddings (`features`): ``blocks`` (default) concatenates the per-channel mean and standard
deviation of every backbone stage's output; ``backbone`` is the final pooled feature vector
(`tlpipe.train.loop.embed`). A classifier's last layer is trained to ignore what a domain shift
changes (contrast, blur, …) — a source that already mixes both domains teaches it exactly that
— while the early stages' activation statistics keep it (the "style" of an image), so on
the mixed-source scenario ``blocks`` selects the shifted source images far more precisely than
``backbone`` (measured: benchmarks/README.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.data.manifest import Manifest
from tlpipe.errors import TlpipeError
from tlpipe.match import matchers
from tlpipe.params import MatchConfig
from tlpipe.params.fields import to_dict
from tlpipe.steps import StepResult


@dataclass(frozen=True)
class MatchResult(StepResult):
    """What match wrote: weights.npy, selected.npy, report.json (+ plots/) under out_dir."""

    out_dir: Path
    weights: Path
    selected: Path
    report: Path


def run(prepared_dir: Path, source_model: Path, out_dir: Path, cfg: MatchConfig) -> MatchResult:
    """Embed source and target with `source_model`, weight the source, write `out_dir`.

    Without a source dataset there is nothing to weight: `out_dir` then gets empty weights and
    a report saying matching was skipped (the pipeline's stage still has its outputs).
    """
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.train.models import load_checkpoint

    manifest = load_manifest(prepared_dir)
    if not manifest.has_source:
        return _skipped(Path(out_dir), manifest, cfg)
    source = load_split(prepared_dir, "source")
    target_splits = ["target_train", "target_val"] if cfg.use_target_val else ["target_train"]
    targets = [load_split(prepared_dir, s).x for s in target_splits]  # memory-mapped
    n_target = sum(len(x) for x in targets)
    if len(source) == 0:
        raise TlpipeError(f"{prepared_dir}: the source split is empty, nothing to match")
    if n_target == 0:
        raise TlpipeError(f"{prepared_dir}: no target images in {'/'.join(target_splits)}")
    model, meta = load_checkpoint(source_model)
    if tuple(source.x.shape[1:]) != meta.input_shape:
        raise TlpipeError(f"{source_model} was trained on other input shapes: re-run pretrain")

    t0 = time.perf_counter()
    mean, std = meta.mean, meta.std
    s_emb = embed_images(model, source.x, mean, std, cfg.features, cfg.batch_size)
    t_emb = np.concatenate(
        [embed_images(model, x, mean, std, cfg.features, cfg.batch_size) for x in targets if len(x)]
    )
    t1 = time.perf_counter()
    matcher = matchers.build_matcher(cfg.matcher, cfg)
    weights = matchers.fit_weights(matcher, s_emb, t_emb, source.y)
    selected = matchers.select_top(weights, cfg.top_fraction, cfg.seed)
    t2 = time.perf_counter()
    diagnostics = matcher.diagnostics or matchers.domain_diagnostics(s_emb, t_emb, source.y, cfg)
    timings = {
        "embedding_seconds": t1 - t0,
        "weighting_seconds": t2 - t1,
        "diagnostics_seconds": time.perf_counter() - t2,
    }
    shifted = source.shifted if source.shifted.any() else None
    report: dict[str, Any] = {
        "matcher": cfg.matcher,
        "features": cfg.features,
        "embedding_dim": int(s_emb.shape[1]),
        "n_target": n_target,
        "target_splits": target_splits,
        "top_fraction": cfg.top_fraction,
        **diagnostics,
        **matchers.summary(weights, source.y, list(manifest.source_classes), shifted, selected),
        "timings": timings,
        "dataset_sha256": manifest.dataset_sha256,
        "config": to_dict(cfg),
    }
    out_dir = Path(out_dir)
    _write(out_dir, weights, selected, report, source.x if cfg.plots else None, shifted)
    metrics = _metrics(report)
    return MatchResult(
        out_dir,
        out_dir / "weights.npy",
        out_dir / "selected.npy",
        out_dir / "report.json",
        metrics=metrics,
        artifacts=(out_dir,),
        summary=f"wrote {out_dir}: {cfg.matcher} weights, {metrics}",
    )


def _skipped(out_dir: Path, manifest: Manifest, cfg: MatchConfig) -> MatchResult:
    """The neutral output of a scenario without source data: no weights, a report saying so."""
    reason = "no source dataset (fetch.source: null): matching skipped"
    report = {
        "skipped": reason,
        "matcher": cfg.matcher,
        "n_source": 0,
        "n_selected": 0,
        "timings": {},
        "dataset_sha256": manifest.dataset_sha256,
        "config": to_dict(cfg),
    }
    _write(out_dir, np.zeros(0, np.float32), np.zeros(0, np.int64), report)
    return MatchResult(
        out_dir,
        out_dir / "weights.npy",
        out_dir / "selected.npy",
        out_dir / "report.json",
        artifacts=(out_dir,),
        summary=f"wrote {out_dir}: {reason}",
    )


def _write(
    out_dir: Path,
    weights: np.ndarray,
    selected: np.ndarray,
    report: dict[str, Any],
    source_x: np.ndarray | None = None,
    shifted: np.ndarray | None = None,
) -> None:
    """Write the outputs at once (a temp dir, renamed); plots of `source_x` when given."""
    from tlpipe.fsio import atomic_path, write_json

    with atomic_path(out_dir) as tmp:
        (tmp / "plots").mkdir(parents=True)
        np.save(tmp / "weights.npy", weights)
        np.save(tmp / "selected.npy", selected)
        write_json(tmp / "report.json", report)
        if source_x is not None:
            plot_histogram(tmp / "plots" / "weights_hist.png", weights, shifted)
            plot_extremes(tmp / "plots" / "extremes.png", source_x, weights)


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    keys = (
        "ess_fraction",
        "discriminator_accuracy",
        "proxy_a_distance",
        "selection_precision",
        "shifted_auroc",
        "n_selected",
    )
    out = {k: float(report[k]) for k in keys if k in report}
    return out | {k: round(v, 3) for k, v in report["timings"].items()}


def embed_images(
    model, x: np.ndarray, mean, std, features: str = "blocks", batch_size: int = 512
) -> np.ndarray:
    """Embeddings of uint8 images (no grad, batched): see the module docstring for `features`."""
    import torch

    from tlpipe.data.prepared import chunks, read_rows
    from tlpipe.train.loop import embed, resolve_device, to_input

    if features == "backbone":
        return embed(model, x, mean, std, batch_size)
    device = resolve_device("auto")
    model.eval().to(device)
    outs = []
    with torch.no_grad():
        for start, stop in chunks(x, chunk_bytes=max(1, x[:1].nbytes) * batch_size):
            h = to_input(torch.from_numpy(read_rows(x, start, stop)).to(device), mean, std)
            stats = []
            for block in model.blocks():
                h = block(h)
                var, mu = torch.var_mean(h.float().flatten(2), dim=2)
                stats += [mu, var.clamp_min(0).sqrt()]
            outs.append(torch.cat(stats, 1).cpu().numpy())
    if not outs:
        raise TlpipeError("no images to embed")
    return np.concatenate(outs)


def plot_histogram(path: Path, weights: np.ndarray, shifted: np.ndarray | None) -> None:
    """Weight histogram on a log x axis, split into shifted / clean when that is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.geomspace(max(float(weights.min()), 1e-4), max(float(weights.max()), 1.01), 40)
    if shifted is None:
        ax.hist(weights, bins=bins, color="tab:blue")
    else:
        ax.hist(
            [weights[shifted], weights[~shifted]],
            bins=bins,
            stacked=True,
            label=["shifted (target-like)", "clean"],
            color=["tab:orange", "tab:blue"],
        )
        ax.legend()
    ax.set(
        xscale="log",
        xlabel="importance weight (mean 1)",
        ylabel="source samples",
        title="match: source sample weights",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_extremes(path: Path, x: np.ndarray, weights: np.ndarray, n: int = 10) -> None:
    """Two rows of source images: the most target-like (top) and the least (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tlpipe.data.prepared import take_rows

    n = min(n, len(weights))
    order = np.argsort(-weights, kind="stable")
    rows = (("most target-like", order[:n]), ("least target-like", order[::-1][:n]))
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.6), squeeze=False)
    for r, (label, idx) in enumerate(rows):
        for c, (i, image) in enumerate(zip(idx, take_rows(x, idx), strict=True)):
            img = image.transpose(1, 2, 0)
            axes[r, c].imshow(
                img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255
            )
            axes[r, c].set_title(f"{weights[i]:.2g}", fontsize=7)
            axes[r, c].axis("off")
        axes[r, 0].text(
            -0.1, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
