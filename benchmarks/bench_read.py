"""Benchmark slide reading: tifffile + zarr against OpenSlide on the same pyramidal JPEG TIFF.

Generates (once, cached in benchmarks/.cache/) a `--size` x `--size` tiled JPEG pyramid with
tissue-like content, then times for each backend: opening, random 256 x 256 level-0 reads
(one at a time, and batched over threads with `read_regions`), reading a whole low level, and
a 1024-px view. "tifffile-zarr" is the tifffile backend reading through tifffile's zarr store
(its fallback for unusual layouts) instead of decoding tiles itself. Writes JSON with the machine's description.

    python benchmarks/bench_read.py                  # 20,000 px slide, 500 reads
    python benchmarks/bench_read.py --smoke          # seconds: tiny slide, few reads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT  # noqa: E402 - beside this script; puts the repository first on sys.path
from _common import machine_info as _machine  # noqa: E402
from wsiats._io import atomic_open, atomic_path  # noqa: E402
from wsiats.slide import Slide, TiffSlide, open_slide  # noqa: E402

TILE = 256  # the tile size most scanners write
PATCH = 256


def _tile_iter(size: int, ds: int, seed: int) -> Iterator[np.ndarray]:
    """Tiles of level `ds` of a synthetic slide: stained blobs on glass with per-pixel texture."""
    rng = np.random.default_rng(seed)
    n_blobs = 12
    centres = rng.uniform(0.1, 0.9, (n_blobs, 2)) * size
    radii = rng.uniform(0.05, 0.15, n_blobs) * size
    colours = np.array([(230, 150, 190), (120, 60, 150)], np.float32)
    w = h = size // ds
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            gx, gy = (tx + xx) * ds, (ty + yy) * ds  # level-0 coordinates of each pixel
            tile = np.full((TILE, TILE, 3), 243.0, np.float32)
            for i in range(n_blobs):
                inside = (gx - centres[i, 0]) ** 2 + (gy - centres[i, 1]) ** 2 < radii[i] ** 2
                tile[inside] = colours[i % 2]
            tile += (10 * np.sin(gx / 7.0) * np.cos(gy / 11.0))[..., None]
            tile += np.random.default_rng(ty * 7919 + tx + ds).normal(0, 6, (TILE, TILE, 1)).astype(np.float32)
            yield np.clip(tile, 0, 255).astype(np.uint8)


def make_slide(size: int, cache: Path) -> Path:
    """A JPEG tiled pyramid (factor 2 down to < 2048 px) in the main IFD chain; cached by size."""
    import tifffile

    path = cache / f"bench_{size}.tif"
    if path.exists():
        return path
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=size > 30_000, shaped=False) as tw:
        ds = 1
        while True:
            lw = size // ds
            tw.write(_tile_iter(size, ds, seed=0), shape=(lw, lw, 3), dtype=np.uint8, photometric="rgb",
                     tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 85},
                     subfiletype=1 if ds > 1 else 0, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
            if lw < 2048:
                break
            ds *= 2
    return path


def _time(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _opener(path: Path, name: str) -> Slide:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "tifffile-zarr":  # the same backend reading through tifffile's zarr store instead of tiles
            return TiffSlide(path, _reader="zarr")
        return open_slide(path, backend=name)


def bench_backend(path: Path, name: str, locations: np.ndarray, *, repeat: int) -> dict[str, Any]:
    _opener(path, name).close()  # warm-up: imports and the OS file cache
    t0 = time.perf_counter()
    slide = _opener(path, name)
    open_s = time.perf_counter() - t0
    with slide:
        # every level up to 4096 x 4096 px (48 MiB of RGB): the reads a view or a thumbnail makes
        lows = [i for i, (w, h) in enumerate(slide.level_dimensions) if w * h <= 4096 * 4096]
        per_read = []
        for x, y in locations:
            t = time.perf_counter()
            slide.read_region((int(x), int(y)), 0, (PATCH, PATCH))
            per_read.append(time.perf_counter() - t)
        locs = [(int(x), int(y)) for x, y in locations]
        threads = min(8, os.cpu_count() or 1)
        batched = _time(lambda: slide.read_regions(locs, 0, (PATCH, PATCH), workers=threads), repeat)
        whole = {}
        for low in lows:
            times = _time(lambda: slide.read_level(low), repeat)  # noqa: B023 - called at once
            w, h = slide.level_dimensions[low]
            whole[str(low)] = {"dimensions": [w, h], "best_s": min(times), "median_s": statistics.median(times),
                               "megapixels_per_s": w * h / 1e6 / min(times)}
        view_times = _time(lambda: slide.read_view(max_size=1024), repeat)
        n = len(locations)
        return {
            "open_s": open_s,
            "random_read": {
                "n": n, "size": PATCH, "level": 0,
                "median_ms": 1e3 * statistics.median(per_read),
                "mean_ms": 1e3 * statistics.fmean(per_read),
                "p95_ms": 1e3 * float(np.percentile(per_read, 95)),
                "reads_per_s": n / sum(per_read),
            },
            "batched_read": {"n": n, "threads": threads, "best_s": min(batched), "reads_per_s": n / min(batched)},
            "whole_level": whole,
            "view_1024": {"best_s": min(view_times), "median_s": statistics.median(view_times)},
        }


def machine_info(load_before: float | None) -> dict[str, Any]:
    """`_common.machine_info` without torch (the readers alone), the load and the readers' versions."""
    import openslide
    import tifffile
    import zarr
    from PIL import Image

    info: dict[str, Any] = {
        **_machine(with_torch=False),
        # other work on the machine skews timings: the 1-minute load average before and after the runs
        "load_average_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "versions": {"numpy": np.__version__, "tifffile": tifffile.__version__, "zarr": zarr.__version__,
                     "openslide-python": openslide.__version__, "openslide": openslide.__library_version__,
                     "pillow": Image.__version__},
    }
    try:
        import imagecodecs

        info["versions"]["imagecodecs"] = imagecodecs.__version__
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "read.json")
    parser.add_argument("--size", type=int, default=20_000, help="level-0 side of the generated slide (px)")
    parser.add_argument("--n-reads", type=int, default=500, help="random 256 x 256 reads per backend")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the whole-level and view timings")
    parser.add_argument("--smoke", action="store_true", help="tiny slide and few reads: checks the script runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.n_reads, args.repeat = 3000, 20, 1
    cache = ROOT / "benchmarks" / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = (cache / f"bench_{args.size}.tif").exists()
    path = make_slide(args.size, cache)
    gen_s = None if cached else time.perf_counter() - t0
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rng = np.random.default_rng(args.seed)
    locations = rng.integers(0, args.size - PATCH, (args.n_reads, 2))
    names = ("tifffile", "openslide", "tifffile-zarr")
    results = {b: bench_backend(path, b, locations, repeat=args.repeat) for b in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open_slide(path, backend="tifffile") as t, open_slide(path, backend="openslide") as o:
            x, y = (int(v) for v in locations[0])
            a, b = t.read_region((x, y), 0, (PATCH, PATCH)), o.read_region((x, y), 0, (PATCH, PATCH))
            same = bool(np.array_equal(a, b))
            dims = [list(d) for d in t.level_dimensions]
    report = {
        "benchmark": "read",
        "smoke": args.smoke,
        "machine": machine_info(load_before),
        "slide": {"size": args.size, "tile": TILE, "compression": "jpeg", "levels": dims,
                  "file_bytes": path.stat().st_size, "generate_s": gen_s, "cached": cached},
        "backends_agree_on_a_region": same,
        "results": results,
        "speedup_tifffile_over_openslide": {
            kind: results["tifffile"][kind]["reads_per_s"] / results["openslide"][kind]["reads_per_s"]
            for kind in ("random_read", "batched_read")
        } | {
            "whole_level": {lev: results["openslide"]["whole_level"][lev]["best_s"] / r["best_s"]
                            for lev, r in results["tifffile"]["whole_level"].items()},
            "view_1024": results["openslide"]["view_1024"]["best_s"] / results["tifffile"]["view_1024"]["best_s"],
        },
    }
    with atomic_open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps({"out": str(args.out), "results": results, "speedup": report["speedup_tifffile_over_openslide"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
