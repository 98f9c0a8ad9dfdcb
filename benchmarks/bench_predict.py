"""Benchmark `wsiats predict` on a gigapixel slide against dense reading, dense MIL and the floor.

On a generated slide of >= 2 gigapixels (cached in benchmarks/.cache/), with a model trained
once on a small synthetic cohort with the demo settings (`wsiats.demo.DEMO_CONFIG`, cached too):

- predict: wall time per slide through the `Predictor` API (median of `--repeat` runs after a
  warm-up, in a fresh process), and peak RSS (VmHWM of a fresh process that loads the model
  and predicts that one slide), on the large slide and on a ~0.15-gigapixel one;
- the floor: the same work as direct calls with no framework around them (open, read_view,
  tissue_mask, attention_net on the view's tissue tiles (`OnTissue`, as predict), smooth_attention +
  sample, read_patches, feature_net, expectation, classifier), timed the same way, interleaved with the predict runs;
- dense read: every tissue tile (a `patch_size` grid at level 0, tissue from the view's mask)
  read with the same reader at the same patch size; also the decode-once bound (every file
  tile that holds tissue decoded exactly once);
- dense MIL inference: every tissue tile through the same feature network, plus attention
  pooling, on top of the dense read.

A part that would take longer than `--full-limit-s` is timed on a random sample of tiles and
extrapolated; the JSON says so (`*_extrapolated`, `*_sampled_tiles`).

    python benchmarks/bench_predict.py               # 46,000 px slide (2.1 Gpx): ~1.5 min once cached,
                                                     # ~4 min more on the first run (slides, cohort, model)
    python benchmarks/bench_predict.py --smoke --out /tmp/predict.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - beside this script; heavy imports (torch, wsiats) happen inside functions
    ROOT,
    code_version,
    ensure_model,
    ensure_slide,
    gated_pool,
    json_safe,
    load_average,
    machine_info,
    median,
    run_child,
    set_omp_policy,
    status_mb,
    tissue_tile_centers,
)

#: Targets of issue 5.
TARGETS = {"predict_over_dense_read": 0.02, "predict_over_floor": 1.5, "rss_ratio_large_over_small": 1.5}
#: Tiles per batch when reading or embedding many tiles (bounded memory, few Python round trips).
_BATCH = 256


# --- children: timing and peak RSS in fresh processes -----------------------------------------------------------


def floor_pass(path: Path, model: Any, cfg: Any, *, workers: int, seed: int) -> tuple[float, dict[str, float], list[float]]:
    """The method with nothing around it: direct calls only. Returns (seconds, seconds per stage, probs)."""
    import torch

    from wsiats import sampling
    from wsiats.data import seeded_generator
    from wsiats.models import OnTissue
    from wsiats.slide import open_slide
    from wsiats.tissue import tissue_mask
    from wsiats.view import cell_centers, patch_downsample, view_downsample

    stages: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages[name] = now - last
        last = now

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch warns that the view array is read-only; it is not written
        with open_slide(path) as slide:
            lap("open")
            view = slide.read_view(downsample=view_downsample(slide, cfg))
            lap("read_view")
            mask = tissue_mask(view.image)
            lap("tissue_mask")
            image = torch.from_numpy(view.image).permute(2, 0, 1)[None]
            logits = OnTissue(model.attention_net, torch.from_numpy(mask))(image)  # as predict: on tissue tiles only
            lap("attention_net")
            att = sampling.smooth_attention(logits, mask=torch.from_numpy(mask).reshape(1, -1), eps=cfg.attention_eps)
            idx, a_k = sampling.sample(att, cfg.n_patches, cfg.replace, generator=seeded_generator(seed, 0))
            lap("softmax_and_sample")
            centers = cell_centers(idx[0].numpy(), mask.shape, view.downsample)
            pixels = slide.read_patches(centers, cfg.patch_size, downsample=patch_downsample(slide, cfg), workers=workers)
            lap("read_patches")
            feats = model.feature_net(torch.from_numpy(pixels).permute(0, 3, 1, 2))
            lap("feature_net")
            pooled = sampling.expectation(a_k, feats[None], cfg.replace)
            probs = torch.softmax(model.classifier(pooled), -1)[0].tolist()
            lap("expectation_and_classifier")
    return time.perf_counter() - t0, stages, probs


def _child_time(spec: dict[str, Any]) -> dict[str, Any]:
    """Predictor and floor timings, interleaved, on each slide; then a profile of one predict."""
    from wsiats.predict import Predictor

    predictor = Predictor(spec["run"], device="cpu", workers=spec["workers"], seed=spec["seed"])
    model, cfg = predictor.model, predictor.cfg
    out: dict[str, Any] = {}
    for name in ("large", "small"):
        path = Path(spec[name])
        pred = list(predictor.predict([path]))[0]  # warm-up
        if not pred.ok:
            raise RuntimeError(pred.error)
        floor_pass(path, model, cfg, workers=spec["workers"], seed=spec["seed"])  # warm-up
        predict_s, floor_s, stages = [], [], []
        for _ in range(spec["repeat"]):
            gc.collect()
            t0 = time.perf_counter()
            list(predictor.predict([path]))
            predict_s.append(time.perf_counter() - t0)
            gc.collect()
            seconds, stage, probs = floor_pass(path, model, cfg, workers=spec["workers"], seed=spec["seed"])
            floor_s.append(seconds)
            stages.append(stage)
        out[name] = {
            "predict_s": predict_s, "floor_s": floor_s,
            "floor_stages_median_s": {k: median([s[k] for s in stages]) for k in stages[0]},
            "predict_probs": pred.probs, "floor_probs": probs,
        }
    prof = cProfile.Profile()
    prof.enable()
    list(predictor.predict([Path(spec["large"])]))
    prof.disable()
    out["profile_large"] = _profile_rows(prof, 14)
    return out


def _profile_rows(prof: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """The n functions with the most own time: where the seconds go."""
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}({func})" if line else func
        rows.append({"function": where, "calls": ncalls, "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:n]


def _child_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads the model and predicts one slide."""
    from wsiats.predict import Predictor

    predictor = Predictor(spec["run"], device="cpu", workers=spec["workers"], seed=spec["seed"])
    loaded = status_mb("VmRSS")
    pred = list(predictor.predict([Path(spec["slide"])]))[0]
    if not pred.ok:
        raise RuntimeError(pred.error)
    return {"peak_rss_mb": status_mb("VmHWM"), "rss_after_model_load_mb": loaded, "rss_at_end_mb": status_mb("VmRSS")}


# --- dense baselines (in the parent) ------------------------------------------------------------------------------


def _timed_batches(fn: Callable[[np.ndarray], Any], items: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        fn(items[i: i + batch])
    return time.perf_counter() - t0


def _sample_or_all(fn: Callable[[np.ndarray], Any], items: np.ndarray, *, sample: int, limit_s: float,
                   rng: np.random.Generator, batch: int) -> dict[str, Any]:
    """Time fn over all items if the estimate from a sample fits in limit_s, else extrapolate from the sample."""
    take = np.sort(rng.choice(len(items), size=min(sample, len(items)), replace=False))  # raster order, like a scan
    fn(items[take[: min(16, len(take))]])  # warm-up: thread pools, caches
    sampled = _timed_batches(fn, items[take], batch)
    estimate = sampled * len(items) / len(take)
    if estimate <= limit_s and len(take) < len(items):
        return {"seconds": _timed_batches(fn, items, batch), "extrapolated": False, "sampled_tiles": len(items),
                "sample_estimate_s": estimate}
    return {"seconds": estimate, "extrapolated": len(take) < len(items), "sampled_tiles": len(take),
            "sample_estimate_s": estimate}


def dense_baselines(path: Path, run: Path, *, workers: int, sample: int, feature_sample: int, limit_s: float,
                    seed: int) -> dict[str, Any]:
    """Dense read (per patch, and decode-once), and dense MIL inference, over every tissue tile."""
    import tifffile
    import torch

    from wsiats.checkpoint import load_model
    from wsiats.slide import open_slide
    from wsiats.view import prepare_view

    model, cfg = load_model(run)
    patch = cfg.patch_size
    rng = np.random.default_rng(seed)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        file_tile = (int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = open_slide(path)
    with slide:
        view = prepare_view(slide, cfg)
        centers, n_grid = tissue_tile_centers(view.mask, view.downsample, slide.dimensions, patch)
        n = len(centers)
        out: dict[str, Any] = {"tissue_tiles": n, "grid_tiles": n_grid, "tissue_fraction": n / n_grid,
                               "reader": f"{slide.backend} Slide.read_patches, {workers} threads"}
        per_patch = _sample_or_all(lambda c: slide.read_patches(c, patch, workers=workers), centers, sample=sample,
                                   limit_s=limit_s, rng=rng, batch=_BATCH)
        out["per_patch"] = per_patch
        if file_tile is not None:  # each file tile holding a tissue tile, read aligned: decoded exactly once
            tw, th = file_tile
            keys = np.unique(np.stack([centers[:, 0] // tw, centers[:, 1] // th], 1).astype(np.int64), axis=0)
            corners = keys * np.array([tw, th])
            once = _sample_or_all(
                lambda c: slide.read_regions([(int(x), int(y)) for x, y in c], 0, (tw, th), workers=workers),
                corners, sample=max(64, sample // ((tw // patch) * (th // patch))), limit_s=limit_s, rng=rng,
                batch=max(1, _BATCH // 16))
            out["decode_once"] = {**once, "file_tiles": len(corners), "file_tile": [tw, th]}
        # dense MIL: the feature network over a sample of tissue tiles, extrapolated to all of them
        take = np.sort(rng.choice(n, size=min(feature_sample, n), replace=False))
        pixels = slide.read_patches(centers[take], patch, workers=workers)
    tiles = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        model.feature_net(tiles[:16])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(tiles), _BATCH):
            model.feature_net(tiles[i: i + _BATCH])
        per_tile = (time.perf_counter() - t0) / len(tiles)
        # attention pooling (Ilse et al. 2018, gated) over every tissue tile's features: timed in full
        dim = model.feature_net.out_dim
        head = gated_pool(dim)
        feats = torch.nn.functional.normalize(torch.randn(n, dim), dim=-1)
        t0 = time.perf_counter()
        model.classifier(head(feats)[None])
        pool_s = time.perf_counter() - t0
    out["features"] = {"seconds": per_tile * n, "extrapolated": len(take) < n, "sampled_tiles": len(take),
                       "per_tile_ms": per_tile * 1e3}
    out["attention_pooling_s"] = pool_s
    out["n_patches_over_tissue_tiles"] = cfg.n_patches / n
    return out


# --- main ---------------------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--large", type=int, default=46_000, help="side of the large slide (46,000 px: 2.1 Gpx)")
    parser.add_argument("--small", type=int, default=12_250, help="side of the small slide (12,250 px: 0.15 Gpx)")
    parser.add_argument("--repeat", type=int, default=5, help="timed predict and floor runs per slide, after a warm-up")
    parser.add_argument("--rss-repeats", type=int, default=2, help="fresh processes per peak-RSS measurement")
    parser.add_argument("--workers", type=int, default=2, help="patch-reading threads (the CLI's default)")
    parser.add_argument("--cohort-n", type=int, default=48, help="slides in the cohort the model is trained on")
    parser.add_argument("--cohort-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's)")
    parser.add_argument("--dense-sample", type=int, default=4096, help="tiles timed before deciding to extrapolate")
    parser.add_argument("--feature-sample", type=int, default=4096, help="tiles embedded to time dense MIL")
    parser.add_argument("--full-limit-s", type=float, default=120.0,
                        help="read every tile when the sample predicts at most this many seconds, else extrapolate")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                        help="OpenMP threads sleep (passive) or spin (active) when idle; spinning collapses under "
                             "a shared machine's load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny slides and model: checks the script runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        answer = {"time": _child_time, "rss": _child_rss}[spec["kind"]](spec)
        print(json.dumps(answer))
        return 0
    set_omp_policy(args.omp_wait_policy)
    if args.smoke:
        args.large, args.small, args.repeat, args.rss_repeats = 2048, 1024, 2, 1
        args.cohort_n, args.cohort_size, args.epochs = 4, 1024, 1
        args.dense_sample, args.feature_sample = 256, 256
    from wsiats.demo import DEMO_CONFIG

    epochs = args.epochs or int(DEMO_CONFIG["epochs"])
    started = time.perf_counter()
    load_start = load_average()
    args.cache.mkdir(parents=True, exist_ok=True)
    large, large_gen = ensure_slide(args.cache, args.large, args.seed)
    small, small_gen = ensure_slide(args.cache, args.small, args.seed)
    run, model_info = ensure_model(args.cache, n=args.cohort_n, size=args.cohort_size, epochs=epochs, seed=args.seed)
    load_measure = load_average()
    script = Path(__file__).resolve()
    common = {"run": str(run), "workers": args.workers, "seed": args.seed}
    timing = run_child(script, {**common, "kind": "time", "large": str(large), "small": str(small),
                                "repeat": args.repeat})
    rss = {name: [run_child(script, {**common, "kind": "rss", "slide": str(path)}) for _ in range(args.rss_repeats)]
           for name, path in (("large", large), ("small", small))}
    dense = dense_baselines(large, run, workers=args.workers, sample=args.dense_sample,
                            feature_sample=args.feature_sample, limit_s=args.full_limit_s, seed=args.seed)
    load_end = load_average()

    from wsiats.run import RunFolder

    cfg = RunFolder(run).load_config()
    predict_s = median(timing["large"]["predict_s"])
    floor_s = median(timing["large"]["floor_s"])
    dense_read_s = dense["per_patch"]["seconds"]
    dense_mil_s = dense_read_s + dense["features"]["seconds"] + dense["attention_pooling_s"]
    rss_large = median([r["peak_rss_mb"] for r in rss["large"]])
    rss_small = median([r["peak_rss_mb"] for r in rss["small"]])
    once = dense.get("decode_once")
    report: dict[str, Any] = {
        "benchmark": "predict",
        "smoke": args.smoke,
        "predict_s": predict_s,
        "dense_read_s": dense_read_s,
        "dense_mil_s": dense_mil_s,
        "floor_s": floor_s,
        "predict_over_dense_read": _ratio(predict_s, dense_read_s),
        "predict_over_floor": _ratio(predict_s, floor_s),
        "rss_large_mb": rss_large,
        "rss_small_mb": rss_small,
        "rss_ratio_large_over_small": _ratio(rss_large, rss_small),
        "dense_read_extrapolated": dense["per_patch"]["extrapolated"],
        "dense_read_sampled_tiles": dense["per_patch"]["sampled_tiles"],
        "dense_mil_extrapolated": dense["features"]["extrapolated"] or dense["per_patch"]["extrapolated"],
        "dense_mil_sampled_tiles": dense["features"]["sampled_tiles"],
        # the least any dense method must spend reading: each JPEG tile holding tissue decoded once
        "dense_read_decode_once_s": once["seconds"] if once else None,
        "predict_over_dense_read_decode_once": _ratio(predict_s, once["seconds"]) if once else None,
        "n_patches": cfg.n_patches,
        "patch_size": cfg.patch_size,
        "view_downsample": cfg.view_downsample,
        "predict_small_s": median(timing["small"]["predict_s"]),
        "floor_small_s": median(timing["small"]["floor_s"]),
        "targets": {},
        "slides": {
            name: {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "width": size,
                   "height": size, "gigapixels": size * size / 1e9, "file_bytes": path.stat().st_size,
                   "generate_s": gen}
            for name, path, size, gen in (("large", large, args.large, large_gen), ("small", small, args.small, small_gen))
        },
        "model": {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), **model_info,
                  "settings": "wsiats.demo.DEMO_CONFIG"},
        "timing": {**timing, "repeat": args.repeat, "statistic": "median after one warm-up run, fresh process"},
        "rss": {**rss, "method": "VmHWM of a fresh process that loads the model and predicts the one slide"},
        "dense": dense,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_measure_start": load_measure,
                    "load_average_end": load_end},
        "code": code_version(),
        "wall_s": time.perf_counter() - started,
    }
    for key, limit in TARGETS.items():
        value = report[key]
        report["targets"][key] = {"target": f"<= {limit}", "value": value, "met": bool(value <= limit)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from wsiats._io import atomic_open

    with atomic_open(args.out, "w") as fh:
        json.dump(json_safe(report), fh, indent=2, allow_nan=False)
        fh.write("\n")
    print(json.dumps({k: report[k] for k in ("predict_s", "floor_s", "dense_read_s", "dense_mil_s",
                                             "dense_read_decode_once_s", "predict_over_dense_read",
                                             "predict_over_floor", "rss_large_mb", "rss_small_mb",
                                             "rss_ratio_large_over_small")} | {"out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
