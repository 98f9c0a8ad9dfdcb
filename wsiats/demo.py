"""`wsiats demo`: the whole job on a generated cohort (synth, train, predict, heatmap), in a few CPU minutes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiats._io import claim_folder
from wsiats.config import resolve
from wsiats.data import build_cohort, split_items
from wsiats.errors import WsiatsError
from wsiats.heatmap import heatmap_slides
from wsiats.metrics import classification_metrics
from wsiats.predict import Predictor, write_predictions
from wsiats.run import RunFolder
from wsiats.synth import make_cohort
from wsiats.train import train

#: The demo's training settings, tuned so that it learns in a few CPU minutes (see README).
DEMO_CONFIG: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 4,
    "n_patches": 10,
    "patch_size": 64,
    "view_downsample": 32.0,
    "lr": 3e-3,
    "head_lr_scale": 1.0,
    # the demo's regions cover ~5% of a 4k slide's tissue: 64 candidates find them and keep the demo short
    "candidates": 64,
    "train_patches": 16,
    "val_fraction": 0.15,
    "workers": 0,
}


@dataclass
class DemoResult:
    run: Path
    predictions: Path
    heatmaps: Path
    n_test: int
    accuracy: float
    auc: float
    minutes: float


def run_demo(out: str | Path, *, seed: int = 0, n: int = 48, size: int = 4096, epochs: int | None = None,
             overwrite: bool = False, progress: bool = True, say: Callable[[str], None] = lambda text: None,
             on_note: Callable[[str], None] | None = None,
             synthesise: Callable[..., Path] = make_cohort) -> DemoResult:
    """Synthesise a cohort in OUT/cohort, train OUT/run on its train split, predict and draw the held-out test
    split (OUT/predictions.json, OUT/heatmaps/). `say` gets the step lines, `on_note` the warnings about
    slides; `synthesise` is `synth.make_cohort` or a wrapper of it (the CLI's shows a progress bar)."""
    out = Path(out)
    t0 = time.perf_counter()
    note = on_note or (lambda text: None)
    claim_folder(out, command="demo", overwrite=overwrite)  # never writes into a folder of the user's
    cohort = out / "cohort"
    say(f"[1/4] synthesising {n} slides of {size} x {size} px in {cohort}")
    labels = synthesise(cohort, n=n, size=size, seed=seed, test_fraction=0.25, overwrite=overwrite)
    run = RunFolder(out / "run")
    cfg = resolve(overrides={**DEMO_CONFIG, "seed": seed, **({"epochs": epochs} if epochs else {})})
    say(f"[2/4] training for {cfg.epochs} epochs into {run.path}")

    def show(row: dict[str, float]) -> None:
        say(f"  epoch {int(row['epoch'])}/{cfg.epochs}: train loss {row['train_loss']:.3f} acc "
            f"{row['train_acc']:.3f}  val acc {row['val_acc']:.3f}  entropy {row['attention_entropy']:.2f}")

    train(cohort / "slides", labels, run.path, cfg, on_epoch=show, progress=progress, on_note=note)
    items, classes = build_cohort(cohort / "slides", labels)
    _, _, test = split_items(items, val_fraction=0, seed=seed)
    say(f"[3/4] predicting {len(test)} held-out slides")
    predictor = Predictor(run.path, mc=1, seed=seed)
    preds = []
    for pred in predictor.predict([it.path for it in test]):
        for text in pred.notes:
            note(text)
        preds.append(pred)
    pred_file = out / "predictions.json"
    write_predictions(pred_file, preds, predictor.classes, extra={"model": str(run.path)})
    failed = [p for p in preds if not p.ok]
    if failed:
        raise WsiatsError(f"{len(failed)} slide(s) failed: {failed[0].error}")
    m = classification_metrics(np.array([it.label for it in test]), np.array([p.probs for p in preds]),
                               n_classes=len(classes))
    heat_dir = out / "heatmaps"
    say(f"[4/4] drawing heatmaps of the held-out slides into {heat_dir}")
    for result in heatmap_slides([it.path for it in test], run.path, heat_dir, top=20):
        for text in result.notes:
            note(text)
    minutes = (time.perf_counter() - t0) / 60
    auc, accuracy = float(m["auc"]), float(m["accuracy"])  # type: ignore[arg-type]
    say(f"demo done in {minutes:.1f} min: test accuracy {accuracy:.3f} on {len(test)} held-out slides "
        f"(AUC {'n/a' if auc != auc else f'{auc:.3f}'}).\n"
        f"  model {run.model}\n  predictions {pred_file}\n  heatmaps {heat_dir}/")
    return DemoResult(run.path, pred_file, heat_dir, len(test), accuracy, auc, minutes)
