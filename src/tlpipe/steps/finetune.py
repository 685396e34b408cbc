"""Step 4: adapt the source model to the target classes (or train the scratch baseline).

A strategy is a function `(model, source_state, cfg) -> list[Phase]`: which parameters train,
at which learning-rate scale, for how long, with which penalty. They all run through the one
loop in `tlpipe.train.loop`, but for the linear probe's head, solved on the fixed features by
default (`tlpipe.train.probe`); `lp_ft` is simply two phases. `joint` is `full` plus a stream of
match-weighted source batches through a second head (`tlpipe.train.joint`); `specialist` first
continues training on the matched source alone, then runs `full`. Model selection uses the
target *validation* split only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tlpipe.data.manifest import Manifest
from tlpipe.data.prepared import Labelled, stratified_folds
from tlpipe.errors import TlpipeError
from tlpipe.params import FinetuneConfig
from tlpipe.params.learning import check_source_strategies
from tlpipe.steps import TrainResult
from tlpipe.train import joint
from tlpipe.train.checkpoint import CheckpointMeta
from tlpipe.train.loop import ArrayBatches, TrainConfig


@dataclass
class Phase:
    """One call of the training loop."""

    name: str
    groups: list[dict[str, Any]]
    train: TrainConfig
    penalty: Callable[[], torch.Tensor] | None = None
    # Source batches (joint, specialist): (target batches, prepared_dir, match_dir) →
    # (batches, loss)
    source_stream: Callable[..., tuple[Any, Callable]] | None = None
    validate: bool = True  # False: target-val accuracy means nothing yet (a source-only phase)
    solved: bool = False  # the head is solved on fixed features (`tlpipe.train.probe`), not trained


def _trainable(groups: list[dict[str, Any]], model: nn.Module) -> list[dict[str, Any]]:
    """Freeze everything, then unfreeze exactly the parameters in `groups`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def head_phase(model, cfg: FinetuneConfig, name: str = "probe") -> Phase:
    """Fixed feature extractor: only the new head learns (solved, or trained: `probe_solver`)."""
    groups = _trainable([{"params": list(model.head.parameters())}], model)
    return Phase(name, groups, cfg.probe, solved=cfg.probe_solver == "lbfgs")


def blocks_phase(model, cfg: FinetuneConfig, n_blocks: int | None, name: str, source_state=None):
    """Head + the last `n_blocks` backbone blocks (None = all), with discriminative LRs."""
    blocks = model.blocks()
    n = len(blocks) if n_blocks is None else n_blocks
    if not 1 <= n <= len(blocks):
        raise TlpipeError(f"partial_blocks must be in 1..{len(blocks)}, got {n}")
    groups = [{"params": list(model.head.parameters()), "lr_scale": 1.0}]
    for depth, block in enumerate(reversed(blocks[len(blocks) - n :])):
        scale = cfg.backbone_lr_scale * cfg.layer_decay**depth
        groups.append({"params": list(block.parameters()), "lr_scale": scale})
    penalty = None
    if cfg.l2sp > 0 and source_state is not None:
        penalty = l2sp_penalty(model, source_state, cfg.l2sp)
        groups[1:] = [{**g, "weight_decay": 0.0} for g in groups[1:]]
    return Phase(name, _trainable(groups, model), cfg.train, penalty)


def l2sp_penalty(model, source_state: dict[str, torch.Tensor], alpha: float):
    """L2-SP (Li et al., 2018): pull backbone weights towards the pretrained ones."""
    pairs = [
        (p, source_state[f"backbone.{k}"].to(p.device))
        for k, p in model.backbone.named_parameters()
        if p.requires_grad and f"backbone.{k}" in source_state
    ]

    def penalty() -> torch.Tensor:
        return 0.5 * alpha * sum(((p - p0) ** 2).sum() for p, p0 in pairs)

    return penalty


def _source_stream(prepared_dir: Path, match_dir: Path | None, head: nn.Linear, strategy: str):
    stream = joint.load_source_stream(prepared_dir, match_dir, strategy)
    if stream.num_classes != head.out_features:
        raise TlpipeError("the source model's classes differ from the prepared source's")
    return stream


def joint_phase(model, cfg: FinetuneConfig, source_state) -> Phase:
    """`full`, plus match-weighted source batches through the pretrained source head."""
    joint.attach_source_head(model, source_state, cfg.strategy)
    phase = blocks_phase(model, cfg, None, "joint", source_state)
    head = getattr(model, joint.SOURCE_HEAD)
    head.requires_grad_(True)
    phase.groups.append({"params": list(head.parameters()), "lr_scale": 1.0})

    def source_stream(batches, prepared_dir: Path, match_dir: Path | None):
        stream = _source_stream(prepared_dir, match_dir, head, cfg.strategy)
        mixed = joint.JointBatches(batches, stream, cfg.joint, seed=phase.train.seed)
        return mixed, joint.joint_loss(cfg.joint.source_weight, phase.train.label_smoothing)

    phase.source_stream = source_stream
    return phase


def specialist_phase(model, cfg: FinetuneConfig, source_state) -> Phase:
    """Continue training the source model on the matched source only (source head).

    Ngiam et al. (2018) "Domain Adaptive Transfer Learning with Specialist Models": the
    backbone leans on the source images that look like the target before it sees the target.
    The batches are drawn uniformly from selected.npy (the top `match.top_fraction`).
    """
    joint.attach_source_head(model, source_state, cfg.strategy)
    head = getattr(model, joint.SOURCE_HEAD)
    params = list(model.backbone.parameters()) + list(head.parameters())
    phase = Phase(
        "specialist", _trainable([{"params": params}], model), cfg.specialist, validate=False
    )

    def source_stream(_target_batches, prepared_dir: Path, match_dir: Path | None):
        stream = _source_stream(prepared_dir, match_dir, head, cfg.strategy)
        t = phase.train
        batches = ArrayBatches(
            stream.x,
            stream.y,
            t.batch_size,
            seed=t.seed,
            rows=stream.selected,
            steps_per_epoch=t.steps_per_epoch,
            domain=1,
        )
        return batches, joint.source_loss(t.label_smoothing)

    phase.source_stream = source_stream
    return phase


Strategy = Callable[[nn.Module, dict | None, FinetuneConfig], list[Phase]]
STRATEGIES: dict[str, Strategy] = {
    "linear_probe": lambda m, s, c: [head_phase(m, c)],
    "partial": lambda m, s, c: [blocks_phase(m, c, c.partial_blocks, "partial", s)],
    "full": lambda m, s, c: [blocks_phase(m, c, None, "full", s)],
    "lp_ft": lambda m, s, c: [head_phase(m, c), blocks_phase(m, c, None, "full", s)],
    "joint": lambda m, s, c: [joint_phase(m, c, s)],
    "specialist": lambda m, s, c: [specialist_phase(m, c, s), blocks_phase(m, c, None, "full", s)],
    "scratch": lambda m, s, c: [
        Phase("scratch", _trainable([{"params": list(m.parameters())}], m), c.train)
    ],
}


def run(
    prepared_dir: Path,
    source_model: Path | None,
    out_model: Path,
    cfg: FinetuneConfig,
    match_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Fine-tune the source model on target_train with strategy `cfg.strategy`.

    Args:
        cfg: the strategy's settings as they train: `per_strategy` is not applied here (the
            runner's `step_config` applies it once, with `FinetuneConfig.for_strategy`).
        source_model: the pretrained checkpoint (ignored by `scratch`).
        match_dir: output of `match` (weights.npy, selected.npy): `joint` needs it.
        checkpoint_dir: per-epoch resume checkpoints, one file per phase.
    """
    from tlpipe.data.manifest import load_manifest
    from tlpipe.data.prepared import load_split
    from tlpipe.train.models import save_checkpoint

    if cfg.strategy not in STRATEGIES:
        raise TlpipeError(f"unknown strategy {cfg.strategy!r}; choose: {', '.join(STRATEGIES)}")
    manifest = load_manifest(prepared_dir)
    check_source_strategies([cfg.strategy], manifest.has_source)
    train, val = load_split(prepared_dir, "target_train"), load_split(prepared_dir, "target_val")
    key = _resume_key(cfg, manifest, source_model, match_dir)
    data = Data(prepared_dir, source_model, match_dir, manifest)
    labelled = Labelled.of(train, val)
    score = transferability(cfg, data, labelled)
    if score.get("skip"):  # opt-in: the score rules this strategy out; nothing trains
        return _skipped(cfg, data, out_model, score)
    cross = 0 < len(val) < cfg.selection.min_val  # too few to choose by: k-fold, train + val
    refit = cross and cfg.selection.refit  # then the shipped model learns from all of them
    fit_on = (labelled.x, labelled.y) if refit else (train.x, train.y)
    val_on = None if refit else (val.x, val.y)
    trained = _train(cfg, data, fit_on, val_on, checkpoint_dir, key)
    model, result, start = trained.model, trained.result, trained.start
    cv = cross_validate(cfg, data, labelled) | {"refit": refit} if cross else None
    meta = CheckpointMeta.for_data(
        manifest,
        start.arch,
        cfg.strategy,
        manifest.target_classes,
        result,
        norm=(start.mean, start.std),
        pretrained=start.pretrained,
    ).replace(history=tuple(trained.history), selection_cv=cv, logme=score["logme"])
    save_checkpoint(out_model, model, meta)
    metrics = {"train_seconds": trained.seconds, "logme": score["logme"]}
    if not refit:  # (a refit model trained on target_val: it has no held-out accuracy)
        metrics["target_val_accuracy"] = result.best_val_accuracy
    if refit:
        summary = (
            f"wrote {out_model}: trained on target train + val ({len(labelled.y)} images, "
            "the last epoch; finetune.selection.refit)"
        )
    else:
        summary = f"wrote {out_model}: target val accuracy {result.best_val_accuracy:.4f}"
    if cv is not None:
        metrics |= {"cv_accuracy": cv["accuracy"], "cv_extra_fits": float(cv["fits"])}
        summary += (
            f"; {cv['folds']}-fold CV accuracy {cv['accuracy']:.4f} ({cv['fits']} extra fits)"
        )
    return TrainResult(
        Path(out_model),
        history=trained.history,
        metrics=metrics,
        summary=summary,
        resume_files=trained.resume_files,
    )


def transferability(cfg: FinetuneConfig, data: Data, labelled: Labelled) -> dict[str, Any]:
    """LogME of the starting model's features on the labelled target images (train + val),
    before any fine-tuning (`tlpipe.train.logme`); scratch: of its random init.

    With `finetune.skip: logme`, a transfer strategy is skipped when the source features score
    no higher than the same architecture's random-init features (seeded): the pretrained
    backbone explains the target labels no better than no pretraining at all.
    """
    from tlpipe.train.logme import logme
    from tlpipe.train.loop import embed

    num_classes = len(data.manifest.target_classes)
    model, _, start = _start_model(cfg, data.source_model, data.manifest, num_classes)
    x, y = labelled.x, labelled.y
    out: dict[str, Any] = {"logme": logme(embed(model, x, start.mean, start.std), y)}
    if cfg.skip == "logme" and cfg.strategy != "scratch":
        scratch = dataclasses.replace(cfg, strategy="scratch", model=start.arch)
        rand, _, rstart = _start_model(scratch, None, data.manifest, num_classes)
        out["logme_random_init"] = logme(embed(rand, x, rstart.mean, rstart.std), y)
        if out["logme"] <= out["logme_random_init"]:
            out["skip"] = (
                f"skipped: LogME of the source features {out['logme']:.3f} <= "
                f"{out['logme_random_init']:.3f} at random init (finetune.skip: logme)"
            )
    return out


def _skipped(cfg: FinetuneConfig, data: Data, out_model: Path, score: dict) -> TrainResult:
    """The starting model, untrained, marked skipped: evaluate lists it but never ships it."""
    from tlpipe.train.loop import FitResult
    from tlpipe.train.models import save_checkpoint

    classes = data.manifest.target_classes
    model, _, start = _start_model(cfg, data.source_model, data.manifest, len(classes))
    meta = CheckpointMeta.for_data(
        data.manifest,
        start.arch,
        cfg.strategy,
        classes,
        FitResult(),
        norm=(start.mean, start.std),
        pretrained=start.pretrained,
    ).replace(logme=score["logme"], skipped=score["skip"])
    save_checkpoint(out_model, model, meta)
    probe = [cfg.probe] if cfg.probe_solver == "sgd" else []  # lbfgs: no epochs
    phases = {
        "linear_probe": probe,
        "lp_ft": [*probe, cfg.train],
        "specialist": [cfg.specialist, cfg.train],
    }.get(cfg.strategy, [cfg.train])
    epochs = sum(t.epochs for t in phases)
    metrics = {"logme": score["logme"], "skipped": 1.0, "skipped_epochs": float(epochs)}
    return TrainResult(
        Path(out_model), history=[], metrics=metrics, summary=f"{out_model}: {score['skip']}"
    )


@dataclass(frozen=True)
class Data:
    """Where a fit's inputs besides the target images live."""

    prepared_dir: Path
    source_model: Path | None
    match_dir: Path | None
    manifest: Manifest


@dataclass
class Trained:
    model: nn.Module
    result: Any
    history: list[dict]
    seconds: float
    start: Start
    resume_files: tuple[Path, ...]


def _train(
    cfg: FinetuneConfig, data: Data, train_xy, val_xy, checkpoint_dir, key, label: str = ""
) -> Trained:
    """Run the strategy's phases on (train x, y), selecting epochs on val (None: the last).

    `label` follows the phase in the progress lines (a CV fit says which one it is).
    """
    from tlpipe.train.loop import cap_validation, fit
    from tlpipe.train.probe import solve_head

    num_classes = len(data.manifest.target_classes)
    model, source_state, start = _start_model(cfg, data.source_model, data.manifest, num_classes)
    history, result, seconds, resume_files = [], None, 0.0, []
    for phase in STRATEGIES[cfg.strategy](model, source_state, cfg):
        t = phase.train
        _trainable(phase.groups, model)  # phases are built up front: each sets its own again
        validate = val_xy is not None and len(val_xy[1]) and phase.validate
        val = val_xy if validate else None
        desc = f"{cfg.strategy}:{phase.name}{label}"
        if phase.solved:  # seconds, not epochs: nothing to resume
            val = cap_validation(val, t.val_max_images, t.seed)
            norm = {"mean": start.mean, "std": start.std}
            how = {"l2": cfg.probe_l2, "seed": t.seed, "device": t.device, "desc": desc}
            result = solve_head(model, *train_xy, **norm, val=val, **how)
        else:
            batches = ArrayBatches(
                *train_xy, t.batch_size, seed=t.seed, steps_per_epoch=t.steps_per_epoch
            )
            loss_fn = None
            if phase.source_stream is not None:
                batches, loss_fn = phase.source_stream(batches, data.prepared_dir, data.match_dir)
            resume = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{phase.name}.pt"
            resume_files.append(resume)
            result = fit(
                model,
                batches,
                t,
                mean=start.mean,
                std=start.std,
                val=val,
                param_groups=phase.groups,
                loss_fn=loss_fn,
                penalty=phase.penalty,
                checkpoint=resume,
                resume_key=key,
                desc=desc,
            )
        history += [{**row, "phase": phase.name} for row in result.history]
        seconds += result.seconds
    joint.detach_extra_heads(model)
    files = tuple(f for f in resume_files if f)
    return Trained(model, result, history, seconds, start, files)


def cross_validate(cfg: FinetuneConfig, data: Data, labelled: Labelled) -> dict[str, Any]:
    """(Repeated) k-fold CV of this strategy over the labelled target images (never test).

    Each fold trains from the same start (the source model, or a fresh init for scratch) on the
    other folds, for `selection.epoch_fraction` of the epochs, keeps the last epoch (no data is
    left to choose one on) and predicts its held-out fold. Repeat r draws its folds with
    `selection.seed + r` and trains with every phase's seed + r. Returns each image's share of
    correct out-of-fold predictions (0/1 with one repeat) and its mean out-of-fold probability
    of the true class, which `evaluate` pairs across strategies.
    """
    from tlpipe.train.loop import predict, true_class_log_probability

    sel = cfg.selection
    x, y = labelled.x, labelled.y
    correct, p_true = np.zeros(len(y)), np.zeros(len(y))
    fits = sel.folds * sel.repeats
    for r in range(sel.repeats):
        fold = stratified_folds(y, sel.folds, sel.seed + r)
        short = reseeded(shorter(cfg, sel.epoch_fraction), r)
        for k in range(sel.folds):
            held = fold == k
            if not held.any() or held.all():
                continue
            label = f" (CV fit {r * sel.folds + k + 1}/{fits})"
            trained = _train(short, data, (x[~held], y[~held]), None, None, "", label)
            s = trained.start
            logits = predict(trained.model, x[held], s.mean, s.std)
            correct[held] += (logits.argmax(1) == y[held]) / sel.repeats
            p_true[held] += np.exp(true_class_log_probability(logits, y[held])) / sel.repeats
    plain = sel.repeats == 1  # 0/1 per image, as before repeats existed
    return {
        "ids": labelled.keys,
        "correct": correct.astype(int).tolist() if plain else correct.round(6).tolist(),
        "p_true": p_true.round(6).tolist(),
        "folds": sel.folds,
        "repeats": sel.repeats,
        "fits": fits,
        "epoch_fraction": sel.epoch_fraction,
        "seed": sel.seed,
        "accuracy": float(correct.mean()),
    }


def reseeded(cfg: FinetuneConfig, offset: int) -> FinetuneConfig:
    """`cfg` with every phase's seed moved by `offset` (0: `cfg` itself)."""
    if offset == 0:
        return cfg

    def move(t: TrainConfig) -> TrainConfig:
        return dataclasses.replace(t, seed=t.seed + offset)

    return dataclasses.replace(
        cfg, train=move(cfg.train), probe=move(cfg.probe), specialist=move(cfg.specialist)
    )


def shorter(cfg: FinetuneConfig, fraction: float) -> FinetuneConfig:
    """`cfg` with every phase's epochs scaled by `fraction` (at least one)."""

    def cut(t: TrainConfig) -> TrainConfig:
        return dataclasses.replace(t, epochs=max(1, round(t.epochs * fraction)))

    return dataclasses.replace(
        cfg, train=cut(cfg.train), probe=cut(cfg.probe), specialist=cut(cfg.specialist)
    )


def _resume_key(cfg: FinetuneConfig, manifest: Manifest, source_model, match_dir) -> str:
    """What a resume file must have been written with: settings, data, source model, weights."""
    from tlpipe.fsio import sha256_file

    inputs = [Path(source_model)] if source_model and cfg.strategy != "scratch" else []
    if match_dir is not None:
        inputs += [Path(match_dir) / n for n in ("weights.npy", "selected.npy")]
    hashes = [sha256_file(f) if f.is_file() else "-" for f in inputs]
    return f"{cfg!r}|{manifest.dataset_sha256}|{'|'.join(hashes)}"


def _source_arch(source_model: Path | None) -> str:
    """The source model's architecture: what scratch trains when finetune.model is null."""
    from tlpipe.train.models import load_checkpoint

    if source_model is None or not Path(source_model).is_file():
        raise TlpipeError(
            "scratch copies the source model's architecture (finetune.model: null), but there "
            "is no source model: set finetune.model (e.g. to pretrain.model) or run pretrain"
        )
    return load_checkpoint(source_model)[1].arch


@dataclass(frozen=True)
class Start:
    """What fine-tuning starts from: the architecture, its input normalisation (the source
    model's: it belongs to its weights; scratch: the data's), the pretrained weights' origin."""

    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrained: str | None = None


def _start_model(cfg: FinetuneConfig, source_model, manifest: Manifest, num_classes: int):
    """A fresh model (scratch) or the source backbone with a new head for the target classes.

    Returns (model, the source's state or None, `Start`).
    """
    from tlpipe.train.models import build_model, load_checkpoint, seeded

    in_chans, input_size = manifest.in_chans, manifest.input_size
    if cfg.strategy == "scratch":
        arch = cfg.model or _source_arch(source_model)
        model = build_model(arch, num_classes, in_chans, input_size, seed=cfg.train.seed)
        return model, None, Start(arch, manifest.mean, manifest.std)
    if source_model is None:
        raise TlpipeError(f"strategy {cfg.strategy!r} needs a source model (run pretrain first)")
    source, meta = load_checkpoint(source_model)
    if (meta.in_chans, meta.input_size) != (in_chans, input_size):
        raise TlpipeError(
            f"source model expects {meta.in_chans}×{meta.input_size}px input but the "
            f"prepared data is {in_chans}×{input_size}px: re-run pretrain on this data"
        )
    source_state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    with seeded(cfg.train.seed):
        source.head = nn.Linear(source.feat_dim, num_classes)
    start = Start(meta.arch, meta.mean, meta.std, meta.pretrained)
    return source, source_state, start
