"""The paper's Tables 1/2 on a synthetic cohort: ATS-N against U-N, dense attention-MIL and a view CNN.

On a `wsiats synth` cohort (48 slides of 4096 px, test split from labels.csv; cached in
benchmarks/.cache/), for several training seeds:

- ATS-N (learned attention) and U-N (uniform attention), for two values of N: trained with
  `wsiats.train.train` and the demo settings (`wsiats.demo.DEMO_CONFIG`), tested with
  `wsiats.predict.Predictor` (one sampling pass, as `wsiats predict` does by default);
- dense attention-MIL (Ilse et al. 2018, gated attention pooling) over the features of EVERY
  tissue tile (the same `patch_size` grid and tissue mask as bench_predict.py), with the same
  L2-normalised small-CNN feature network trained end to end, the same optimiser (AdamW, weight
  decay, gradient clipping) and the same validation-based model selection;
- a small CNN classifier on the low-resolution view alone (what the view can tell).

For each method: test error (mean and standard error over seeds), final-epoch training loss,
and, for one training step on one slide (batch 1) in a fresh process, the wall time (median of
`--steps` steps after two warm-up steps) and the peak memory: the rise of the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before the slide's inputs were
loaded, once the libraries were initialised by a step on a dummy input. It counts the inputs
(view or tiles), activations, gradients and the allocator's temporaries. The bytes of the
tensors autograd saves for the backward pass are reported beside it.

    python benchmarks/bench_learning.py              # ~9 min on 2 quiet cores, ~14 under load (RESULTS.md)
    python benchmarks/bench_learning.py --smoke --out /tmp/learning.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - beside this script
    ROOT,
    code_hash,
    code_version,
    ensure_cohort,
    gated_pool,
    json_safe,
    load_average,
    machine_info,
    prune_stale,
    reset_peak_rss,
    run_child,
    set_omp_policy,
    status_mb,
    tissue_tile_centers,
)

#: Targets of issue 5.
ERROR_MARGIN = 0.03  # ATS test error within this of dense MIL
UNIFORM_FACTOR = 0.5  # ATS test error at most this times U-N's
COST_FACTOR = 10.0  # dense MIL at least this many times ATS's time and memory per sample


#: The paper's U-N baseline: uniform sampling of N cells and the mean estimator (ATS pooling, no candidates,
#: no zoom). With only --attention uniform, the default training (gated MIL over IPS-selected candidates)
#: would run with a uniform view attention, a different method.
UNIFORM_ROW = {"attention": "uniform", "pooling": "ats", "candidates": 0, "zoom": 0.0}


def _row_cfg(attention: str, **overrides: Any) -> Any:
    """The demo settings of an ATS-N (attention 'learned') or U-N (attention 'uniform') row."""
    return _demo_cfg(**overrides, **(UNIFORM_ROW if attention == "uniform" else {"attention": attention}))


def _demo_cfg(**overrides: Any) -> Any:
    from wsiats.config import resolve
    from wsiats.demo import DEMO_CONFIG

    return resolve(overrides={**DEMO_CONFIG, **overrides})


def method_name(kind: str, n: int | None = None) -> str:
    return {"ats": f"ats_{n}", "uniform": f"u_{n}"}.get(kind, kind)


# --- the cohort ---------------------------------------------------------------------------------------------------


def splits(cohort: Path, seed: int) -> tuple[list[str], list[Any], list[Any], list[Any]]:
    """Classes and the train / val / test items exactly as `wsiats.train.train` splits them for `seed`."""
    from wsiats.data import build_cohort, split_items

    items, classes = build_cohort(cohort / "slides", cohort / "labels.csv")
    train, val, test = split_items(items, val_fraction=_demo_cfg().val_fraction, seed=seed)
    return classes, train, val, test


# --- ATS-N and U-N: the product --------------------------------------------------------------------------------


def run_ats(cohort: Path, runs: Path, *, attention: str, n: int, seed: int, epochs: int,
            overrides: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    """Train with `wsiats.train.train` (demo settings, then `overrides`, cached as `name`) and test with
    `Predictor`; cached per code version."""
    from wsiats.predict import Predictor
    from wsiats.train import train

    run = runs / f"{name or method_name('ats' if attention == 'learned' else 'uniform', n)}_s{seed}_e{epochs}" \
        f"{'_paper' if attention == 'uniform' and not name else ''}"
    info_path = run / "bench_info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    shutil.rmtree(run, ignore_errors=True)
    cfg = _row_cfg(attention, seed=seed, epochs=epochs, n_patches=n, **(overrides or {}))
    t0 = time.perf_counter()
    result = train(cohort / "slides", cohort / "labels.csv", run, cfg, progress=False)
    train_s = time.perf_counter() - t0
    _, _, _, test = splits(cohort, seed)
    preds = list(Predictor(run, device="cpu", mc=1, seed=seed).predict([it.path for it in test]))
    failed = [p.error for p in preds if not p.ok]
    if failed:
        raise RuntimeError(f"prediction failed: {failed[0]}")
    wrong = [int(np.argmax(p.probs)) != it.label for p, it in zip(preds, test)]
    best = result.history[result.best_epoch]
    info = {"test_error": float(np.mean(wrong)), "train_loss": result.history[-1]["train_loss"],
            "best_epoch": result.best_epoch + 1, "best_val_acc": best["val_acc"], "train_s": train_s,
            "n_test": len(test)}
    info_path.write_text(json.dumps(json_safe(info), indent=1))
    return info


# --- dense attention-MIL and the view CNN (written here) --------------------------------------------------------


@functools.cache
def _model_classes() -> tuple[type, type]:
    """Defined on first use, so that torch loads after OMP_WAIT_POLICY is set."""
    import torch
    from torch import nn

    from wsiats.models import create_feature_net, normalize_images

    class DenseMIL(nn.Module):
        """Attention-MIL over every tile: the ATS feature network, gated attention pooling, a linear classifier."""

        def __init__(self, *, n_classes: int, feature_dim: int) -> None:
            super().__init__()
            self.feature_net = create_feature_net("small-cnn", width=feature_dim)
            self.pool = gated_pool(self.feature_net.out_dim)
            self.classifier = nn.Linear(self.feature_net.out_dim, n_classes)

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:
            """tiles [n, 3, p, p] uint8 of one slide -> logits [1, C]."""
            return self.classifier(self.pool(self.feature_net(tiles))[None])

    class ViewCNN(nn.Module):
        """A small CNN on the low-resolution view alone: four 3x3 conv blocks, global average pool, linear."""

        def __init__(self, *, n_classes: int, width: int = 32) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            chans = [3, width // 2, width, 2 * width, 2 * width]
            for i in range(4):
                layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(inplace=True)]
                if i < 3:
                    layers.append(nn.MaxPool2d(2))
            self.net = nn.Sequential(*layers)
            self.classifier = nn.Linear(chans[-1], n_classes)

        def forward(self, views: torch.Tensor) -> torch.Tensor:
            """views [B, 3, h, w] uint8 -> logits [B, C]."""
            return self.classifier(self.net(normalize_images(views)).mean(dim=(2, 3)))

    return DenseMIL, ViewCNN


def load_tiles(path: Path, cfg: Any, *, workers: int) -> Any:
    """Every tissue tile of a slide (uint8 [n, 3, p, p]): the grid of bench_predict.py at level 0."""
    import torch

    from wsiats.slide import open_slide
    from wsiats.view import prepare_view

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_slide(path) as slide:
            view = prepare_view(slide, cfg)
            centers, _ = tissue_tile_centers(view.mask, view.downsample, slide.dimensions, cfg.patch_size)
            pixels = slide.read_patches(centers, cfg.patch_size, workers=workers)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def load_view(path: Path, cfg: Any) -> Any:
    """The view as training sees it (with its exploration distribution when cfg trains with candidates)."""
    from wsiats.slide import open_slide
    from wsiats.view import prepare_view, with_exploration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_slide(path) as slide:
            view = prepare_view(slide, cfg)
    with_exploration(view, cfg)
    return view


def _view_tensor(view: Any, augment: Any) -> Any:
    import torch

    return augment.images(torch.from_numpy(view.image).permute(2, 0, 1))[None]


def fit(model: Any, train: Sequence[Any], val: Sequence[Any], test: Sequence[Any], *,
        logits_of: Callable[[Any, bool, Any], Any], epochs: int, lr: float, batch: int, seed: int,
        n_classes: int) -> dict[str, Any]:
    """Train with AdamW + clipping (the product's optimiser), keep the best epoch on validation, test it.

    `logits_of(item, training, generator)` -> logits [1, C] of one slide.
    """
    import torch
    import torch.nn.functional as F

    from wsiats.loss import class_weights

    cfg = _demo_cfg(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    weight = class_weights([it.label for it in train], n_classes) if cfg.class_weighting else None
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history, best_key, best_state, best_epoch = [], (-math.inf, -math.inf), None, 0
    t0 = time.perf_counter()

    def evaluate(items: Sequence[Any]) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([logits_of(it, False, gen) for it in items])
        model.train()
        y = torch.tensor([it.label for it in items])
        return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))

    for epoch in range(epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(order), batch):
            chunk = [train[i] for i in order[start: start + batch]]
            logits = torch.cat([logits_of(it, True, gen) for it in chunk])
            y = torch.tensor([it.label for it in chunk])
            loss = F.cross_entropy(logits, y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            total += float(F.cross_entropy(logits.detach(), y)) * len(chunk)
        row = {"epoch": epoch + 1, "train_loss": total / len(train)}
        if val:
            row["val_acc"], row["val_loss"] = evaluate(val)
            key = (row["val_acc"], -row["val_loss"])
        else:
            key = (float(epoch), 0.0)
        history.append(row)
        if key > best_key:
            best_key, best_epoch, best_state = key, epoch, copy.deepcopy(model.state_dict())
    train_s = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    acc, _ = evaluate(test)
    return {"test_error": 1.0 - acc, "train_loss": history[-1]["train_loss"], "best_epoch": best_epoch + 1,
            "best_val_acc": history[best_epoch].get("val_acc"), "train_s": train_s, "history": history,
            "n_test": len(test)}


def run_dense(cohort: Path, tiles: dict[str, Any], *, seed: int, epochs: int, lr: float) -> dict[str, Any]:
    import torch

    classes, train, val, test = splits(cohort, seed)
    cfg = _demo_cfg(seed=seed)
    torch.manual_seed(seed)
    dense_cls, _ = _model_classes()
    model = dense_cls(n_classes=len(classes), feature_dim=cfg.feature_dim)
    # batch 1, as Ilse et al.: every step already holds a whole slide's tiles
    return fit(model, train, val, test, logits_of=lambda it, training, g: model(tiles[it.slide_id]),
               epochs=epochs, lr=lr, batch=1, seed=seed, n_classes=len(classes))


def run_view_cnn(cohort: Path, views: dict[str, Any], *, seed: int, epochs: int) -> dict[str, Any]:
    import torch

    from wsiats.view import Augment

    classes, train, val, test = splits(cohort, seed)
    cfg = _demo_cfg(seed=seed)
    torch.manual_seed(seed)
    _, view_cls = _model_classes()
    model = view_cls(n_classes=len(classes))

    def logits_of(it: Any, training: bool, gen: Any) -> Any:
        augment = Augment.draw(gen) if training and cfg.augment else Augment()  # the product's augmentation
        return model(_view_tensor(views[it.slide_id], augment))

    return fit(model, train, val, test, logits_of=logits_of, epochs=epochs, lr=cfg.lr, batch=cfg.batch_size,
               seed=seed, n_classes=len(classes))


# --- one training step on one slide: time and memory (in a fresh process) --------------------------------------


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block."""
    import torch

    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage.nbytes()
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _step_setup(method: str, spec: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any], None], Callable[[], None]]:
    """(load the slide's inputs, one training step on them, a step on a dummy input) for `method`."""
    import torch
    import torch.nn.functional as F

    from wsiats._tiff import TILE_CACHE
    from wsiats.checkpoint import build_model
    from wsiats.forward import SlideBatchItem, forward_batch
    from wsiats.loss import loss_fn
    from wsiats.reader import SlidePool
    from wsiats.runtime import autocast_factory
    from wsiats.train import training_mode
    from wsiats.view import Augment

    path, label, classes = Path(spec["slide"]), int(spec["label"]), spec["classes"]
    y = torch.tensor([label])
    gen = torch.Generator().manual_seed(0)
    if method.startswith(("ats_", "u_")):
        n = int(method.split("_")[1])
        cfg = _row_cfg("learned" if method.startswith("ats_") else "uniform", n_patches=n)
        cfg.classes = list(classes)
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        pool = SlidePool()
        autocast = autocast_factory(torch.device("cpu"), cfg.amp)

        def ats_step(view: Any) -> None:  # as wsiats.train._train_epoch does it, for a batch of one slide
            # each timed step reads its own patches, as a step of an epoch over many slides does: the decoded
            # tiles of the previous step (the same slide here) must not be found in the tile cache
            TILE_CACHE.clear()
            item = SlideBatchItem(path, view, Augment.draw(gen) if cfg.augment else Augment())
            out = forward_batch(model, [item], cfg=cfg, reader=pool, mode=training_mode(cfg), generator=gen,
                                device=torch.device("cpu"), workers=cfg.workers or None, autocast=autocast)
            loss, _ = loss_fn(out, y, cfg=cfg, weight=None, classifier=model.classifier)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()

        def ats_dummy() -> None:  # the networks on a 16 x 16 view and one patch: initialises the libraries
            image = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
            loss = model.attention_net(image).sum() + model.feature_net(
                torch.zeros(1, 3, cfg.patch_size, cfg.patch_size, dtype=torch.uint8)).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return (lambda: load_view(path, cfg)), ats_step, ats_dummy
    cfg = _demo_cfg()
    dense_cls, view_cls = _model_classes()
    torch.manual_seed(0)
    if method == "dense_mil":
        model = dense_cls(n_classes=len(classes), feature_dim=cfg.feature_dim)
        lr = float(spec["dense_lr"])
        load: Callable[[], Any] = lambda: load_tiles(path, cfg, workers=2)  # noqa: E731
        run: Callable[[Any], Any] = model
        dummy_input = torch.zeros(2, 3, cfg.patch_size, cfg.patch_size, dtype=torch.uint8)
    elif method == "view_cnn":
        model = view_cls(n_classes=len(classes))
        lr = cfg.lr
        load = lambda: load_view(path, cfg)  # noqa: E731
        run = lambda view: model(_view_tensor(view, Augment.draw(gen)))  # noqa: E731
        dummy_input = None
    else:
        raise ValueError(f"unknown method {method!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)

    def step(inputs: Any) -> None:
        loss = F.cross_entropy(run(inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()

    def dummy() -> None:
        out = model(dummy_input) if dummy_input is not None else model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
        out.sum().backward()
        model.zero_grad(set_to_none=True)

    return load, step, dummy


def _nbytes(inputs: Any) -> int:
    if hasattr(inputs, "image"):  # a PreparedView
        return int(inputs.image.nbytes + inputs.mask.nbytes)
    return int(inputs.untyped_storage().nbytes())


def _child_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Per method: peak memory of the first training step on the slide, then the median step time."""
    import torch

    out = {}
    for method in spec["methods"]:
        load, step, dummy = _step_setup(method, spec)
        dummy()
        gc.collect()
        before = status_mb("VmRSS")
        reset = reset_peak_rss()
        inputs = load()
        with saved_tensor_bytes() as saved:
            step(inputs)
        peak = status_mb("VmHWM") - before
        for _ in range(2):  # warm-up
            step(inputs)
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            step(inputs)
            times.append(time.perf_counter() - t0)
        out[method] = {"time_per_sample_s": float(np.median(times)), "times_s": times, "peak_mem_mb": peak,
                       "peak_rss_reset": reset, "saved_activations_mb": saved[0] / 2**20,
                       "input_mb": _nbytes(inputs) / 2**20,
                       "tiles": int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else None}
        del load, step, dummy, inputs
        gc.collect()
    return out


# --- main ---------------------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is not positive (a memory rise can be 0 when freed pages are reused)."""
    return a / b if b > 0 else None


def _mean_sem(values: Sequence[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    sem = float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else None
    return float(arr.mean()), sem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--n", type=int, default=48, help="slides in the cohort (a quarter are test slides)")
    parser.add_argument("--size", type=int, default=4096, help="level-0 side of each slide")
    parser.add_argument("--cohort-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--n-patches", type=int, nargs="+", default=[5, 10], help="values of N for ATS-N and U-N")
    parser.add_argument("--epochs", type=int, default=None, help="ATS / U-N epochs (default: the demo's)")
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--dense-lr", type=float, default=1e-3,
                        help="dense MIL learning rate (Ilse et al. use 5e-4 with Adam; batch 1)")
    parser.add_argument("--cnn-epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per method (after 2 warm-ups)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                        help="OpenMP threads sleep (passive) or spin (active) when idle; spinning collapses under "
                             "a shared machine's load")
    parser.add_argument("--smoke", action="store_true", help="tiny cohort, one epoch: checks the script runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child_step(json.loads(args.child))))
        return 0
    set_omp_policy(args.omp_wait_policy)
    if args.smoke:
        args.n, args.size, args.seeds, args.epochs = 8, 512, [0, 1], 1
        args.dense_epochs, args.cnn_epochs, args.steps = 1, 1, 2
    started = time.perf_counter()
    load_start = load_average()
    cfg = _demo_cfg()
    epochs = args.epochs or cfg.epochs
    args.cache.mkdir(parents=True, exist_ok=True)
    cohort, cohort_s = ensure_cohort(args.cache, n=args.n, size=args.size, seed=args.cohort_seed)
    runs = args.cache / f"learning_runs_{args.n}x{args.size}_s{args.cohort_seed}_{code_hash()}"
    prune_stale(args.cache, "learning_runs_", runs)
    classes, _, _, test = splits(cohort, args.seeds[0])
    per_seed: dict[str, list[dict[str, Any]]] = {}
    phase_s: dict[str, float] = {}

    t0 = time.perf_counter()
    for seed in args.seeds:
        for n in args.n_patches:
            for kind, attention in (("ats", "learned"), ("uniform", "uniform")):
                res = run_ats(cohort, runs, attention=attention, n=n, seed=seed, epochs=epochs)
                per_seed.setdefault(method_name(kind, n), []).append({"seed": seed, **res})
    phase_s["ats_and_uniform"] = time.perf_counter() - t0

    from wsiats.data import build_cohort

    items, _ = build_cohort(cohort / "slides", cohort / "labels.csv")
    t0 = time.perf_counter()
    tiles = {it.slide_id: load_tiles(it.path, cfg, workers=2) for it in items}
    phase_s["dense_read_tiles"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for seed in args.seeds:
        res = run_dense(cohort, tiles, seed=seed, epochs=args.dense_epochs, lr=args.dense_lr)
        per_seed.setdefault("dense_mil", []).append({"seed": seed, **res})
    phase_s["dense_mil"] = time.perf_counter() - t0
    tile_counts = [int(t.shape[0]) for t in tiles.values()]
    del tiles
    gc.collect()

    t0 = time.perf_counter()
    views = {it.slide_id: load_view(it.path, cfg) for it in items}
    for seed in args.seeds:
        res = run_view_cnn(cohort, views, seed=seed, epochs=args.cnn_epochs)
        per_seed.setdefault("view_cnn", []).append({"seed": seed, **res})
    phase_s["view_cnn"] = time.perf_counter() - t0

    # one training step on one positive training slide, per method, each in a fresh process
    _, train_items, _, _ = splits(cohort, args.seeds[0])
    slide = next(it for it in train_items if classes[it.label] == "positive")
    methods = list(per_seed)
    spec = {"kind": "step", "slide": str(slide.path), "label": slide.label, "classes": classes, "steps": args.steps,
            "dense_lr": args.dense_lr}
    script = Path(__file__).resolve()
    t0 = time.perf_counter()
    if args.smoke:  # one process for all: seconds instead of a minute (memory figures are then not clean)
        steps = run_child(script, {**spec, "methods": methods})
    else:
        steps = {}
        for m in methods:
            steps.update(run_child(script, {**spec, "methods": [m]}))
    phase_s["per_sample"] = time.perf_counter() - t0
    load_end = load_average()

    report_methods: dict[str, Any] = {}
    for name, rows in per_seed.items():
        err, err_sem = _mean_sem([r["test_error"] for r in rows])
        loss, loss_sem = _mean_sem([r["train_loss"] for r in rows])
        report_methods[name] = {
            "test_error": err, "test_error_sem": err_sem, "train_loss": loss, "train_loss_sem": loss_sem,
            "time_per_sample_s": steps[name]["time_per_sample_s"], "peak_mem_mb": steps[name]["peak_mem_mb"],
            "saved_activations_mb": steps[name]["saved_activations_mb"], "input_mb": steps[name]["input_mb"],
            "per_seed": rows, "step": steps[name],
        }
    ats_ref = method_name("ats", max(args.n_patches))
    dense = report_methods["dense_mil"]
    targets: dict[str, Any] = {}
    for n in args.n_patches:
        a, u = report_methods[method_name("ats", n)], report_methods[method_name("uniform", n)]
        diff = a["test_error"] - dense["test_error"]
        targets[f"ats_{n}_error_within_{ERROR_MARGIN}_of_dense"] = {
            "ats": a["test_error"], "dense": dense["test_error"], "difference": diff, "met": bool(abs(diff) <= ERROR_MARGIN + 1e-12)}
        targets[f"ats_{n}_error_at_most_half_of_u_{n}"] = {
            "ats": a["test_error"], "uniform": u["test_error"], "met": bool(a["test_error"] <= UNIFORM_FACTOR * u["test_error"] + 1e-12)}
        targets[f"dense_time_at_least_{COST_FACTOR:g}x_ats_{n}"] = {
            "ratio": _ratio(dense["time_per_sample_s"], a["time_per_sample_s"]),
            "met": bool(dense["time_per_sample_s"] >= COST_FACTOR * a["time_per_sample_s"])}
        targets[f"dense_memory_at_least_{COST_FACTOR:g}x_ats_{n}"] = {
            "ratio": _ratio(dense["peak_mem_mb"], a["peak_mem_mb"]),
            "met": bool(dense["peak_mem_mb"] >= COST_FACTOR * a["peak_mem_mb"])}
    report = {
        "benchmark": "learning",
        "smoke": args.smoke,
        "methods": report_methods,
        "time_ratio_dense_over_ats": _ratio(dense["time_per_sample_s"], report_methods[ats_ref]["time_per_sample_s"]),
        "memory_ratio_dense_over_ats": _ratio(dense["peak_mem_mb"], report_methods[ats_ref]["peak_mem_mb"]),
        "ratios_against": ats_ref,
        "targets": targets,
        "cohort": {"path": str(cohort.relative_to(ROOT) if cohort.is_relative_to(ROOT) else cohort), "n": args.n,
                   "size": args.size, "seed": args.cohort_seed, "n_test": len(test), "generate_s": cohort_s,
                   "tissue_tiles_per_slide": {"mean": float(np.mean(tile_counts)), "min": min(tile_counts),
                                              "max": max(tile_counts)}},
        "settings": {
            "seeds": args.seeds, "n_patches": args.n_patches, "ats_epochs": epochs,
            "ats_config": "wsiats.demo.DEMO_CONFIG (batch 4, lr 3e-3, view downsample 32, patch 64, AdamW, "
                          "cosine schedule, augmentation; gated pooling over 64 candidates, 16 with gradient)",
            "uniform_config": {"demo settings plus": UNIFORM_ROW},
            "dense_epochs": args.dense_epochs, "dense_lr": args.dense_lr, "dense_batch": 1,
            "cnn_epochs": args.cnn_epochs, "cnn_lr": cfg.lr, "cnn_batch": cfg.batch_size,
            "model_selection": "best validation epoch (accuracy, then loss), as wsiats.train does",
            "test": "ATS/U-N: Predictor, one sampling pass (mc=1) seeded by the training seed",
            "per_sample": "one training step, batch 1, on one positive training slide; time: median of "
                          f"{args.steps} steps after 2 warm-ups; memory: VmHWM rise over the RSS before the "
                          "slide's inputs were loaded, libraries initialised first by a step on a dummy input"
                          + (" (smoke: all methods in one process)" if args.smoke else ", one fresh process per method"),
            "steps": args.steps,
        },
        "phase_s": phase_s,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_end},
        "code": code_version(),
        "wall_s": time.perf_counter() - started,
    }
    from wsiats._io import atomic_open

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w") as fh:
        json.dump(json_safe(report), fh, indent=2, allow_nan=False)
        fh.write("\n")
    summary = {name: {k: m[k] for k in ("test_error", "test_error_sem", "train_loss", "time_per_sample_s", "peak_mem_mb")}
               for name, m in report_methods.items()}
    print(json.dumps({"methods": summary, "time_ratio_dense_over_ats": report["time_ratio_dense_over_ats"],
                      "memory_ratio_dense_over_ats": report["memory_ratio_dense_over_ats"],
                      "targets_met": {k: v["met"] for k, v in targets.items()}, "out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
