"""Prediction over many slides: one row per slide, failures recorded and skipped past.

Memory per slide is the low-resolution view plus N patches per pass, whatever the slide's size.
While one slide is in the networks, the views of the next ones are read by a thread pool.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiats import distributed
from wsiats._io import atomic_open, json_safe
from wsiats._progress import track
from wsiats.checkpoint import load_model
from wsiats.config import SEED_MAX, Config
from wsiats.data import seeded_generator, slide_id
from wsiats.errors import ConfigError, LabelsError, WsiatsError
from wsiats.metrics import classification_metrics
from wsiats.models import ATSModel
from wsiats.forward import SlideBatchItem, forward_batch
from wsiats.reader import OpenedSlide, PatchReader
from wsiats.view import PreparedView, prepare_view
from wsiats.runtime import autocast_factory, select_device
from wsiats.slide import Slide, collect_notes, open_slide


log = logging.getLogger(__name__)

#: A slide whose mpp differs from the training slides' median by more than this fraction gets a warning: its
#: view and patches (when set as downsamples) are then at a magnification the model did not learn.
MPP_TOLERANCE = 0.25


@dataclass
class Prediction:
    slide_id: str
    path: Path
    probs: list[float] = field(default_factory=list)
    spread: float = 0.0  # std over Monte-Carlo passes of the predicted class's probability
    passes: list[list[float]] = field(default_factory=list)
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    patches: list[dict[str, Any]] = field(default_factory=list)
    regions: list[dict[str, Any]] = field(default_factory=list)  # nested sampling: the picked regions of each pass
    fell_back: bool = False
    mpp: float | None = None  # the slide's level-0 microns per pixel (x), None when unknown
    mpp_source: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings about this slide, each naming it

    @property
    def ok(self) -> bool:
        return not self.error


class Predictor:
    """A trained model ready to classify slides: `device`, `workers` and `amp` (mixed precision on CUDA) are how
    this machine runs it, whatever the training run used."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        device: str | torch.device = "auto",
        mc: int = 1,
        topk: bool = False,
        seed: int = 0,
        workers: int = 2,
        amp: bool = True,
        backend: str = "auto",
        mpp: float | None = None,
        n_patches: int | None = None,
        allow_hub: bool = False,
    ) -> None:
        if mc < 1:
            raise ConfigError(f"--mc must be >= 1, got {mc}")
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"--seed must be an integer from 0 to {SEED_MAX}, got {seed}")
        model, cfg = load_model(run_dir, allow_hub=allow_hub)
        self.trained_n_patches = cfg.n_patches
        if n_patches is not None:
            cfg.n_patches = n_patches
            cfg.check()
        self.cfg: Config = cfg
        self.classes = list(cfg.classes)
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model: ATSModel = model.to(self.device)
        self.amp = amp  # this machine's choice: never the training run's (see config.Runtime)
        self.autocast = autocast_factory(self.device, amp)
        self.mc, self.topk, self.seed, self.workers = (1 if topk else mc), topk, seed, workers
        self.backend, self.mpp = backend, mpp

    def view(self, path: Path) -> tuple[Slide, PreparedView]:
        """Open the slide and read its view; the warnings about it travel in `view.notes` (safe in threads).

        The slide stays open: the patches are read from this handle (a file replaced between the view and
        the patches cannot mix two slides); the caller closes it."""
        with collect_notes() as notes:
            slide = open_slide(path, backend=self.backend, mpp=self.mpp)
            try:
                view = prepare_view(slide, self.cfg)
            except BaseException:
                slide.close()
                raise
        view.notes = notes
        return slide, view

    def predict_view(self, path: Path, view: PreparedView, reader: PatchReader) -> Prediction:
        """Run the passes on one slide's prepared view."""
        pred = Prediction(slide_id(path), path, fell_back=view.fell_back, mpp=view.mpp, mpp_source=view.mpp_source,
                          notes=list(view.notes))
        passes = []
        with torch.no_grad():
            for k in range(self.mc):
                out = forward_batch(
                    self.model, [SlideBatchItem(path, view)], cfg=self.cfg, reader=reader,
                    mode="topk" if self.topk else "sample", generator=seeded_generator(self.seed, k),
                    device=self.device, workers=self.workers or None, autocast=self.autocast,
                )
                probs = torch.softmax(out.logits.float(), -1)[0].cpu().tolist()
                passes.append(probs)
                for box, a, w in zip(out.boxes[0], out.sampled_attention[0].tolist(), out.weights[0].tolist()):
                    x, y, bw, bh = (int(v) for v in box)
                    pred.patches.append({"pass": k, "x": x, "y": y, "width": bw, "height": bh,
                                         "attention": a, "weight": w})
                if out.nested:
                    self._add_regions(pred, out.nested[0], k)
                pred.n_patches += len(out.boxes[0])
                if k == 0:
                    pred.notes += self.unlike_training(path, view, len(out.boxes[0]))
        arr = np.asarray(passes)
        if not np.isfinite(arr).all():
            raise WsiatsError(f"{path}: the model's output is not a number (NaN or infinite probabilities)")
        pred.passes = passes
        pred.probs = arr.mean(0).tolist()
        pred.spread = float(arr[:, int(arr.mean(0).argmax())].std()) if len(passes) > 1 else 0.0
        return pred

    @staticmethod
    def _add_regions(pred: Prediction, picks: Any, k: int) -> None:
        """Nested sampling: the pass's picked regions (coarse attention a1, weight C_m, patch count) and, on each of
        its patches, the region it came from and its fine attention a2(i | region) (its `attention` is a1 a2)."""
        counts = np.bincount(picks.patch_region, minlength=len(picks.regions))
        first = len(pred.regions)
        for m, (box, a, w) in enumerate(zip(picks.region_boxes, picks.region_attention.tolist(),
                                            picks.region_weights.tolist())):
            x, y, bw, bh = (int(v) for v in box)
            pred.regions.append({"pass": k, "x": x, "y": y, "width": bw, "height": bh, "attention": a, "weight": w,
                                 "patches": int(counts[m])})
        for rec, m, a2 in zip(pred.patches[len(pred.patches) - len(picks.patch_region):], picks.patch_region,
                              picks.cell_attention.tolist()):
            rec.update(region=first + int(m), cell_attention=a2)

    def unlike_training(self, path: Path, view: PreparedView, sampled: int) -> list[str]:
        """Warnings for a slide the model sees unlike its training slides: another resolution (when the view or
        the patches are set as downsamples, they then show another magnification), or fewer patches."""
        cfg, notes = self.cfg, []
        parts = [name for name, physical in (("view", cfg.view_mpp), ("patches", cfg.patch_mpp)) if physical is None]
        if cfg.train_mpp and view.mpp and parts and abs(view.mpp / cfg.train_mpp - 1) > MPP_TOLERANCE:
            what = "the view shows" if parts == ["view"] else f"the {' and '.join(parts)} show"
            notes.append(f"{path}: resolution {view.mpp:.3g} um/px, {view.mpp / cfg.train_mpp:.2f}x the training "
                         f"slides' {cfg.train_mpp:.3g} um/px: {what} another magnification than the model learned "
                         "(pass --mpp if the file's resolution is wrong)")
        if sampled < cfg.n_patches:
            notes.append(f"{path}: only {sampled} of {cfg.n_patches} patches could be sampled (the view has "
                         f"{int(view.mask.sum())} cell(s) to sample from); the model was trained with "
                         f"{self.trained_n_patches}")
        return notes

    def predict(self, paths: Sequence[Path], *, lookahead: int = 2) -> Iterator[Prediction]:
        """Yield one Prediction per path, in order; a failing slide yields its error.

        Each slide is opened once: its view and its patches are read from that one handle."""
        executor = ThreadPoolExecutor(max_workers=max(1, min(lookahead, len(paths))))
        futures: dict[int, Future[tuple[Slide, PreparedView]]] = {}
        try:
            for i, path in enumerate(paths):
                for j in range(i, min(i + lookahead + 1, len(paths))):
                    if j not in futures:
                        futures[j] = executor.submit(self.view, paths[j])
                t0 = time.perf_counter()
                try:
                    slide, view = futures.pop(i).result()
                    with slide:
                        pred = self.predict_view(path, view, OpenedSlide(slide))
                except WsiatsError as exc:
                    pred = Prediction(slide_id(path), path, error=str(exc))
                except (OSError, RuntimeError, ValueError, MemoryError) as exc:
                    pred = Prediction(slide_id(path), path, error=f"{path}: {type(exc).__name__}: {exc}")
                pred.seconds = time.perf_counter() - t0
                log.info("%s: %s in %.3f s", path, pred.error or f"p={[round(p, 4) for p in pred.probs]}", pred.seconds)
                yield pred
        finally:
            for fut in futures.values():
                fut.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
            for fut in futures.values():  # views read ahead for slides never predicted: close their slides
                if not fut.cancelled() and fut.exception() is None:
                    fut.result()[0].close()


@dataclass
class PredictionRun:
    """What `predict_slides` returns on every process: all predictions, in the order of the paths."""

    predictions: list[Prediction]
    classes: list[str]
    mc: int
    rank: int = 0  # under torchrun, only rank 0 writes and reports
    metrics: dict[str, Any] | None = None  # with `truth`: accuracy, AUC, confusion of the labelled slides


def predict_slides(
    run_dir: str | Path,
    paths: Sequence[Path],
    *,
    device: str = "auto",
    truth: dict[str, str] | None = None,
    labels_file: str | Path | None = None,
    progress: bool = False,
    on_prediction: Callable[[Prediction], None] | None = None,
    **options: Any,
) -> PredictionRun:
    """Predict `paths` with the model of `run_dir` (`options`: those of Predictor), across processes under
    torchrun (each rank takes every world_size-th slide; all get every prediction back, in order).

    With `truth` (slide_id -> label, read from `labels_file`), the labels are checked against the model's
    classes before any slide is read, and the result carries their metrics. `on_prediction` sees each of
    this process's predictions as it comes (to report its notes).
    """
    ctx, dev = distributed.setup(device)
    try:
        predictor = Predictor(run_dir, device=dev, **options)
        if truth is not None:
            check_labels(truth, paths, predictor.classes, source=labels_file)
        mine = distributed.shard(ctx, len(paths))
        done = []
        for i, pred in zip(mine, track(predictor.predict([paths[i] for i in mine]), total=len(mine),
                                       description="predicting", disable=not progress or not ctx.is_main,
                                       unit="slide", label=lambda p: p.slide_id + ("" if p.ok else " (failed)"))):
            if on_prediction is not None:
                on_prediction(pred)
            done.append((i, pred))
        preds = [p for _, p in sorted((pair for part in distributed.gather(ctx, done) for pair in part),
                                      key=lambda pair: pair[0])]
    finally:
        distributed.teardown(ctx)
    metrics = None if truth is None else label_metrics(preds, truth, predictor.classes)
    return PredictionRun(preds, predictor.classes, predictor.mc, ctx.rank, metrics)


def check_labels(truth: dict[str, str], paths: Sequence[Path], classes: Sequence[str], *,
                 source: str | Path | None = None) -> None:
    """Before any slide is read: some of the slides have a label, and every such label is a class of the model."""
    found = [truth[slide_id(p)] for p in paths if slide_id(p) in truth]
    if not found:
        raise LabelsError(f"{source}: none of the slides to predict has a label (slide_id is the file name "
                          "without its extension)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise LabelsError(f"{source}: label(s) {', '.join(unknown)} are not classes of the model ({', '.join(classes)})")


def label_metrics(preds: Sequence[Prediction], truth: dict[str, str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC and confusion of the predicted slides that have a label (`n` of them;
    `classes`: the order of the confusion matrix's rows, the truth, and columns, the prediction)."""
    ok = [p for p in preds if p.ok and p.slide_id in truth]
    if not ok:  # every labelled slide failed
        return {"n": 0, "classes": list(classes)}
    y = np.array([list(classes).index(truth[p.slide_id]) for p in ok])
    m = classification_metrics(y, np.array([p.probs for p in ok]), n_classes=len(classes))
    m["n"] = len(ok)
    m["classes"] = list(classes)
    return m


def prediction_label(pred: Prediction, classes: Sequence[str]) -> str:
    return classes[int(np.argmax(pred.probs))] if pred.ok else ""


def csv_columns(classes: Sequence[str]) -> list[str]:
    return ["slide_id", "path", "prediction", *[f"p_{c}" for c in classes], "spread", "n_patches", "seconds", "mpp",
            "mpp_source", "tissue_fallback", "warnings", "error"]


def _row(pred: Prediction, classes: Sequence[str], *, missing: str | None = "") -> dict[str, Any]:
    """One slide's record; numbers a failed slide lacks are `missing` ("" in CSV, None -> null in JSON)."""
    row: dict[str, Any] = {"slide_id": pred.slide_id, "path": str(pred.path), "prediction": prediction_label(pred, classes)}
    for c, p in zip(classes, pred.probs or [math.nan] * len(classes)):
        row[f"p_{c}"] = missing if math.isnan(p) else round(p, 6)
    row.update(spread=round(pred.spread, 6) if pred.ok else missing, n_patches=pred.n_patches,
               seconds=round(pred.seconds, 4), mpp=missing if pred.mpp is None else round(pred.mpp, 6),
               mpp_source=pred.mpp_source or "", tissue_fallback=pred.fell_back, warnings=" | ".join(pred.notes),
               error=pred.error)
    return row


def write_predictions(path: str | Path, preds: Sequence[Prediction], classes: Sequence[str], *, extra: dict[str, Any] | None = None) -> None:
    """CSV (one row per slide) or JSON (rows plus sampled patches), chosen by the suffix; atomic."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=csv_columns(classes), lineterminator="\n")
            writer.writeheader()
            for pred in preds:
                writer.writerow(_row(pred, classes))
    elif path.suffix.lower() == ".json":
        slides = []
        for pred in preds:
            rec = _row(pred, classes, missing=None)
            rec["passes"] = pred.passes
            rec["patches"] = pred.patches
            if pred.regions:
                rec["regions"] = pred.regions
            rec["warnings"] = pred.notes
            slides.append(rec)
        doc = json_safe({"classes": list(classes), **(extra or {}), "slides": slides})
        with atomic_open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, allow_nan=False)
    else:
        raise ConfigError(f"{path}: --out must end in .csv or .json")
