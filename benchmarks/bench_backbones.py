"""Benchmark ATS predict with real backbones against dense pipelines with the same backbone, and a real peer.

On the generated 2.1-gigapixel slide of bench_predict.py (46,000 px, 0.25 um/px, cached in
benchmarks/.cache/), with patches of 224 px at 0.5 um/px (what pathology foundation models take):

- decode-once read bound: every level-0 file tile that holds tissue read and decoded exactly once
  (the least any dense method must spend reading the slide);
- ATS predict (`Predictor`, N = 10 patches, random weights: speed only) with small-cnn, resnet50,
  vit_small and vit_base, and the floor (the same work as direct calls: view, tissue mask,
  attention, N patches, networks);
- a dense pipeline with the same backbone over every tissue tile of the same size and mpp (read +
  embed), timed on a random sample of `--dense-sample` (>= 2,000) tissue tiles and extrapolated to
  all of them (flagged `extrapolated`);
- throughput over a 20-slide cohort (4096 px slides): ATS measured, dense extrapolated from the
  per-tile costs and each slide's tissue tile count;
- a real peer, LazySlide (`--peer`), installed into its own venv under benchmarks/.cache/ (never a
  wsiats dependency), running its own dense feature extraction (find_tissues, tile_tissues,
  feature_extraction) with resnet50 on the same slide at the same tile size and mpp. Its feature
  pass is timed on the same number of tiles and extrapolated the same way.

    python benchmarks/bench_backbones.py            # writes benchmarks/results/backbones.json (~30 min on 2 cores)
    python benchmarks/bench_backbones.py --smoke --out /tmp/backbones.json   # seconds: a tiny slide, no peer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    code_hash,
    code_version,
    ensure_cohort,
    ensure_slide,
    json_safe,
    median,
    load_average,
    machine_info,
    prune_stale,
    set_omp_policy,
    tissue_tile_centers,
)
from bench_predict import floor_pass  # noqa: E402 - its floor: the same direct calls, timed the same way

#: Targets of issue 12 (predict against the decode-once read, against the floor; ATS-ViT against dense-ViT).
TARGETS = {"predict_over_decode_once": 0.05, "predict_over_floor": 1.2, "dense_vit_over_ats_vit": 100.0}
#: The backbones: name -> (--feature-net, feature_net_args).
BACKBONES = {
    "small-cnn": ("small-cnn", {}),
    "resnet50": ("timm:resnet50", {}),
    "vit_small": ("timm:vit_small_patch16_224", {}),
    "vit_base": ("timm:vit_base_patch16_224", {}),
}
SMOKE_BACKBONES = {
    "small-cnn": ("small-cnn", {}),
    "vit_tiny": ("timm:vit_tiny_patch16_224", {"depth": 1, "img_size": 32}),
}
#: The peer's version, pinned so that runs compare.
PEER = "lazyslide==0.13.0"
_EMBED_BATCH = 32  # tiles per feature-network call in the dense pipelines
_READ_BATCH = 64


def ensure_run(cache: Path, key: str, feature_net: str, net_args: dict[str, Any], settings: dict[str, Any]) -> Path:
    """A run folder (config.yaml + model.safetensors) with random weights: what `Predictor` loads."""
    import torch

    from wsiats.checkpoint import build_model, save_weights
    from wsiats.config import resolve
    from wsiats.run import RunFolder

    run = cache / f"backbone_run_{key}_{settings['patch_size']}_{code_hash()}"
    if RunFolder(run).model.exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg = resolve(overrides={**settings, "feature_net": feature_net})
    cfg.feature_net_args = dict(net_args)
    cfg.classes = ["negative", "positive"]
    torch.manual_seed(0)
    model = build_model(cfg)
    RunFolder(run).save_config(cfg)
    save_weights(model, RunFolder(run).model)
    return run


def decode_once(path: Path, cfg: Any, *, workers: int) -> dict[str, Any]:
    """Every level-0 file tile holding tissue (a tissue cell of the view inside it) decoded once: the least any
    dense method must spend reading the slide.

    Measured two ways in the same run, `workers` threads each, after an untimed pass that reads every one of
    those tiles' bytes (both then read from the page cache): through our reader (`Slide.read_regions` of each
    tile, aligned) and raw (each tile's bytes read with os.pread at its TIFF offset from one file handle and
    decoded with imagecodecs, the JPEG tables as needed: no reader around it). The bound is the faster of the
    two, the tighter one; both are kept.
    """
    import tifffile

    from wsiats.slide import open_slide
    from wsiats.view import prepare_view

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        tw, th = int(page.tilewidth), int(page.tilelength)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = open_slide(path)
    with slide:
        view = prepare_view(slide, cfg)
        rows, cols = np.nonzero(view.mask)
        dx, dy = view.downsample
        keys = np.unique(np.stack([((cols + 0.5) * dx) // tw, ((rows + 0.5) * dy) // th], 1).astype(np.int64), axis=0)
        raw = _RawTiles(path, keys)  # the untimed pass: every tile's bytes read once
        corners = [(int(x) * tw, int(y) * th) for x, y in keys]
        slide.read_regions(corners[:8], 0, (tw, th), workers=workers)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(corners), _READ_BATCH):
            slide.read_regions(corners[i: i + _READ_BATCH], 0, (tw, th), workers=workers)
        reader_s = time.perf_counter() - t0
    raw_s = raw(workers)
    reader_method = f"Slide.read_regions of each {tw}x{th} level-0 tile with a tissue view cell, {workers} threads"
    raw_method = (f"os.pread of each such tile's bytes (one file handle) + {raw.codec}, {workers} threads "
                  f"({raw.empty} empty tile(s) of 0 bytes skipped)")
    tighter = "raw" if raw_s <= reader_s else "reader"
    return {"seconds": min(raw_s, reader_s), "file_tiles": len(corners), "file_tile": [tw, th], "extrapolated": False,
            "bound": tighter, "method": f"the faster of two, here {tighter}: "
                                        f"{raw_method if tighter == 'raw' else reader_method}",
            "reader_s": reader_s, "reader_method": reader_method, "raw_decode_s": raw_s, "raw_method": raw_method}


class _RawTiles:
    """Level-0 tiles of a TIFF decoded straight from their bytes: os.pread at the page's offsets and imagecodecs'
    JPEG decoder with the page's tables and colour spaces (tifffile's own decoder for other compressions)."""

    def __init__(self, path: Path, keys: np.ndarray) -> None:
        """The tiles at (tile column, tile row) `keys`."""
        import tifffile
        from tifffile.tifffile import jpeg_decode_colorspace

        self.path, self._tf = path, tifffile.TiffFile(path)
        page = self._tf.pages[0]
        index = keys[:, 1] * -(-int(page.imagewidth) // int(page.tilewidth)) + keys[:, 0]
        offsets, counts = (np.asarray(v, dtype=np.int64)[index] for v in (page.dataoffsets, page.databytecounts))
        full = counts > 0
        self.empty = int((~full).sum())
        self._offsets, self._counts = offsets[full], counts[full]
        self._index = index[full]
        if int(page.compression) == 7:
            import imagecodecs

            colorspace, out = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples,
                                                     page.is_jfif)
            tables = page.jpegtables
            self.codec = "imagecodecs.jpeg8_decode"

            def decode(data: bytes, _index: int) -> Any:
                return imagecodecs.jpeg8_decode(data, tables=tables, colorspace=colorspace, outcolorspace=out)
        else:
            self.codec = f"tifffile's decoder of compression {int(page.compression)} (imagecodecs)"

            def decode(data: bytes, index: int) -> Any:
                return page.decode(data, index, jpegtables=page.jpegtables)[0]
        self._decode = decode
        fd = os.open(path, os.O_RDONLY)
        try:
            for off, n in zip(self._offsets.tolist(), self._counts.tolist()):
                os.pread(fd, n, off)
        finally:
            os.close(fd)

    def __call__(self, workers: int) -> float:
        """Seconds to read and decode every tile once in `workers` threads (then closes the file)."""
        from concurrent.futures import ThreadPoolExecutor

        fd = os.open(self.path, os.O_RDONLY)
        offsets, counts, index = self._offsets.tolist(), self._counts.tolist(), self._index.tolist()
        decode, step = self._decode, max(1, -(-len(offsets) // (workers * 16)))

        def run(lo: int) -> None:
            for i in range(lo, min(lo + step, len(offsets))):
                decode(os.pread(fd, counts[i], offsets[i]), index[i])

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for j in range(min(8, len(offsets))):  # warm-up, as for the reader (its threads started too)
                    decode(os.pread(fd, counts[j], offsets[j]), index[j])
                list(pool.map(lambda _: None, range(max(1, workers))))
                t0 = time.perf_counter()
                list(pool.map(run, range(0, len(offsets), step)))
                return time.perf_counter() - t0
        finally:
            os.close(fd)
            self._tf.close()


def time_ats(runs: dict[str, Path], slide: Path, *, repeat: int, workers: int, seed: int) -> dict[str, Any]:
    """Per backbone: Predictor wall time on the slide (median after a warm-up) and the floor, interleaved."""
    import gc

    from wsiats.predict import Predictor

    out: dict[str, Any] = {}
    for key, run in runs.items():
        predictor = Predictor(run, device="cpu", workers=workers, seed=seed)
        pred = list(predictor.predict([slide]))[0]
        if not pred.ok:
            raise RuntimeError(pred.error)
        floor_pass(slide, predictor.model, predictor.cfg, workers=workers, seed=seed)
        predict_s, floor_s, stages = [], [], []
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            list(predictor.predict([slide]))
            predict_s.append(time.perf_counter() - t0)
            gc.collect()
            seconds, stage, _ = floor_pass(slide, predictor.model, predictor.cfg, workers=workers, seed=seed)
            floor_s.append(seconds)
            stages.append(stage)
        out[key] = {"predict_s": median(predict_s), "floor_s": median(floor_s), "predict_runs_s": predict_s,
                    "floor_runs_s": floor_s, "n_patches": pred.n_patches,
                    "floor_stages_median_s": {k: median([s[k] for s in stages]) for k in stages[0]}}
        del predictor
    return out


def time_dense(runs: dict[str, Path], slide_path: Path, *, sample: int, workers: int, seed: int) -> dict[str, Any]:
    """Read a random sample of the slide's tissue tiles once; embed them with every backbone; extrapolate."""
    import torch

    from wsiats.checkpoint import load_model
    from wsiats.slide import open_slide
    from wsiats.view import patch_downsample, prepare_view

    _, cfg = load_model(next(iter(runs.values())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = open_slide(slide_path)
    with slide:
        view = prepare_view(slide, cfg)
        pds = patch_downsample(slide, cfg)
        step = int(round(cfg.patch_size * pds))  # a tile of patch_size px at the patch mpp, in level-0 px
        centers, n_grid = tissue_tile_centers(view.mask, view.downsample, slide.dimensions, step)
        n = len(centers)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(sample, n), replace=False))  # raster order, like a scan
        slide.read_patches(centers[take[:16]], cfg.patch_size, downsample=pds, workers=workers)  # warm-up
        t0 = time.perf_counter()
        pixels = np.concatenate([slide.read_patches(centers[take[i: i + _READ_BATCH]], cfg.patch_size,
                                                    downsample=pds, workers=workers)
                                 for i in range(0, len(take), _READ_BATCH)])
        read_s = time.perf_counter() - t0
    tiles = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    out: dict[str, Any] = {"tissue_tiles": n, "grid_tiles": n_grid, "sampled_tiles": len(take),
                           "extrapolated": len(take) < n, "tile_level0_px": step, "read_sample_s": read_s,
                           "read_per_tile_ms": read_s / len(take) * 1e3, "read_s": read_s / len(take) * n,
                           "backbones": {}}
    for key, run in runs.items():
        model, _ = load_model(run)
        net = model.feature_net
        with torch.no_grad():
            net(tiles[:4])  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(tiles), _EMBED_BATCH):
                net(tiles[i: i + _EMBED_BATCH])
            embed_s = time.perf_counter() - t0
        per_tile = embed_s / len(tiles)
        out["backbones"][key] = {"embed_sample_s": embed_s, "embed_per_tile_ms": per_tile * 1e3,
                                 "embed_s": per_tile * n, "dense_s": out["read_s"] + per_tile * n,
                                 "input_size": list(net.input_size) if net.input_size else None}
        del model, net
    return out


def time_cohort(runs: dict[str, Path], slides: list[Path], dense: dict[str, Any], *, workers: int,
                seed: int) -> dict[str, Any]:
    """ATS predict over the cohort (measured) and dense pipelines (per-tile costs x each slide's tissue tiles)."""
    from wsiats.checkpoint import load_model
    from wsiats.predict import Predictor
    from wsiats.slide import open_slide
    from wsiats.view import patch_downsample, prepare_view

    _, cfg = load_model(next(iter(runs.values())))
    tiles = 0
    for path in slides:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_slide(path) as slide:
                view = prepare_view(slide, cfg)
                step = int(round(cfg.patch_size * patch_downsample(slide, cfg)))
                tiles += len(tissue_tile_centers(view.mask, view.downsample, slide.dimensions, step)[0])
    out: dict[str, Any] = {"slides": len(slides), "tissue_tiles": tiles, "backbones": {}}
    for key, run in runs.items():
        predictor = Predictor(run, device="cpu", workers=workers, seed=seed)
        list(predictor.predict(slides[:1]))  # warm-up
        t0 = time.perf_counter()
        preds = list(predictor.predict(slides))
        ats_s = time.perf_counter() - t0
        if any(not p.ok for p in preds):
            raise RuntimeError(next(p.error for p in preds if not p.ok))
        per_tile = (dense["read_per_tile_ms"] + dense["backbones"][key]["embed_per_tile_ms"]) / 1e3
        out["backbones"][key] = {"ats_s": ats_s, "ats_slides_per_s": len(slides) / ats_s,
                                 "dense_s": per_tile * tiles, "dense_extrapolated": True,
                                 "dense_over_ats": per_tile * tiles / ats_s}
    return out


# --- the peer -----------------------------------------------------------------------------------------------------


def ensure_peer(cache: Path, *, share_torch: bool) -> dict[str, Any]:
    """LazySlide in its own venv under `cache`; its python, version and how it was installed (or why not)."""
    venv = cache / "peer-lazyslide"
    py = venv / "bin" / "python"
    marker = venv / "wsiats-peer.json"
    if marker.exists():
        return json.loads(marker.read_text())
    info: dict[str, Any] = {"package": PEER, "venv": str(venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv)}
    t0 = time.perf_counter()
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        if share_torch:  # torch + torchvision (5.5 GB) from this interpreter instead of a second copy
            import torch

            site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            Path(site, "_shared_torch.pth").write_text(str(Path(torch.__file__).resolve().parent.parent) + "\n")
            info["torch_from"] = "the benchmark interpreter's site-packages (a .pth file in the peer venv)"
        proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", PEER], capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {PEER} failed: {proc.stderr.strip()[-1500:]}")
        version = subprocess.run([str(py), "-c", "import lazyslide, wsidata; print(lazyslide.__version__, "
                                  "wsidata.__version__)"], capture_output=True, text=True, timeout=600)
        if version.returncode != 0:
            raise RuntimeError(f"lazyslide installed but does not import: {version.stderr.strip()[-1500:]}")
        info["lazyslide"], info["wsidata"] = version.stdout.split()
        info["install_s"] = time.perf_counter() - t0
        info["python"] = str(py)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        info["error"] = str(exc)
        return info
    marker.write_text(json.dumps(info, indent=1))
    return info


def run_peer(peer: dict[str, Any], slide: Path, *, tile_px: int, mpp: float, sample: int, seed: int,
             timeout: float) -> dict[str, Any]:
    """LazySlide's dense pipeline on the slide, in its venv (benchmarks/_peer_lazyslide.py)."""
    if "error" in peer:
        return {"error": peer["error"]}
    spec = {"slide": str(slide), "tile_px": tile_px, "mpp": mpp, "sample": sample, "seed": seed, "model": "resnet50"}
    script = Path(__file__).resolve().parent / "_peer_lazyslide.py"
    proc = subprocess.run([peer["python"], str(script), json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        return {"error": f"the peer run failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backbones.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--size", type=int, default=46_000, help="side of the large slide (46,000 px: 2.1 Gpx)")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--patch-mpp", type=float, default=0.5)
    parser.add_argument("--n-patches", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="timed predict and floor runs per backbone")
    parser.add_argument("--workers", type=int, default=2, help="tile-reading threads (the CLI's default)")
    parser.add_argument("--dense-sample", type=int, default=2000, help="tissue tiles read and embedded, then extrapolated")
    parser.add_argument("--cohort-n", type=int, default=20)
    parser.add_argument("--cohort-size", type=int, default=4096)
    parser.add_argument("--peer", choices=("lazyslide", "none"), default="lazyslide")
    parser.add_argument("--peer-own-torch", action="store_true",
                        help="install torch into the peer's venv too (default: share this interpreter's)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny slide and backbones, no peer: checks the script")
    args = parser.parse_args(argv)
    set_omp_policy(args.omp_wait_policy)
    backbones = BACKBONES
    if args.smoke:
        args.size, args.patch_size, args.repeat, args.dense_sample = 2048, 32, 1, 48
        args.cohort_n, args.cohort_size, args.peer = 2, 1024, "none"
        backbones = SMOKE_BACKBONES
    started = time.perf_counter()
    load_start = load_average()
    args.cache.mkdir(parents=True, exist_ok=True)
    for key, (name, net_args) in backbones.items():
        prune_stale(args.cache, f"backbone_run_{key}_{args.patch_size}_", args.cache / f"backbone_run_{key}_{args.patch_size}_{code_hash()}")
    slide, slide_gen = ensure_slide(args.cache, args.size, args.seed)
    cohort, _ = ensure_cohort(args.cache, n=args.cohort_n, size=args.cohort_size, seed=args.seed)
    settings = {"patch_size": args.patch_size, "patch_mpp": args.patch_mpp, "n_patches": args.n_patches,
                "view_downsample": 32.0}
    runs = {key: ensure_run(args.cache, key, name, net_args, settings) for key, (name, net_args) in backbones.items()}
    peer = ensure_peer(args.cache, share_torch=not args.peer_own_torch) if args.peer == "lazyslide" else None
    load_measure = load_average()

    from wsiats.checkpoint import load_model

    _, cfg = load_model(runs["small-cnn"])
    once = decode_once(slide, cfg, workers=args.workers)
    ats = time_ats(runs, slide, repeat=args.repeat, workers=args.workers, seed=args.seed)
    dense = time_dense(runs, slide, sample=args.dense_sample, workers=args.workers, seed=args.seed)
    cohort_slides = sorted((cohort / "slides").glob("*.tif"))
    cohort_rows = time_cohort(runs, cohort_slides, dense, workers=args.workers, seed=args.seed)
    peer_result = None
    if peer is not None:
        peer_result = {**peer, **run_peer(peer, slide, tile_px=args.patch_size, mpp=args.patch_mpp,
                                          sample=args.dense_sample, seed=args.seed, timeout=3600)}
        ours = dense["read_s"] + dense["backbones"]["resnet50"]["embed_s"]
        if "total_s" in peer_result:
            peer_result["wsiats_dense_resnet50_s"] = ours
            peer_result["wsiats_ats_resnet50_s"] = ats["resnet50"]["predict_s"]
            peer_result["peer_over_wsiats_ats"] = peer_result["total_s"] / ats["resnet50"]["predict_s"]
            peer_result["peer_over_wsiats_dense"] = peer_result["total_s"] / ours
    load_end = load_average()

    table = {}
    for key in backbones:
        d = dense["backbones"][key]
        a = ats[key]
        table[key] = {"ats_predict_s": a["predict_s"], "ats_floor_s": a["floor_s"],
                      "predict_over_floor": a["predict_s"] / a["floor_s"],
                      "dense_s": d["dense_s"], "dense_extrapolated": dense["extrapolated"],
                      "dense_over_ats": d["dense_s"] / a["predict_s"],
                      "predict_over_decode_once": a["predict_s"] / once["seconds"],
                      "embed_per_tile_ms": d["embed_per_tile_ms"],
                      "cohort_ats_slides_per_s": cohort_rows["backbones"][key]["ats_slides_per_s"],
                      "cohort_dense_over_ats": cohort_rows["backbones"][key]["dense_over_ats"]}
    vit = "vit_base" if "vit_base" in table else "vit_tiny"
    report: dict[str, Any] = {
        "benchmark": "backbones",
        "smoke": args.smoke,
        "table": table,
        "dense_read_decode_once_s": once["seconds"],
        "targets": {
            "predict_over_decode_once": {"backbone": "small-cnn", "target": f"<= {TARGETS['predict_over_decode_once']}",
                                         "value": table["small-cnn"]["predict_over_decode_once"]},
            "predict_over_floor": {"backbone": "small-cnn", "target": f"<= {TARGETS['predict_over_floor']}",
                                   "value": table["small-cnn"]["predict_over_floor"]},
            "dense_vit_over_ats_vit": {"backbone": vit, "target": f">= {TARGETS['dense_vit_over_ats_vit']}",
                                       "value": table[vit]["dense_over_ats"]},
        },
        "settings": {**settings, "slide_mpp": 0.25, "backbones": {k: {"feature_net": n, "feature_net_args": a}
                                                                  for k, (n, a) in backbones.items()},
                     "weights": "random (speed only)", "device": "cpu"},
        "slide": {"path": str(slide.relative_to(ROOT) if slide.is_relative_to(ROOT) else slide), "width": args.size,
                  "height": args.size, "gigapixels": args.size ** 2 / 1e9, "file_bytes": slide.stat().st_size,
                  "generate_s": slide_gen},
        "decode_once": once,
        "ats": ats,
        "dense": dense,
        "cohort": {**cohort_rows, "slide_px": args.cohort_size},
        "peer": peer_result if peer_result is not None else {"skipped": "smoke mode" if args.smoke else "--peer none"},
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_measure_start": load_measure,
                    "load_average_end": load_end, "loadavg_end": Path("/proc/loadavg").read_text().strip()
                    if Path("/proc/loadavg").exists() else None},
        "code": code_version(),
        "wall_s": time.perf_counter() - started,
    }
    for key, t in report["targets"].items():
        t["met"] = bool(t["value"] >= TARGETS[key]) if key == "dense_vit_over_ats_vit" else bool(t["value"] <= TARGETS[key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from wsiats._io import atomic_open

    with atomic_open(args.out, "w") as fh:
        json.dump(json_safe(report), fh, indent=2, allow_nan=False)
        fh.write("\n")
    print(json.dumps({"table": table, "decode_once_s": once["seconds"],
                      "peer": {k: v for k, v in (peer_result or {}).items() if k.endswith("_s") or k == "error"},
                      "out": str(args.out)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
