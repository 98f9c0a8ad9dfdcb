"""Training: AdamW on the attention-sampling estimator, with validation, checkpoints and resume.

Every random choice of epoch e (shuffling, sampling, augmentation) comes from generators seeded
by (seed, e, stream), so a run resumed from the checkpoint of epoch e-1 continues exactly as the
uninterrupted run would have (on the CPU, where kernels are deterministic).
"""

from __future__ import annotations

import csv
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from wsiats import distributed
from wsiats.distributed import DistContext

from wsiats._io import atomic_open
from wsiats._progress import track
from wsiats.checkpoint import (
    LAST_FILE,
    MODEL_FILE,
    STATE_FILE,
    build_model,
    load_state,
    load_weights_into,
    save_state,
    save_weights,
)
from wsiats.config import Config, load_run_config
from wsiats.data import Item, ViewDataset, build_cohort, collate_views, seeded_generator, split_items
from wsiats.errors import CheckpointError, ConfigError, Interrupted, SlideError, WsiatsError
from wsiats.metrics import classification_metrics
from wsiats.models import ATSModel
from wsiats.pipeline import (
    ATSForward,
    Augment,
    PreparedView,
    SlideBatchItem,
    SlidePool,
    class_weights,
    forward_batch,
    loss_fn,
)
from wsiats.runtime import autocast_factory, grad_scaler
from wsiats.slide import open_slide

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc",
    "attention_entropy", "seconds_per_slide", "lr", "feature_cache_hit_rate", "feature_cache_speedup",
)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    rank: int = 0  # under torchrun, only rank 0 reports


def check_slides(items: Sequence[Item], *, backend: str = "auto", mpp: float | None = None) -> list[tuple[Item, str]]:
    """Open every slide; return (item, reason) for each that cannot be opened."""
    bad = []
    for item in items:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                open_slide(item.path, backend=backend, mpp=mpp).close()
        except SlideError as exc:
            bad.append((item, exc.reason))
    return bad


def _lr_factor(epoch: int, cfg: Config) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to 5% at the last epoch."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    t = (epoch - cfg.warmup_epochs) / span
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def _loader(ds: ViewDataset, cfg: Config, sampler: DistributedSampler) -> DataLoader:
    return DataLoader(
        ds,
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
    pool: SlidePool,
    device: torch.device,
    seed: int,
    autocast: Callable[[], object],
    ctx: DistContext = DistContext(),
) -> dict[str, float]:
    """Loss, accuracy and AUC of one seeded sampling pass per slide over `items`.

    Each slide's pass uses a generator seeded by (seed, slide index), so the result does
    not depend on batching or on how slides are sharded across ranks.
    """
    model.eval()
    records = []
    with torch.no_grad():
        for i in distributed.shard(ctx, len(items)):
            view = views(i)
            if isinstance(view, str):  # unreadable: reported by the training loop's warning
                continue
            out = forward_batch(model, [SlideBatchItem(items[i].path, view)], cfg=cfg, pool=pool,
                                generator=seeded_generator(seed, 10**6, i), device=device, autocast=autocast)
            y = torch.tensor([items[i].label], device=out.logits.device)
            _, ce = loss_fn(out, y, cfg=cfg, weight=None)
            probs = torch.softmax(out.logits.float(), -1)[0].cpu().tolist()
            records.append((i, float(ce), probs, float(out.entropy[0])))
    merged = sorted(r for part in distributed.gather(ctx, records) for r in part)
    targets = np.asarray([items[i].label for i, *_ in merged])
    p = np.asarray([r[2] for r in merged])
    m = classification_metrics(targets, p, n_classes=len(cfg.classes))
    return {"loss": float(np.mean([r[1] for r in merged])), "acc": float(m["accuracy"]), "auc": float(m["auc"]),
            "entropy": float(np.mean([r[3] for r in merged]))}


def train(
    slide_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    resume: bool = False,
    skip_bad: bool = False,
    backend: str = "auto",
    mpp: float | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train an ATS model on the labelled slides of `slide_dir`; write the run to `out_dir`."""
    out_dir = Path(out_dir)
    if resume:
        saved = load_run_config(out_dir)
        cfg = saved
        if not (out_dir / STATE_FILE).is_file():
            raise CheckpointError(f"{out_dir}: nothing to resume (no {STATE_FILE}); start without --resume")
    items, classes = build_cohort(slide_dir, labels_csv, classes=cfg.classes or None)
    cfg.classes = classes
    bad = check_slides(items, backend=backend, mpp=mpp)
    skipped = []
    if bad:
        listing = "; ".join(f"{it.path}: {why}" for it, why in bad)
        if not skip_bad:
            raise WsiatsError(
                f"{len(bad)} unreadable slide(s) in the cohort: {listing}. Fix or remove them, or pass --skip-bad"
            )
        skipped = [str(it.path) for it, _ in bad]
        items = [it for it in items if str(it.path) not in skipped]
    train_items, val_items, test_items = split_items(items, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if len({it.label for it in train_items}) < 2:
        raise ConfigError(f"{labels_csv}: the training split holds fewer than two classes")
    if cfg.view_cache:
        try:
            Path(cfg.view_cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{cfg.view_cache}: cannot create the --view-cache folder ({exc.strerror or exc})") from None

    ctx, device = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    net: torch.nn.Module = ATSForward(model)
    if ctx.enabled:
        # Uniform attention or a frozen backbone leaves parameters without gradients.
        unused = cfg.attention == "uniform" or cfg.freeze_features
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _lr_factor(e, cfg))
    scaler = grad_scaler(device, cfg.amp)
    autocast = autocast_factory(device, cfg.amp)
    weight = class_weights([it.label for it in train_items], len(classes)).to(device) if cfg.class_weighting else None

    history: list[dict[str, float]] = []
    start_epoch, best_epoch, best_key = 0, -1, (-math.inf, -math.inf)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_state(out_dir / STATE_FILE)
        if "model" in state:  # the weights of the state's epoch: last.safetensors may be one epoch ahead
            model.load_state_dict(state["model"])
        else:
            load_weights_into(model, out_dir / LAST_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best_epoch = int(state["best_epoch"])
        best_key = (float(state["best_acc"]), float(state["best_neg_loss"]))
        history = [dict(zip(METRIC_COLUMNS, row.tolist())) for row in state["history"]]
    elif ctx.is_main:
        cfg.save(out_dir / "config.yaml")

    train_ds = ViewDataset(train_items, cfg, backend=backend, mpp=mpp)
    val_ds = ViewDataset(val_items, cfg, backend=backend, mpp=mpp)
    # One loader for the whole run: its persistent workers keep their view caches between epochs.
    # The sampler shuffles with seed + epoch and shards across ranks (padding so all get as many).
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    train_loader = _loader(train_ds, cfg, sampler)
    pool = SlidePool(backend=backend, mpp=mpp)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            row = _train_epoch(
                net, model, train_loader, cfg=cfg, epoch=epoch, optimizer=optimizer, scaler=scaler, autocast=autocast,
                weight=weight, pool=pool, device=device, progress=progress and ctx.is_main, ctx=ctx,
            )
            row["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if val_items:
                v = evaluate(model, val_items, lambda i: val_ds[i][1], cfg=cfg, pool=pool, device=device,
                             seed=cfg.seed, autocast=autocast, ctx=ctx)
                row.update(val_loss=v["loss"], val_acc=v["acc"], val_auc=v["auc"])
                key = (v["acc"], -v["loss"])
            else:
                row.update(val_loss=math.nan, val_acc=math.nan, val_auc=math.nan)
                key = (float(epoch), 0.0)  # no validation: the latest epoch is the best
            row.update(_cache_report(model, epoch))
            history.append(row)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            improved = key > best_key
            if improved:
                best_key, best_epoch = key, epoch
            if not ctx.is_main:
                distributed.barrier(ctx)
                continue
            if improved:
                save_weights(model, out_dir / MODEL_FILE, metadata={"epoch": str(epoch)})
            save_weights(model, out_dir / LAST_FILE, metadata={"epoch": str(epoch)})
            save_state(out_dir / STATE_FILE, {
                "epoch": epoch,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # one file, renamed at once
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "best_epoch": best_epoch,
                "best_acc": best_key[0],
                "best_neg_loss": best_key[1],
                "history": torch.tensor([[r.get(c, math.nan) for c in METRIC_COLUMNS] for r in history], dtype=torch.float64),
            })
            _write_metrics(out_dir / "metrics.csv", history)
            distributed.barrier(ctx)
            if on_epoch is not None and ctx.is_main:
                on_epoch(row)
    except KeyboardInterrupt:
        done = epoch - 1
        saved = (f"epoch {done + 1} of {cfg.epochs} was saved in {out_dir / LAST_FILE}; continue with --resume"
                 if done >= 0 else "no epoch was completed, so nothing to resume; run the same command again")
        raise Interrupted(f"training interrupted during epoch {epoch + 1}; {saved}") from None
    finally:
        pool.close()
        distributed.teardown(ctx)
    return TrainResult(out_dir, len(history), best_epoch, history, skipped, len(train_items), len(val_items),
                       len(test_items), ctx.rank)


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
    pool: SlidePool,
    device: torch.device,
    progress: bool,
    ctx: DistContext,
) -> dict[str, float]:
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
    for batch in track(loader, total=n_steps, description=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress):
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
        out = net(items, cfg=cfg, pool=pool, generator=sample_gen, device=device,
                  workers=cfg.workers or None, autocast=autocast)
        loss, ce = loss_fn(out, y, cfg=cfg, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        total_loss += float(ce.detach()) * len(batch)
        correct += int((out.logits.argmax(-1) == y).sum())
        seen += len(batch)
        entropy_sum += float(out.entropy.detach().sum())
    seconds = time.perf_counter() - t0
    total_loss, correct, seen, entropy_sum = distributed.all_sum(ctx, [total_loss, correct, seen, entropy_sum])
    return {
        "epoch": float(epoch + 1),
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "attention_entropy": entropy_sum / max(seen, 1),
        # wall time per slide of this rank's share: what one process spends on a slide
        "seconds_per_slide": seconds * ctx.world_size / max(seen, 1),
    }


def _cache_report(model: ATSModel, epoch: int) -> dict[str, float]:
    """The embedding cache's hit rate and estimated speed-up over this epoch's feature passes (NaN: no cache)."""
    if model.embed_cache is None:
        return {"feature_cache_hit_rate": math.nan, "feature_cache_speedup": math.nan}
    s = model.embed_cache.take_stats()
    log.info("epoch %d: feature cache hit rate %.3f (%d of %d patches), feature passes %.2fx faster (estimated), "
             "%d embeddings in %.1f MB", epoch + 1, s.hit_rate, s.hits, s.hits + s.misses, s.speedup, s.entries, s.mb)
    return {"feature_cache_hit_rate": s.hit_rate, "feature_cache_speedup": s.speedup}


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(METRIC_COLUMNS)
        for row in history:
            writer.writerow([_fmt(row.get(c, math.nan)) for c in METRIC_COLUMNS])


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"
