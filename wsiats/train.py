"""Training: AdamW on the attention-sampling estimator, with validation, checkpoints and resume.

Every random choice of epoch e (shuffling, sampling, augmentation) comes from generators seeded
by (seed, e, stream), so a run resumed from the checkpoint of epoch e-1 continues exactly as the
uninterrupted run would have (on the CPU, where kernels are deterministic).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from wsiats import distributed
from wsiats.distributed import DistContext

from wsiats._progress import track
from wsiats.checkpoint import build_model, load_state, load_weights_into, save_state, save_weights
from wsiats.config import Config, resume_config
from wsiats.data import Item, ViewDataset, collate_views, match_cohort, seeded_generator, short_list, split_items
from wsiats.errors import CheckpointError, ConfigError, Interrupted, SlideError, WsiatsError
from wsiats.metrics import classification_metrics
from wsiats.models import ATSModel
from wsiats.forward import ATSForward, ForwardResult, SlideBatchItem, forward_batch
from wsiats.loss import class_weights, loss_fn
from wsiats.reader import PatchReader, SlidePool
from wsiats.view import Augment, PreparedView
from wsiats.run import METRIC_COLUMNS, RunFolder
from wsiats.runtime import autocast_factory, grad_scaler
from wsiats.slide import collect_notes, open_slide

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tile_errors: dict[str, int] = field(default_factory=dict)  # slide -> training steps left without it (--skip-bad)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    rank: int = 0  # under torchrun, only rank 0 reports


def check_slides(items: Sequence[Item], *, backend: str = "auto", mpp: float | None = None
                 ) -> tuple[list[tuple[Item, str]], dict[Path, float], list[str]]:
    """Open every slide: (item, reason) for each that cannot be opened, the level-0 mpp (x) of each that
    knows it, and the warnings about them."""
    bad, mpps, notes = [], {}, []
    for item in items:
        try:
            with collect_notes() as found, open_slide(item.path, backend=backend, mpp=mpp) as slide:
                if slide.mpp is not None:
                    mpps[item.path] = slide.mpp[0]
            notes += found
        except SlideError as exc:
            bad.append((item, exc.reason))
    return bad, mpps, notes


class _NotingLoader(DataLoader):
    """A DataLoader that hands each view's notes to `on_notes` as its batch arrives (in this process)."""

    def __init__(self, *args: object, on_notes: Callable[[list[str]], None], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.on_notes = on_notes

    def __iter__(self) -> Iterator[list[tuple[int, object]]]:  # type: ignore[override]
        for batch in super().__iter__():
            for _, view in batch:
                if not isinstance(view, str):
                    self.on_notes(view.notes)
            yield batch


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _noted(view: object, report: Callable[[list[str]], None]) -> PreparedView | str:
    """A view from a ViewDataset, after reporting its notes (an error message passes as it is)."""
    assert isinstance(view, (PreparedView, str))
    if isinstance(view, PreparedView):
        report(view.notes)
    return view


#: Epochs after which `train` checks that the loss or the attention entropy has started to move.
PLATEAU_EPOCHS = 5


def _stalled(history: Sequence[dict[str, float]]) -> bool:
    """Loss within 0.01 and attention entropy within 0.1% of their first values over the epochs so far."""
    loss = [r["train_loss"] for r in history]
    ent = [r["attention_entropy"] for r in history]
    return max(loss) - min(loss) < 0.01 and max(ent) - min(ent) < 1e-3 * max(abs(ent[0]), 1e-6)


def stall_message(history: Sequence[dict[str, float]], cfg: Config) -> str:
    """The one line `train` warns with when nothing has moved after PLATEAU_EPOCHS epochs."""
    what = ("--epochs (a needle cohort can take 50+), --candidates 512, --lr 3e-3"
            if cfg.pooling == "gated" and cfg.candidates else
            "--pooling gated (the default: finds sparse evidence), more --epochs, --lr 3e-3")
    return (f"training loss ({history[-1]['train_loss']:.3f}) and attention entropy "
            f"({history[-1]['attention_entropy']:.2f}) have not moved in {len(history)} epochs: the model has not "
            f"found a signal yet; try {what}")


def param_groups(model: ATSModel, cfg: Config) -> list[dict[str, object]]:
    """Two AdamW groups: the feature network at `lr`, the attention network, MIL head and classifier at
    `lr * head_lr_scale` (the small networks that decide where to look and how to pool learn fastest;
    the feature network's ReLUs died at 3e-3 in one of two needle runs)."""
    features = {id(p) for p in model.feature_net.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) in features], "lr": cfg.lr},
            {"params": [p for p in trainable if id(p) not in features], "lr": cfg.lr * cfg.head_lr_scale}]


def training_mode(cfg: Config) -> str:
    """The forward-pass mode of a training step: 'explore' with candidates (gated pooling), else 'sample'."""
    return "explore" if cfg.pooling == "gated" and (cfg.candidates or 0) > 0 else "sample"


def preflight(train_items: Sequence[Item], val_items: Sequence[Item], cfg: Config, *,
              unopened: Sequence[tuple[Item, str]] = (), skip_bad: bool = False, backend: str = "auto",
              mpp: float | None = None, progress: bool = False) -> tuple[ViewDataset, ViewDataset, list[str]]:
    """Before training starts, prepare every training and validation view once.

    Views that cannot be read, with the slides that could not be opened (`unopened`, from
    `check_slides`), stop training with one error listing them all, or with `skip_bad` are left out
    once. Returns the train and validation datasets (views kept in memory as the budget allows) and
    the paths left out.
    """
    datasets = [ViewDataset(part, cfg, backend=backend, mpp=mpp) for part in (train_items, val_items)]
    failed = [pair for ds in datasets for pair in ds.check_all(workers=cfg.workers, progress=progress)]
    if (unopened or failed) and not skip_bad:
        listing = "; ".join([f"{it.path}: {why}" for it, why in unopened] + [message for _, message in failed])
        raise WsiatsError(f"{len(unopened) + len(failed)} unreadable slide(s) in the cohort: {listing}. "
                          "Fix or remove them, or pass --skip-bad")
    broken = {it for it, _ in failed}
    train_ds, val_ds = (ds.subset([i for i, it in enumerate(ds.items) if it not in broken]) if broken else ds
                        for ds in datasets)
    if not train_ds.items:
        raise WsiatsError(f"none of the {len(train_items)} training slide(s) can be read: nothing to train on")
    return train_ds, val_ds, [str(it.path) for it, _ in [*unopened, *failed]]


def _lr_factor(epoch: int, cfg: Config) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to 5% at the last epoch."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    t = (epoch - cfg.warmup_epochs) / span
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def _retune(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, model: ATSModel,
            cfg: Config) -> None:
    """After loading a saved optimizer and scheduler: the learning rates and weight decay of `cfg`, which a
    resumed run may have changed (the same numbers, bit for bit, when it has not)."""
    scheduler.base_lrs = [float(group["lr"]) for group in param_groups(model, cfg)]  # type: ignore[arg-type]
    factor = _lr_factor(scheduler.last_epoch, cfg)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group.update(initial_lr=base, lr=base * factor, weight_decay=cfg.weight_decay)


def _loader(ds: ViewDataset, cfg: Config, sampler: DistributedSampler,
            on_notes: Callable[[list[str]], None] = lambda notes: None) -> DataLoader:
    return _NotingLoader(
        ds,
        on_notes=on_notes,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_views,
        pin_memory=False,  # views stay numpy; patches are pinned in forward_batch on CUDA
        persistent_workers=cfg.workers > 0,  # keeps each worker's in-memory view cache between epochs
    )


def evaluate(
    model: ATSModel,
    items: Sequence[Item],
    views: Callable[[int], PreparedView | str],
    *,
    cfg: Config,
    reader: PatchReader,
    device: torch.device,
    seed: int,
    autocast: Callable[[], object],
    ctx: DistContext = DistContext(),
    errors: dict[str, int] | None = None,
) -> dict[str, float]:
    """Loss, accuracy and AUC of one seeded sampling pass per slide over `items`.

    Each slide's pass uses a generator seeded by (seed, slide index), so the result does
    not depend on batching or on how slides are sharded across ranks. With `errors` (--skip-bad), a
    slide whose tiles cannot be read is counted there and left out; without, it is an error.
    """
    model.eval()
    records = []
    with torch.no_grad():
        for i in distributed.shard(ctx, len(items)):
            view = views(i)
            if isinstance(view, str):  # unreadable: reported by the training loop's warning
                continue
            try:
                out = forward_batch(model, [SlideBatchItem(items[i].path, view)], cfg=cfg, reader=reader,
                                    generator=seeded_generator(seed, 10**6, i), device=device, autocast=autocast)
            except SlideError as exc:
                if errors is None:
                    raise WsiatsError(f"{exc}; pass --skip-bad to validate without it") from None
                errors[str(exc.path)] = errors.get(str(exc.path), 0) + 1
                continue
            y = torch.tensor([items[i].label], device=out.logits.device)
            _, ce = loss_fn(out, y, cfg=cfg, weight=None)
            probs = torch.softmax(out.logits.float(), -1)[0].cpu().tolist()
            records.append((i, float(ce), probs, float(out.entropy[0])))
    merged = sorted(r for part in distributed.gather(ctx, records) for r in part)
    if not merged:
        return {"loss": math.nan, "acc": math.nan, "auc": math.nan, "entropy": math.nan}
    targets = np.asarray([items[i].label for i, *_ in merged])
    p = np.asarray([r[2] for r in merged])
    m = classification_metrics(targets, p, n_classes=len(cfg.classes))
    return {"loss": float(np.mean([r[1] for r in merged])), "acc": float(m["accuracy"]),  # type: ignore[arg-type]
            "auc": float(m["auc"]),  # type: ignore[arg-type]
            "entropy": float(np.mean([r[3] for r in merged]))}


class TrainHooks:
    """What a caller of `train` can watch or stop, as Lightning's callbacks: subclass and override the events you
    need (each is a no-op here), pass an instance as `train(..., hooks=...)`. An exception raised in a hook stops
    training as one raised by training itself would (KeyboardInterrupt: as Ctrl-C, with the same message).
    Epochs are 0-based; under torchrun every process runs its hooks, except where a method says otherwise."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first training step of `epoch`."""

    def on_step(self, epoch: int, step: int, model: ATSModel) -> None:
        """Before training step `step` (1-based, a batch of the loader) of `epoch` reads a patch."""

    def on_weights_saved(self, epoch: int) -> None:
        """First process only: `epoch`'s weights are in place, its training state (last_state.pt) is not yet
        (a stop here leaves last.safetensors one epoch ahead of the state; `--resume` goes on from the state)."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """First process only: `epoch` is saved; `row` is its line of metrics.csv (what `on_epoch` is given)."""


class _Notes:
    """Hands each message about the cohort or a slide to `on_note` once (default: a UserWarning); under torchrun
    the cohort's messages come from the first process only."""

    def __init__(self, on_note: Callable[[str], None] | None) -> None:
        self.on_note = on_note or _warn
        self.said: set[str] = set()
        self.first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank checks the whole cohort

    def __call__(self, notes: Sequence[str], *, every_rank: bool = True) -> None:
        for text in notes:
            if text not in self.said and (every_rank or self.first_rank):
                self.said.add(text)
                self.on_note(text)


@dataclass
class TrainData:
    """The cohort `train` trains on, after every check: readable training and validation views, test items."""

    train: ViewDataset
    val: ViewDataset
    test_items: list[Item]
    skipped: list[str]  # the slides left out as unreadable (--skip-bad)


@dataclass
class _Session:
    """What one training run holds in memory: the model, its (DDP-wrapped) pass and the optimiser's state."""

    ctx: DistContext
    device: torch.device
    model: ATSModel
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], object]
    weight: torch.Tensor | None  # class weights of the loss, or None


@dataclass
class _Progress:
    """Where the run stands: the epochs done (their metric rows) and the best of them so far."""

    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    best_epoch: int = -1
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    tile_errors: dict[str, int] = field(default_factory=dict)  # slide -> training steps left without it (--skip-bad)


def train(
    slide_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    cfg: Config | None,
    *,
    resume: bool = False,
    skip_bad: bool = False,
    backend: str = "auto",
    mpp: float | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    recursive: bool = False,
    on_note: Callable[[str], None] | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train an ATS model on the labelled slides of `slide_dir`; write the run to `out_dir`.

    With `resume`, the run in `out_dir` goes on from its last completed epoch: `cfg` is None (go on as saved) or
    the run's config (`RunFolder(out_dir).load_config()`) with options of `config.RESUME_MAY_CHANGE` changed,
    e.g. more epochs; a change to any other option is a ConfigError.

    `skip_bad` trains on the labelled slides that have a readable file; `recursive` also looks for slide files
    in the sub-folders of `slide_dir`. What there is to say about the cohort and about each slide (labels
    without a slide, slides without a label, a doubtful resolution, no tissue) goes to `on_note`, once per
    message (default: a UserWarning). `on_epoch` gets each saved epoch's metrics row; `hooks` (`TrainHooks`)
    sees the steps, epochs and saves as they happen.

    The steps: `run_config` (a new run's config, or the resumed run's), `prepare_data` (cohort, checks,
    splits, views), a session (model, optimiser; restored on resume), then `_fit`: the epochs, each
    trained, validated and saved.
    """
    report = _Notes(on_note)
    out_dir = Path(out_dir)
    run = RunFolder(out_dir)
    cfg = run_config(run, cfg, resume=resume)
    data = prepare_data(slide_dir, labels_csv, cfg, resume=resume, skip_bad=skip_bad, backend=backend, mpp=mpp,
                        recursive=recursive, progress=progress, report=report)
    session = _start_session(cfg, data)
    state = _Progress()
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state = _restore(run, session, cfg)
    if session.ctx.is_main:
        run.save_config(cfg)  # on --resume too: what it took from the command line is the run's own now
    hooks = hooks or TrainHooks()
    _fit(run, session, state, data, cfg, hooks=hooks, on_epoch=on_epoch, backend=backend, mpp=mpp,
         skip_bad=skip_bad, progress=progress, report=report)
    return TrainResult(out_dir, len(state.history), state.best_epoch, state.history, data.skipped, state.tile_errors,
                       len(data.train.items), len(data.val.items), len(data.test_items), session.ctx.rank)


def run_config(run: RunFolder, cfg: Config | None, *, resume: bool) -> Config:
    """The config of the run: `cfg` for a new one; on resume, the saved one with the changes `cfg` may make."""
    if resume:
        saved = run.load_config(use="resume")
        run.check("resume")
        cfg, taken = resume_config(saved, {} if cfg is None else dataclasses.asdict(cfg))
        if taken:
            log.info("resuming %s with %s; the rest as saved in %s", run.path, ", ".join(taken), run.config)
    elif cfg is None:
        raise ConfigError("train() needs a Config unless it resumes a run")
    return cfg


def prepare_data(slide_dir: str | Path, labels_csv: str | Path, cfg: Config, *, resume: bool = False,
                 skip_bad: bool = False, backend: str = "auto", mpp: float | None = None, recursive: bool = False,
                 progress: bool = False, report: Callable[..., None] | None = None) -> TrainData:
    """The cohort of `train`: slides matched to labels, every slide opened (`check_slides`), the splits, and
    every training and validation view prepared once (`preflight`). Sets `cfg.classes` and, for a new run,
    `cfg.train_mpp` (the training slides' median resolution, which predict compares slides with); `report`
    (a `_Notes`) gets what there is to say about the cohort."""
    report = report or _Notes(None)
    cohort = match_cohort(slide_dir, labels_csv, classes=cfg.classes or None, recursive=recursive,
                          allow_missing=skip_bad)
    items, classes = cohort.items, cohort.classes
    if cohort.missing:
        report([f"{labels_csv}: {len(cohort.missing)} labelled slide(s) have no slide file in {slide_dir} "
                f"({short_list(cohort.missing)}); training on the {len(items)} that have one"], every_rank=False)
    if cohort.unlabelled:
        report([f"{slide_dir}: {len(cohort.unlabelled)} slide file(s) have no label in {labels_csv} and are left "
                f"out ({short_list([p.name for p in cohort.unlabelled])})"], every_rank=False)
    cfg.classes = classes
    bad, mpps, notes = check_slides(items, backend=backend, mpp=mpp)
    report(notes, every_rank=False)  # the views' notes come from the rank that reads them
    train_items, val_items, test_items = split_items([it for it in items if it not in {b for b, _ in bad}],
                                                     val_fraction=cfg.val_fraction, seed=cfg.seed)
    if (skip_bad or not bad) and len({it.label for it in train_items}) < 2:
        raise ConfigError(f"{labels_csv}: the training split holds fewer than two classes")
    if not resume:  # predict warns on slides far from this resolution
        known = [mpps[it.path] for it in train_items if it.path in mpps]
        cfg.train_mpp = float(np.median(known)) if known else None
    if cfg.view_cache:
        try:
            Path(cfg.view_cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{cfg.view_cache}: cannot create the --view-cache folder ({exc.strerror or exc})") from None
    train_ds, val_ds, skipped = preflight(train_items, val_items, cfg, unopened=bad, skip_bad=skip_bad,
                                          backend=backend, mpp=mpp, progress=progress)
    if len({it.label for it in train_ds.items}) < 2:
        raise ConfigError(f"{labels_csv}: the training slides that can be read hold fewer than two classes")
    return TrainData(train_ds, val_ds, test_items, skipped)


def _start_session(cfg: Config, data: TrainData) -> _Session:
    """Processes (torchrun), the seeded model, its pass (DDP-wrapped across processes), optimiser and scaler."""
    ctx, device = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    net: torch.nn.Module = ATSForward(model)
    if ctx.enabled:
        # Uniform attention or a frozen backbone leaves parameters without gradients.
        unused = cfg.attention == "uniform" or cfg.freeze_features
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, cfg))
    labels = [it.label for it in data.train.items]
    weight = class_weights(labels, len(cfg.classes)).to(device) if cfg.class_weighting else None
    return _Session(ctx, device, model, net, optimizer, scheduler, grad_scaler(device, cfg.amp),
                    autocast_factory(device, cfg.amp), weight)


def _restore(run: RunFolder, session: _Session, cfg: Config) -> _Progress:
    """The model, optimiser, scheduler and scaler of the run's last saved epoch, and where the run stood."""
    state = load_state(run.state)
    model = session.model
    try:  # a weights-only file can still hold anything: every way it can be wrong is one error
        if "model" in state:  # the weights of the state's epoch: last.safetensors may be one epoch ahead
            model.load_state_dict(state["model"])
        else:
            load_weights_into(model, run.last)
        session.optimizer.load_state_dict(state["optimizer"])
        session.scheduler.load_state_dict(state["scheduler"])
        _retune(session.optimizer, session.scheduler, model, cfg)
        session.scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best_epoch = int(state["best_epoch"])
        best_key = (float(state["best_acc"]), float(state["best_neg_loss"]))
        history = [dict(zip(METRIC_COLUMNS, row.tolist(), strict=True)) for row in state["history"]]
        if not 0 <= best_epoch < start_epoch or len(history) != start_epoch:
            raise ValueError(f"epoch {start_epoch - 1}, best epoch {best_epoch} and {len(history)} history rows")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{run.state}: not a training state of this run ({type(exc).__name__}: "
                              f"{detail}); train again into a new --out") from None
    return _Progress(history, start_epoch, best_epoch, best_key)


def _fit(run: RunFolder, session: _Session, state: _Progress, data: TrainData, cfg: Config, *, hooks: TrainHooks,
         on_epoch: Callable[[dict[str, float]], None] | None, backend: str, mpp: float | None, skip_bad: bool,
         progress: bool, report: _Notes) -> None:
    """The epochs from `state.start_epoch` on: each trained, validated and saved (`_save_epoch`); Ctrl-C and a
    diverged run end with an error that says what was saved."""
    ctx = session.ctx
    # One loader for the whole run: its persistent workers keep their view caches between epochs.
    # The sampler shuffles with seed + epoch and shards across ranks (padding so all get as many).
    sampler: DistributedSampler[int] = DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank,
                                                          shuffle=True, seed=cfg.seed)
    train_loader = _loader(data.train, cfg, sampler, on_notes=report)
    reader = SlidePool(backend=backend, mpp=mpp)
    epoch = state.start_epoch
    try:
        for epoch in range(state.start_epoch, cfg.epochs):
            hooks.on_epoch_start(epoch)
            row = _train_epoch(
                session.net, session.model, train_loader, cfg=cfg, epoch=epoch, optimizer=session.optimizer,
                scaler=session.scaler, autocast=session.autocast, weight=session.weight, reader=reader,
                device=session.device, progress=progress and ctx.is_main, ctx=ctx, skip_bad=skip_bad,
                tile_errors=state.tile_errors, hooks=hooks,
            )
            row["lr"] = session.optimizer.param_groups[0]["lr"]
            session.scheduler.step()
            key = _validate(row, session, data, cfg, epoch=epoch, reader=reader, skip_bad=skip_bad,
                            tile_errors=state.tile_errors, report=report)
            row.update(_cache_report(session.model, epoch))
            state.history.append(row)
            if len(state.history) == PLATEAU_EPOCHS and state.start_epoch == 0 and _stalled(state.history):
                warnings.warn(stall_message(state.history, cfg), stacklevel=1)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            improved = key > state.best_key
            if improved:
                state.best_key, state.best_epoch = key, epoch
            _check_finite_weights(session.model)  # on every rank: DDP keeps their weights equal
            if not ctx.is_main:
                distributed.barrier(ctx)
                continue
            _save_epoch(run, session, state, epoch, improved=improved, hooks=hooks)
            distributed.barrier(ctx)
            hooks.on_epoch_end(row)
            if on_epoch is not None:
                on_epoch(row)
    except KeyboardInterrupt:
        done = epoch - 1
        what = (f"epoch {done + 1} of {cfg.epochs} was saved in {run.last}; continue with --resume"
                if done >= 0 else "no epoch was completed, so nothing to resume; run the same command again")
        raise Interrupted(f"training interrupted during epoch {epoch + 1}; {what}") from None
    except _Diverged as exc:  # nothing of this epoch was saved: the files on disk are the last finite ones
        kept = f"epoch {epoch} in {run.last} is the last one saved" if epoch > 0 else "no epoch was saved"
        raise WsiatsError(f"training stopped in epoch {epoch + 1}: {exc} (the run diverged); {kept}; "
                          "try a lower --lr") from None
    finally:
        reader.close()
        distributed.teardown(ctx)


def _validate(row: dict[str, float], session: _Session, data: TrainData, cfg: Config, *, epoch: int,
              reader: PatchReader, skip_bad: bool, tile_errors: dict[str, int], report: _Notes
              ) -> tuple[float, float]:
    """Add the epoch's validation metrics to `row` (NaN without validation slides); returns the epoch's rank
    for "best": (accuracy, -loss), or without validation the epoch itself (the latest is the best)."""
    if not data.val.items:
        row.update(val_loss=math.nan, val_acc=math.nan, val_auc=math.nan)
        return (float(epoch), 0.0)
    v = evaluate(session.model, data.val.items, lambda i: _noted(data.val[i][1], report), cfg=cfg, reader=reader,
                 device=session.device, seed=cfg.seed, autocast=session.autocast, ctx=session.ctx,
                 errors=tile_errors if skip_bad else None)
    row.update(val_loss=v["loss"], val_acc=v["acc"], val_auc=v["auc"])
    # no validation slide could be read this epoch (--skip-bad): the latest such epoch ranks lowest
    return (v["acc"], -v["loss"]) if v["acc"] == v["acc"] else (-math.inf, float(epoch))


def _save_epoch(run: RunFolder, session: _Session, state: _Progress, epoch: int, *, improved: bool,
                hooks: TrainHooks) -> None:
    """The epoch's files: the best weights (when it improved), the last weights, then the training state
    (one file, renamed at once) and metrics.csv."""
    model = session.model
    if improved:
        save_weights(model, run.model, metadata={"epoch": str(epoch)})
    save_weights(model, run.last, metadata={"epoch": str(epoch)})
    hooks.on_weights_saved(epoch)
    save_state(run.state, {
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # one file, renamed at once
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict(),
        "best_epoch": state.best_epoch,
        "best_acc": state.best_key[0],
        "best_neg_loss": state.best_key[1],
        "history": torch.tensor([[r.get(c, math.nan) for c in METRIC_COLUMNS] for r in state.history],
                                dtype=torch.float64),
    })
    run.write_metrics(state.history)


def _train_epoch(
    net: torch.nn.Module,
    model: ATSModel,
    loader: DataLoader,
    *,
    cfg: Config,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], object],
    weight: torch.Tensor | None,
    reader: PatchReader,
    device: torch.device,
    progress: bool,
    ctx: DistContext,
    skip_bad: bool = False,
    tile_errors: dict[str, int] | None = None,
    hooks: TrainHooks | None = None,
) -> dict[str, float]:
    hooks = hooks or TrainHooks()
    model.train()
    items_of = loader.dataset.items  # type: ignore[attr-defined]
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(epoch)
    sample_gen = seeded_generator(cfg.seed, epoch, 1, ctx.rank)
    aug_gen = seeded_generator(cfg.seed, epoch, 2, ctx.rank)
    t0 = time.perf_counter()
    total_loss, correct, seen, entropy_sum = 0.0, 0, 0, 0.0
    n_steps = math.ceil(len(sampler) / cfg.batch_size)
    steps = track(loader, total=n_steps, description=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
    for step, batch in enumerate(steps, 1):
        hooks.on_step(epoch, step, model)
        for _, error in (pair for pair in batch if isinstance(pair[1], str)):
            warnings.warn(f"skipped in this step: {error}", stacklevel=1)
        batch = [pair for pair in batch if not isinstance(pair[1], str)]
        if not batch:
            continue
        items = [
            SlideBatchItem(items_of[i].path, view, Augment.draw(aug_gen) if cfg.augment else Augment())
            for i, view in batch
        ]
        y = torch.tensor([items_of[i].label for i, _ in batch], device=device)
        items, y, out = _forward_skipping(net, items, y, skip_bad=skip_bad, errors=tile_errors, cfg=cfg, reader=reader,
                                          mode=training_mode(cfg), generator=sample_gen, device=device,
                                          workers=cfg.workers or None, autocast=autocast)
        if out is None:
            continue
        loss, ce = loss_fn(out, y, cfg=cfg, weight=weight, classifier=model.classifier)
        if not torch.isfinite(loss.detach()):
            raise _Diverged(f"the training loss is {float(loss.detach())}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        total_loss += float(ce.detach()) * len(items)
        correct += int((out.logits.argmax(-1) == y).sum())
        seen += len(items)
        entropy_sum += float(out.entropy.detach().sum())
    seconds = time.perf_counter() - t0
    total_loss, correct, seen, entropy_sum = distributed.all_sum(  # type: ignore[assignment]  # counts as floats
        ctx, [total_loss, correct, seen, entropy_sum])
    if not seen:
        raise WsiatsError(f"epoch {epoch + 1}: no training slide could be read, so nothing was trained or saved")
    return {
        "epoch": float(epoch + 1),
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "attention_entropy": entropy_sum / max(seen, 1),
        # wall time per slide of this rank's share: what one process spends on a slide
        "seconds_per_slide": seconds * ctx.world_size / max(seen, 1),
    }


def _forward_skipping(net: torch.nn.Module, items: list[SlideBatchItem], y: torch.Tensor, *, skip_bad: bool,
                      errors: dict[str, int] | None, **kwargs: object
                      ) -> tuple[list[SlideBatchItem], torch.Tensor, ForwardResult | None]:
    """The forward pass; with `skip_bad`, a slide whose tiles cannot be read leaves the step (counted in
    `errors`, warned about once) and the rest go on. Returns the items and targets used, and the output
    (None when no slide of the step was left)."""
    while items:
        try:
            return items, y, net(items, **kwargs)
        except SlideError as exc:
            keep = [k for k, it in enumerate(items) if Path(it.slide_path) != exc.path]
            if len(keep) == len(items):
                raise
            if not skip_bad or errors is None:
                raise WsiatsError(f"{exc}; pass --skip-bad to train on without the steps that read it") from None
            if str(exc.path) not in errors:
                warnings.warn(f"left out of the steps that read it (--skip-bad): {exc}", stacklevel=1)
            errors[str(exc.path)] = errors.get(str(exc.path), 0) + 1
            items, y = [items[k] for k in keep], y[keep]
    return items, y, None


class _Diverged(Exception):
    """A non-finite loss or weight: training stops before anything of this epoch is saved."""


def _check_finite_weights(model: torch.nn.Module) -> None:
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise _Diverged(f"the weights hold NaN or infinite values ({bad[0]})")
def _cache_report(model: ATSModel, epoch: int) -> dict[str, float]:
    """The embedding cache's hit rate and estimated speed-up over this epoch's feature passes (NaN: no cache)."""
    if model.embed_cache is None:
        return {"feature_cache_hit_rate": math.nan, "feature_cache_speedup": math.nan}
    s = model.embed_cache.take_stats()
    log.info("epoch %d: feature cache hit rate %.3f (%d of %d patches), feature passes %.2fx faster (estimated), "
             "%d embeddings in %.1f MB", epoch + 1, s.hit_rate, s.hits, s.hits + s.misses, s.speedup, s.entries, s.mb)
    return {"feature_cache_hit_rate": s.hit_rate, "feature_cache_speedup": s.speedup}
