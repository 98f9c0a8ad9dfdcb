"""What both slide backends share: the `Slide` base class, the reading conventions, and helpers.

A private module: `wsiats.slide` is the public face (`open_slide`, the `Slide` interface); the
backends (`wsiats._tiff`, `wsiats._openslide`) import from here, never from `wsiats.slide`, so there
is no import cycle between the public module and its backends.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsiats.errors import ConfigError, CorruptSlideError, SlideError, SlideReadError

#: tifffile flags of vendor TIFF variants that OpenSlide understands better, with OpenSlide's vendor names.
_OPENSLIDE_TIFF_VENDORS = {"ndpi": "hamamatsu", "scn": "leica", "philips": "philips", "bif": "ventana"}
#: Largest plausible side: scanners stay below ~250k px; a bigger header value means corruption.
MAX_SIDE = 10**6
#: Pixel budget of one whole-level read or one view (2**28 px = 768 MiB of RGB).
PIXEL_BUDGET = 2**28
#: Largest decoded size of one tile or strip, in MiB, unless WSIATS_MAX_TILE_MB (`wsiats --max-tile-mb`) says
#: otherwise. Scanners write 240-1024 px tiles (0.2-3 MiB); 64 MiB is a 4729 x 4729 RGB tile. A few-MB file
#: whose one deflate tile decodes to gigabytes is a decompression bomb.
MAX_TILE_MB = 64.0
#: Pixels a view may decode from its source level (2**32: a 65536^2 level without a pyramid, minutes of
#: decoding), and all the patches of one `read_patches` call from theirs: a header claiming 10^6 x 10^6 px
#: must not make a view or a patch at a large downsample read (or allocate) it whole.
VIEW_READ_BUDGET = 2**32
PATCH_READ_BUDGET = PIXEL_BUDGET
#: Side of the source chunks a view is assembled from when its source level is large (3 MiB of RGB).
_VIEW_CHUNK = 1024
#: Levels whose downsample is within 1% of the requested one count as equal (pyramid rounding).
_LEVEL_TOLERANCE = 0.01
#: How far (relative) a view's downsample may lie from W0 / width: a view that `read_view` makes of block means at
#: an integer k within `_LEVEL_TOLERANCE` of the source-to-view factor f has downsample (k / f) W0 / width.
VIEW_DOWNSAMPLE_RTOL = _LEVEL_TOLERANCE / (1.0 - _LEVEL_TOLERANCE) + 1e-9
#: Resolutions that image software writes by default (dpi); they say nothing about the scan.
_DEFAULT_DPI = (72.0, 96.0)
#: Plausible microns per pixel: 0.01 (beyond optical limits) to 100 (a 0.1x overview).
_MPP_RANGE = (0.01, 100.0)
_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4,
             "m": 1e6}


@dataclass(frozen=True)
class View:
    """A low-resolution view of a whole slide."""

    image: np.ndarray  # (h, w, 3) uint8 RGB
    downsample: tuple[float, float]  # level-0 px per view px (x, y): W0 / w, H0 / h, or a level's times k (`read_view`)


def patch_box(center: tuple[float, float], size: int, downsample: float) -> tuple[int, int, int, int]:
    """Level-0 box (x0, y0, w0, h0) of the `size`-pixel patch at `downsample` centred on `center`.

    x0 = round(cx - size * downsample / 2), halves rounded up; w0 = h0 = round(size * downsample).
    """
    extent = size * downsample
    x0 = math.floor(center[0] - extent / 2 + 0.5)
    y0 = math.floor(center[1] - extent / 2 + 0.5)
    side = math.floor(extent + 0.5)
    return x0, y0, side, side


class Slide(abc.ABC):
    """A whole-slide image opened lazily. Use as a context manager, or call `close()`."""

    path: Path
    backend: str
    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    mpp_source: str | None
    objective_power: float | None
    properties: dict[str, str]
    associated_names: tuple[str, ...]

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    # --- what a backend implements --------------------------------------------------------------------------

    @abc.abstractmethod
    def _decode_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """(y1 - y0, x1 - x0, 3) uint8 RGB of a box inside `level` (level pixels)."""

    @abc.abstractmethod
    def _associated(self, name: str) -> np.ndarray:
        """The associated image `name` (known to exist) as RGB uint8."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the backend's handles."""

    # --- shared behaviour -----------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r} {self.level_count} level(s) {self.dimensions}>"

    def close(self) -> None:
        """Close the file and stop the read threads; further reads raise SlideReadError."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._close()

    def associated_image(self, name: str) -> np.ndarray:
        """Label, macro, thumbnail, ... as (h, w, 3) uint8 RGB; KeyError lists the names."""
        if name not in self.associated_names:
            raise KeyError(f"{self.path}: no associated image {name!r}; it has {list(self.associated_names)}")
        self._check_open()
        try:
            return self._associated(name)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideReadError(self.path, f"cannot read associated image {name!r}: {_codec_hint(exc)}") from None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int], *,
                    fill: int = 255) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `size` (w, h) pixels of `level`, top-left at level-0 `location`.

        Pixels outside the image are `fill` (255 by default: white, like glass).
        """
        self._check_open()
        self._check_level(level)
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        sx, sy = self._scale(level)
        return self._read_px(level, math.floor(location[0] / sx), math.floor(location[1] / sy), w, h, fill)

    def read_regions(self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int], *,
                     workers: int | None = None) -> np.ndarray:
        """(n, h, w, 3): `read_region` at each location, decoded concurrently in this slide's threads."""
        w, h = (int(v) for v in size)
        out = np.empty((len(locations), h, w, 3), np.uint8)

        def one(i: int) -> None:
            out[i] = self.read_region(locations[i], level, (w, h))

        self._map(one, len(locations), workers)
        return out

    def read_patches(self, centers: np.ndarray, size: int, *, downsample: float = 1.0,
                     workers: int | None = None) -> np.ndarray:
        """(n, size, size, 3) uint8: the patch of `size` px at `downsample` centred on each level-0 (x, y).

        The box is `patch_box(center, size, downsample)`. It is read from the nearest finer-or-equal
        level and, when that level's downsample differs by more than 1%, area-resized with PIL.
        """
        self._check_open()
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        if size < 1 or downsample <= 0:
            raise ValueError(f"patch size must be >= 1 and downsample > 0, got {size} and {downsample}")
        level = self._patch_level(downsample)
        sx, sy = self._scale(level)
        exact = abs(self.level_downsamples[level] / downsample - 1.0) <= _LEVEL_TOLERANCE
        src = size if exact else math.ceil(size * downsample / min(sx, sy)) + 1  # source px a side, at most
        if len(centers) * max(src, size) ** 2 > PATCH_READ_BUDGET:
            raise SlideError(self.path, f"{len(centers)} patch(es) of {size} px at downsample {downsample:.4g} "
                                        f"(--patch-downsample or --patch-mpp, --patch-size) would decode {src} x "
                                        f"{src} px of level {level} each, over the {PATCH_READ_BUDGET}-pixel budget "
                                        "of a patch read; the slide has no coarser level to read them from")
        out = np.empty((len(centers), size, size, 3), np.uint8)

        def one(i: int) -> None:
            x0, y0, _, _ = patch_box((centers[i, 0], centers[i, 1]), size, downsample)
            if exact:
                out[i] = self._read_px(level, math.floor(x0 / sx), math.floor(y0 / sy), size, size, 255)
                return
            # fractional source box at `level`; read the whole pixels around it, then area-resize exactly it
            bx0, by0 = x0 / sx, y0 / sy
            bx1, by1 = (x0 + size * downsample) / sx, (y0 + size * downsample) / sy
            ix0, iy0 = math.floor(bx0), math.floor(by0)
            src = self._read_px(level, ix0, iy0, math.ceil(bx1) - ix0, math.ceil(by1) - iy0, 255)
            img = Image.fromarray(src).resize((size, size), Image.Resampling.BOX,
                                              box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0))
            out[i] = np.asarray(img)

        self._map(one, len(centers), workers)
        return out

    def read_patch_groups(self, centers: np.ndarray, groups: np.ndarray, size: int, *, downsample: float = 1.0,
                          workers: int | None = None) -> np.ndarray:
        """`read_patches`, with the patches of each group (those of one region, say) cut from ONE read of the box
        that holds them, so that patches sharing a file tile decode it once. The same pixels as `read_patches`.

        A group whose box would be over 4x its patches' area is read patch by patch; patches that need resizing
        (no level at `downsample`) are read by `read_patches`.
        """
        self._check_open()
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(centers):
            raise ValueError(f"{len(centers)} centres but {len(groups)} group labels")
        level = self._patch_level(downsample) if size >= 1 and downsample > 0 else 0
        if size < 1 or downsample <= 0 or abs(self.level_downsamples[level] / downsample - 1.0) > _LEVEL_TOLERANCE:
            return self.read_patches(centers, size, downsample=downsample, workers=workers)
        sx, sy = self._scale(level)
        corner = np.array([patch_box((x, y), size, downsample)[:2] for x, y in centers], dtype=np.float64).reshape(-1, 2)
        px, py = np.floor(corner[:, 0] / sx).astype(np.int64), np.floor(corner[:, 1] / sy).astype(np.int64)
        out = np.empty((len(centers), size, size, 3), np.uint8)
        keys = np.unique(groups)

        def one(i: int) -> None:
            sel = np.flatnonzero(groups == keys[i])
            x0, y0 = int(px[sel].min()), int(py[sel].min())
            w, h = int(px[sel].max()) - x0 + size, int(py[sel].max()) - y0 + size
            if w * h > 4 * len(sel) * size * size:
                for k in sel:
                    out[k] = self._read_px(level, int(px[k]), int(py[k]), size, size, 255)
                return
            box = self._read_px(level, x0, y0, w, h, 255)
            for k in sel:
                out[k] = box[py[k] - y0: py[k] - y0 + size, px[k] - x0: px[k] - x0 + size]

        self._map(one, len(keys), workers)
        return out

    def _patch_level(self, downsample: float) -> int:
        """The level patches at `downsample` are read from (and resized from, when it differs)."""
        return self.best_level_for_downsample(downsample)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of `level` as (h, w, 3) uint8; SlideError above the pixel budget (2**28 px)."""
        self._check_open()
        self._check_level(level)
        w, h = self.level_dimensions[level]
        if w * h > PIXEL_BUDGET:
            raise SlideError(self.path, f"level {level} is {w} x {h} px, over the {PIXEL_BUDGET}-pixel budget of a "
                                        "whole-level read; read a coarser level, a region, or a view")
        return self._read_px(level, 0, 0, w, h, 255)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= `downsample` (within 1%): never upsample."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + _LEVEL_TOLERANCE):
                best = i
        return best

    def read_view(self, *, downsample: float | None = None, mpp: float | None = None,
                  max_size: int | None = None) -> View:
        """The whole slide at low resolution, `round(W0 / ds)` x `round(H0 / ds)` px.

        Give `downsample`, or `mpp` (microns per view pixel; needs a known slide mpp), and/or
        `max_size` (longest side; with another argument it caps the size). With none, max_size=1024.
        The view is area-averaged from the nearest finer level. A large source level is processed in
        chunks of about `_VIEW_CHUNK` source px that the backend aligns with its tiles or strips, so each
        tile is decoded once per view. Each chunk is reduced by integer factors (kx, ky) = floor(source
        px per view px) with block means (PIL's reduce); a block that straddles two chunks is summed from
        both and averaged as PIL would, so there are no seams (chunked and one-shot reads give the same
        pixels); the small intermediate is then box-resized once to the final size. When the factor is
        within 1% of an integer k whose blocks give the final size (2875 source px -> 1438 view px at
        1.9993), the block means at k are the view, without a resize of the level, and its `downsample`
        is k times the level's (the geometry of those pixels), not W0 / width.
        """
        self._check_open()
        W0, H0 = self.dimensions
        if downsample is not None and mpp is not None:
            raise ValueError("give downsample or mpp, not both")
        ds = 1.0
        if mpp is not None:
            if self.mpp is None:
                raise SlideError(self.path, "a view in microns per pixel needs the slide's resolution, which is "
                                            "unknown; pass --mpp to set it, or give the view as a downsample")
            ds = mpp / self.mpp[0]
        elif downsample is not None:
            ds = float(downsample)
        elif max_size is None:
            max_size = 1024  # a default thumbnail size
        if max_size is not None:
            ds = max(ds, max(W0, H0) / max_size)
        if not ds >= 1.0 - 1e-9:
            raise SlideError(self.path, f"view downsample {ds:.4g} is finer than level 0; a view must be >= 1")
        out_w, out_h = max(1, round(W0 / ds)), max(1, round(H0 / ds))
        if out_w * out_h > PIXEL_BUDGET:
            raise SlideError(self.path, f"a view of {out_w} x {out_h} px is over the {PIXEL_BUDGET}-pixel budget; "
                                        "use a larger downsample")
        level = self.best_level_for_downsample(min(W0 / out_w, H0 / out_h))
        lw, lh = self.level_dimensions[level]
        if lw * lh > VIEW_READ_BUDGET:
            raise SlideError(self.path, f"a view at downsample {ds:.4g} (--view-downsample or --view-mpp) would "
                                        f"decode level {level} whole ({lw} x {lh} px), over the {VIEW_READ_BUDGET}-"
                                        "pixel budget of a view; the slide has no coarser level to read it from")
        kx, ky = max(1, int(lw / out_w)), max(1, int(lh / out_h))
        rx, ry = max(1, round(lw / out_w)), max(1, round(lh / out_h))
        if (-(-lw // rx), -(-lh // ry)) == (out_w, out_h) and all(
                abs(f / r - 1.0) <= _LEVEL_TOLERANCE for f, r in ((lw / out_w, rx), (lh / out_h, ry))):
            kx, ky = rx, ry  # block means alone give the view (e.g. 2875 px -> 1438 at 1.9993): no resize
        cw, ch = (min(v, full) for v, full in zip(self._view_chunk(level), (lw, lh)))
        mid = np.empty((-(-lh // ky), -(-lw // kx), 3), np.uint8)
        corners = [(cx, cy) for cy in range(0, lh, ch) for cx in range(0, lw, cw)]
        blocks = _BlockSums(mid.shape[:2], (kx, ky), (lw, lh))
        in_flight = threading.BoundedSemaphore(4)  # at most 4 chunks decoded at once

        def one(i: int) -> None:  # chunks write disjoint whole blocks of `mid`, so they can run in parallel
            cx, cy = corners[i]
            with in_flight:
                chunk = self._read_px(level, cx, cy, min(cw, lw - cx), min(ch, lh - cy), 255)
                blocks.add(mid, chunk, cx, cy)

        self._map(one, len(corners), None)
        blocks.finish(mid)
        if mid.shape[:2] == (out_h, out_w):  # a view pixel is a block of k source pixels: its exact geometry
            return View(image=mid, downsample=(kx * W0 / lw, ky * H0 / lh))
        img = Image.fromarray(mid).resize((out_w, out_h), Image.Resampling.BOX, box=(0, 0, lw / kx, lh / ky))
        return View(image=np.ascontiguousarray(np.asarray(img)), downsample=(W0 / out_w, H0 / out_h))

    # --- helpers ----------------------------------------------------------------------------------------------

    def _read_px(self, level: int, x: int, y: int, w: int, h: int, fill: int) -> np.ndarray:
        """(h, w, 3) uint8 from level pixel (x, y); pixels outside the level are `fill`."""
        self._check_open()
        W, H = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h) and w and h:
            return self._read_box(level, x0, y0, x1, y1)
        out = np.full((h, w, 3), fill, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y: y1 - y, x0 - x: x1 - x] = self._read_box(level, x0, y0, x1, y1)
        return out

    def _read_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            return self._decode_box(level, x0, y0, x1, y1)
        except SlideError:
            raise
        except Exception as exc:  # decoder errors, missing codecs, I/O errors, OpenSlide errors
            raise SlideReadError(self.path, f"cannot read level {level} region x={x0} y={y0} {x1 - x0}x{y1 - y0} px: "
                                            f"{_codec_hint(exc)}") from None

    def _view_chunk(self, level: int) -> tuple[int, int]:
        """Source chunk (width, height) for assembling a view from `level`: about _VIEW_CHUNK**2 px."""
        return _VIEW_CHUNK, _VIEW_CHUNK

    def _scale(self, level: int) -> tuple[float, float]:
        (W0, H0), (w, h) = self.level_dimensions[0], self.level_dimensions[level]
        return W0 / w, H0 / h

    def _set_mpp(self, found: tuple[float, float] | None, source: str | None, override: float | None) -> None:
        """`override` if given, else the metadata value unless it is a software default or implausible."""
        if override is not None:
            self.mpp, self.mpp_source = (override, override), "override"
            return
        self.mpp, self.mpp_source = found, source if found else None
        for dpi in _DEFAULT_DPI:
            if found and abs(25400.0 / found[0] - dpi) < 0.01 * dpi:
                _warn(f"{self.path}: the resolution tag says {dpi:g} dpi, a software default, not a scan resolution; "
                      "mpp is unknown (pass --mpp to set it)")
                self.mpp = self.mpp_source = None
                return
        if found and not all(_MPP_RANGE[0] < v < _MPP_RANGE[1] for v in found):
            _warn(f"{self.path}: implausible resolution {found[0]:.4g} x {found[1]:.4g} um/px from {source}; mpp is "
                  "unknown (pass --mpp to set it)")
            self.mpp = self.mpp_source = None

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} does not exist; the slide has levels 0 to "
                                        f"{self.level_count - 1}")

    def _check_open(self) -> None:
        if self._closed:
            raise SlideReadError(self.path, "the slide is closed")

    def _map(self, fn: Any, n: int, workers: int | None) -> None:
        """Run fn(0..n-1) in this slide's thread pool (created once, grown if more workers are asked for)."""
        want = min(8, os.cpu_count() or 1) if workers is None else workers  # 8: past that, reads are I/O bound
        if want <= 1 or n <= 1:
            for i in range(n):
                fn(i)
            return
        with self._pool_lock:
            self._check_open()
            if self._pool is None or self._pool._max_workers < want:  # noqa: SLF001 - grow the reused pool
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=want, thread_name_prefix="wsiats-read")
            pool = self._pool
        for _ in pool.map(fn, range(n)):
            pass


class _BlockSums:
    """Block means of a level assembled chunk by chunk: each chunk's whole blocks are reduced by PIL at once;
    the pixels of blocks cut by a chunk border are summed here and averaged when every chunk is in, with
    PIL's own rounding, so a chunked view equals a one-shot one."""

    def __init__(self, shape: tuple[int, int], k: tuple[int, int], size: tuple[int, int]) -> None:
        self.k, self.size = k, size
        self._sums: np.ndarray | None = None  # (rows, cols, 3) uint32, made at the first cut block
        self._cut = np.zeros(shape, bool)
        self._lock = threading.Lock()

    def add(self, mid: np.ndarray, chunk: np.ndarray, cx: int, cy: int) -> None:
        (kx, ky), (lw, lh) = self.k, self.size
        h, w = chunk.shape[:2]
        # whole blocks: from the first block start in the chunk to the last block end in it (or the level's end)
        ax, ay = -(-cx // kx) * kx, -(-cy // ky) * ky
        bx = lw if cx + w == lw else (cx + w) // kx * kx
        by = lh if cy + h == lh else (cy + h) // ky * ky
        if bx > ax and by > ay:
            inner = chunk[ay - cy: by - cy, ax - cx: bx - cx]
            small = np.asarray(Image.fromarray(inner).reduce((kx, ky))) if kx * ky > 1 else inner
            mid[ay // ky: ay // ky + small.shape[0], ax // kx: ax // kx + small.shape[1]] = small
        if (ax, ay, bx, by) == (cx, cy, cx + w, cy + h):
            return
        # the rest of the chunk: bands along its borders whose blocks other chunks complete
        inside = np.zeros((h, w), bool)
        inside[max(ay - cy, 0): max(by - cy, 0), max(ax - cx, 0): max(bx - cx, 0)] = True
        rows = np.arange(cy, cy + h) // ky
        cols = np.arange(cx, cx + w) // kx
        partial = np.where(~inside)
        where = (rows[partial[0]], cols[partial[1]])
        with self._lock:
            if self._sums is None:
                self._sums = np.zeros((*self._cut.shape, 3), np.uint32)
            np.add.at(self._sums, where, chunk[partial].astype(np.uint32))
            self._cut[where] = True

    def finish(self, mid: np.ndarray) -> None:
        if self._sums is None:
            return
        (kx, ky), (lw, lh) = self.k, self.size
        r, c = np.nonzero(self._cut)
        n = (np.minimum(ky, lh - r * ky) * np.minimum(kx, lw - c * kx)).astype(np.uint64)  # pixels per block
        # PIL's rounding: ((sum + n // 2) * multiplier) >> 24, multiplier = (UINT32)(2**32 as float / (256 n))
        mult = (np.float32(4294967296.0) / (256 * n).astype(np.float32)).astype(np.uint64)
        sums = self._sums[r, c].astype(np.uint64)
        mid[r, c] = (((sums + (n // 2)[:, None]) * mult[:, None]) >> 24).astype(np.uint8)


def _composite(rgba: np.ndarray, *, premultiplied: bool) -> np.ndarray:
    """RGB over white: premultiplied rgb + (255 - a); straight rgb * a / 255 + (255 - a)."""
    if rgba.size == 0 or rgba[..., 3].min() == 255:  # opaque: nothing to blend
        return np.ascontiguousarray(rgba[..., :3])
    rgb, a = rgba[..., :3].astype(np.uint16), rgba[..., 3:4].astype(np.uint16)
    if premultiplied:
        out = rgb + (255 - a)
    else:
        out = (rgb * a + 127) // 255 + (255 - a)
    return np.minimum(out, 255).astype(np.uint8)


#: The slide modules, whose frames a warning skips to name the caller.
_SLIDE_FILES = frozenset(os.path.join(os.path.dirname(__file__), name)
                         for name in ("_base.py", "_tiff.py", "_openslide.py", "slide.py"))


_collecting = threading.local()


@contextlib.contextmanager
def collect_notes() -> Iterator[list[str]]:
    """Within the block, in this thread only, the warnings wsiats gives about a slide (a resolution that is
    a software default, a slide without tissue, ...) are appended to the yielded list instead of issued.

    This is how a slide's facts travel with its result from the threads that prepare it: unlike
    `warnings.catch_warnings`, which is process-wide, it never hides another thread's warnings.
    """
    stack = _collecting.__dict__.setdefault("stack", [])
    notes: list[str] = []
    stack.append(notes)
    try:
        yield notes
    finally:
        stack.pop()


def note(message: str) -> None:
    """A fact about a slide: kept (once) by the innermost `collect_notes` of this thread, else a UserWarning
    attributed to the first caller outside the slide modules."""
    stack = getattr(_collecting, "stack", None)
    if stack:
        if message not in stack[-1]:
            stack[-1].append(message)
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename in _SLIDE_FILES:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, UserWarning, stacklevel=level)


_warn = note


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def max_tile_bytes() -> int:
    """The decoded size allowed to one tile or strip: `MAX_TILE_MB`, or WSIATS_MAX_TILE_MB when set."""
    text = os.environ.get("WSIATS_MAX_TILE_MB", "").strip()
    try:
        mb = float(text) if text else MAX_TILE_MB
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise ConfigError(f"WSIATS_MAX_TILE_MB must be a positive number of MiB, not {text!r}")
    return int(mb * 2**20)


def _check_tile_bytes(path: Path, level: int, what: str, w: int, h: int, nbytes: int) -> None:
    limit = max_tile_bytes()
    if nbytes > limit:
        raise SlideError(path, f"level {level} stores {what} of {w} x {h} px ({nbytes / 2**20:.0f} MiB each, "
                               f"decoded), over the {limit / 2**20:g} MiB limit of one decoded tile or strip (a "
                               "decompression bomb?); --max-tile-mb raises the limit")


def _check_side(path: Path, level: int, w: int, h: int) -> None:
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise CorruptSlideError(path, f"level {level} claims {w} x {h} px (limit {MAX_SIDE} a side): the header is "
                                      "corrupt")


def _codec_hint(exc: BaseException) -> str:
    text = _exc_text(exc)
    if re.search(r"COMPRESSION|imagecodecs|codec", text, re.IGNORECASE):
        return (f"{text} (the pixels use a compression this tifffile/imagecodecs build cannot decode; "
                "try --backend openslide)")
    return text

