"""Synthetic whole-slide cohorts whose class shows only at full resolution.

Each slide is white glass with a few large pink tissue blobs. Inside the tissue lie
`n_regions` small elliptic regions filled with a fine texture of period 4 px:

- positive slides: a checkerboard of 2 x 2 px dark-purple and light dots (nuclei-like);
- negative slides: "look-alike" stripes of the same two colours in the same proportion
  (2 px dark, 2 px light, horizontal or vertical).

Every 4 x 4 block of either texture averages to the same colour, so every pyramid level
with downsample >= 4 shows the same purple ellipses on both classes: a model that only
looks at low resolution cannot do better than chance, while a small CNN on a level-0
patch of a region separates the classes trivially. Regions are a few hundred pixels
across, so uniform sampling rarely hits them; attention has to find them.

Pixels are rendered procedurally, tile by tile, at each level directly (not by reducing a
rendered level 0) and streamed to tifffile, so memory does not grow with the slide size.
The base image is piecewise constant on 4 x 4 level-0 blocks (texture, noise aside), which
makes the downsample-4 level exactly the area average of level 0 before JPEG.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsiats._io import atomic_open, atomic_path, claim_folder
from wsiats.errors import ConfigError

#: Microns per level-0 pixel written in every slide (a 40x scan).
MPP = 0.25
#: Slide labels, in the order of their class index.
LABELS = ("negative", "positive")
#: Region kinds in truth.json: "positive" regions on positive slides, "lookalike" on negative ones.
KINDS = ("positive", "lookalike")

# Texture period in level-0 px; the base image is constant on blocks of this size.
_BLOCK = 4
# Pyramid levels are reduced by this factor each (downsample 1, 4, 16, 64, ...).
_LEVEL_FACTOR = 4
# Add levels until the smaller side of the last one is at most this (a thumbnail-sized view).
_MIN_LEVEL_SIDE = 512
# Texture colours (H&E-like haematoxylin purple and a light lilac) and their mean.
_DARK = np.array([90, 40, 130], np.int16)
_LIGHT = np.array([200, 150, 210], np.int16)
_MEAN = ((_DARK + _LIGHT) / 2).astype(np.float32)  # (145, 95, 170): integral, so a 4x4 mean is exact
_GLASS = np.array([240, 240, 240], np.float32)
# The two ends of the low-frequency eosin-pink variation of the tissue.
_PINK_A = np.array([238, 172, 200], np.float32)
_PINK_B = np.array([214, 140, 180], np.float32)
# Level-0 per-pixel noise: standard deviation in grey levels, and a bank of noise tiles reused by hash.
_NOISE_SIGMA = 3.0
_NOISE_TILE = 256
_NOISE_BANK = 8
# Tissue is where the sum of bump kernels (plus a boundary wobble) exceeds this.
_THRESHOLD = 0.5
# A lone bump (1 - r^2)^3 crosses the threshold at r = sqrt(1 - 0.5^(1/3)) ~ 0.454 of its support.
_VISIBLE = float(np.sqrt(1.0 - _THRESHOLD ** (1.0 / 3.0)))
# A region's ellipse scaled by this must lie in tissue (it then contains the region's bounding box).
_TISSUE_MARGIN = 1.5
# Least gap in level-0 px between the bounding boxes of two regions.
_REGION_GAP = 16
# Sample points evaluated at once when rendering a reduced level (a few MB of temporaries).
_MAX_SAMPLES = 1 << 18
# Tiles rendered ahead of the JPEG encoder threads (bounds the memory held by tifffile).
_BUFFER_TILES = 32


@dataclass(frozen=True)
class Region:
    """A textured region: its level-0 pixel bounding box and kind ("positive" or "lookalike")."""

    x: int
    y: int
    width: int
    height: int
    kind: str


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    pattern: int  # 0 checkerboard, 1 horizontal stripes, 2 vertical stripes


class _SlideModel:
    """Per-slide geometry (tissue bumps, regions, colour waves, noise bank) and the renderer."""

    def __init__(self, width: int, height: int, *, positive: bool, seed: int, n_regions: int,
                 region_size: tuple[int, int], n_informative: int | None = None) -> None:
        self.width, self.height, self.seed, self.positive = width, height, seed, positive
        rng = np.random.default_rng(seed)
        side = min(width, height)
        self._bumps: list[tuple[float, ...]] = []
        for _ in range(int(rng.integers(2, 5))):
            cx, cy = rng.uniform(0.22, 0.78) * width, rng.uniform(0.22, 0.78) * height
            # support radius; on small slides at least ~2 region diameters so that regions fit in the tissue
            r = max(rng.uniform(0.22, 0.34) * side, rng.uniform(1.8, 2.4) * min(region_size[1], side / 4))
            self._add_bump(cx, cy, r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi), 1.0)
            for _ in range(int(rng.integers(3, 7))):  # satellite lobes make the outline irregular
                a, d = rng.uniform(0, 2 * np.pi), r * rng.uniform(0.3, 0.65)
                rs = r * rng.uniform(0.35, 0.7)
                self._add_bump(cx + d * np.cos(a), cy + d * np.sin(a), rs * rng.uniform(0.8, 1.25),
                               rs * rng.uniform(0.8, 1.25), rng.uniform(0, np.pi), rng.uniform(0.6, 1.0))
        # boundary wobble: 3 plane waves, wavelength >= 400 px so the outline stays smooth at level 0
        self._wobble = self._waves(rng, 3, max(400.0, 0.12 * side), max(800.0, 0.3 * side))
        # colour variation: 2 plane waves of >= 1500 px (low frequency)
        self._tint = self._waves(rng, 2, max(1500.0, 0.4 * side), max(3000.0, 0.9 * side))
        self._noise = np.rint(rng.normal(0.0, _NOISE_SIGMA, (_NOISE_BANK, _NOISE_TILE, _NOISE_TILE, 3))).astype(np.int16)
        self._noise_pick = rng.integers(0, _NOISE_BANK, size=(61, 67))  # coprime sizes: no visible repeat
        self.regions = self._place_regions(rng, positive=positive, n=n_regions, region_size=region_size,
                                           n_informative=n_informative)

    # --- geometry -------------------------------------------------------------------------------------------

    def _add_bump(self, cx: float, cy: float, rx: float, ry: float, theta: float, weight: float) -> None:
        """A compact kernel weight * (1 - r^2)^3 on a rotated ellipse of support radii rx, ry."""
        c, s = np.cos(theta), np.sin(theta)
        hx, hy = np.hypot(rx * c, ry * s), np.hypot(rx * s, ry * c)  # half sides of the rotated bounding box
        self._bumps.append((cx, cy, c / rx, s / rx, c / ry, s / ry, weight, cx - hx, cx + hx, cy - hy, cy + hy))
        self._boxes = np.array([b[7:] for b in self._bumps])

    @staticmethod
    def _waves(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
        """Rows (kx, ky, phase) of plane waves with random directions and wavelengths in [lo, hi]."""
        ang = rng.uniform(0, np.pi, n)
        k = 2 * np.pi / rng.uniform(lo, hi, n)
        return np.stack([k * np.cos(ang), k * np.sin(ang), rng.uniform(0, 2 * np.pi, n)], axis=1)

    @staticmethod
    def _wave_sum(waves: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Mean of sin(kx x + ky y + p) on the grid ys x xs, computed separably."""
        out = np.zeros((len(ys), len(xs)), np.float32)
        for kx, ky, p in waves:
            ax, ay = kx * xs + p, ky * ys
            out += np.sin(ay)[:, None] * np.cos(ax)[None, :] + np.cos(ay)[:, None] * np.sin(ax)[None, :]
        return out / len(waves)

    def _tissue(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean tissue mask on the grid ys x xs (level-0 coordinates, both ascending)."""
        field = np.zeros((len(ys), len(xs)), np.float32)
        touched = False
        box = self._boxes
        near = (box[:, 0] < xs[-1]) & (box[:, 1] > xs[0]) & (box[:, 2] < ys[-1]) & (box[:, 3] > ys[0])
        for k in np.flatnonzero(near):
            cx, cy, a, b, c, d, w, x0, x1, y0, y1 = self._bumps[k]
            i0, i1 = np.searchsorted(xs, (x0, x1))
            j0, j1 = np.searchsorted(ys, (y0, y1))
            if i0 >= i1 or j0 >= j1:
                continue
            touched = True
            dx = (xs[i0:i1] - cx).astype(np.float32)
            dy = (ys[j0:j1] - cy).astype(np.float32)
            u = dy[:, None] * np.float32(b) + dx[None, :] * np.float32(a)
            v = dy[:, None] * np.float32(c) - dx[None, :] * np.float32(d)
            ker = np.maximum(np.float32(1.0) - u * u - v * v, np.float32(0.0))
            field[j0:j1, i0:i1] += np.float32(w) * ker * ker * ker
        if not touched:
            return np.zeros(field.shape, bool)
        return (field > 0) & (field + np.float32(0.12) * self._wave_sum(self._wobble, xs, ys) > _THRESHOLD)

    def _place_regions(self, rng: np.random.Generator, *, positive: bool, n: int,
                       region_size: tuple[int, int], n_informative: int | None = None) -> list[_Ellipse]:
        """Place n regions; on a positive slide the first `n_informative` (all when None) are checkerboard."""
        side = min(self.width, self.height)
        hi = min(float(region_size[1]), side / 4)  # regions shrink on tiny slides so that n of them fit
        lo = min(float(region_size[0]), hi)
        placed: list[_Ellipse] = []
        informative = n if n_informative is None else n_informative
        for k in range(n):
            dx = rng.uniform(lo, hi)
            dy = float(np.clip(dx * rng.uniform(0.75, 1.33), lo, hi))
            # drawn for every region so that the geometry is the same for both labels of one seed
            stripes = 1 + int(rng.integers(0, 2))
            pattern = 0 if positive and k < informative else stripes
            rx, ry = dx / 2, dy / 2
            for attempt in range(600):
                mx, my = _TISSUE_MARGIN * rx + _BLOCK, _TISSUE_MARGIN * ry + _BLOCK
                cx, cy = rng.uniform(mx, self.width - mx), rng.uniform(my, self.height - my)
                if attempt >= 300:  # tissue too scarce: grow a bump under the candidate
                    s = 1.25 * _TISSUE_MARGIN * max(rx, ry) / _VISIBLE
                    if self._overlaps(placed, cx, cy, rx, ry):
                        continue
                    self._add_bump(cx, cy, s, s, 0.0, 1.0)
                if not self._overlaps(placed, cx, cy, rx, ry) and self._inside_tissue(cx, cy, rx, ry):
                    placed.append(_Ellipse(cx, cy, rx, ry, pattern))
                    break
            else:
                raise ConfigError(f"cannot place {n} regions of {lo:.0f}-{hi:.0f} px in a "
                                  f"{self.width} x {self.height} slide; use fewer or smaller regions")
        return placed

    @staticmethod
    def _overlaps(placed: list[_Ellipse], cx: float, cy: float, rx: float, ry: float) -> bool:
        """Whether the bounding box (plus the gap) meets the bounding box of a placed region."""
        return any(abs(e.cx - cx) < rx + e.rx + _REGION_GAP and abs(e.cy - cy) < ry + e.ry + _REGION_GAP
                   for e in placed)

    def _inside_tissue(self, cx: float, cy: float, rx: float, ry: float) -> bool:
        """Whether every level-0 block in the ellipse scaled by the margin is tissue."""
        mx, my = _TISSUE_MARGIN * rx, _TISSUE_MARGIN * ry
        xs = _block_centres(cx - mx, cx + mx)
        ys = _block_centres(cy - my, cy + my)
        inside = ((xs - cx) / mx)[None, :] ** 2 + ((ys - cy) / my)[:, None] ** 2 <= 1.0
        probe = inside[:: max(1, len(ys) // 8), :: max(1, len(xs) // 8)]  # cheap rejection first
        if not self._tissue(xs[:: max(1, len(xs) // 8)], ys[:: max(1, len(ys) // 8)])[probe].all():
            return False
        return bool(self._tissue(xs, ys)[inside].all())

    def truth(self) -> list[Region]:
        """Each region's tight bounding box (4-px aligned) and kind."""
        out = []
        for i, e in enumerate(self.regions):
            xs = _block_centres(e.cx - e.rx, e.cx + e.rx)
            ys = _block_centres(e.cy - e.ry, e.cy + e.ry)
            m = self._region_index(xs, ys, i) == i
            cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
            x0, x1 = int(xs[cols[0]]) - _BLOCK // 2, int(xs[cols[-1]]) + _BLOCK // 2
            y0, y1 = int(ys[rows[0]]) - _BLOCK // 2, int(ys[rows[-1]]) + _BLOCK // 2
            out.append(Region(x0, y0, x1 - x0, y1 - y0, KINDS[0] if e.pattern == 0 else KINDS[1]))
        return out

    # --- rendering ------------------------------------------------------------------------------------------

    def _region_index(self, xs: np.ndarray, ys: np.ndarray, only: int | None = None) -> np.ndarray:
        """Index of the region holding each grid point, -1 outside every region."""
        idx = np.full((len(ys), len(xs)), -1, np.int16)
        for i, e in enumerate(self.regions):
            if only is not None and i != only:
                continue
            i0, i1 = np.searchsorted(xs, (e.cx - e.rx, e.cx + e.rx))
            j0, j1 = np.searchsorted(ys, (e.cy - e.ry, e.cy + e.ry))
            if i0 >= i1 or j0 >= j1:
                continue
            inside = ((xs[i0:i1] - e.cx) / e.rx)[None, :] ** 2 + ((ys[j0:j1] - e.cy) / e.ry)[:, None] ** 2 <= 1.0
            idx[j0:j1, i0:i1][inside] = i
        return idx

    def _base(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour (float32, texture-free) and region index at level-0 block centres ys x xs."""
        tissue = self._tissue(xs, ys)
        if not tissue.any():
            colour = np.empty((len(ys), len(xs), 3), np.float32)
            colour[:] = _GLASS
        else:
            t = np.float32(0.5) + np.float32(0.5) * self._wave_sum(self._tint, xs, ys)
            colour = _PINK_A + t[:, :, None] * (_PINK_B - _PINK_A)
            if not tissue.all():
                colour = np.where(tissue[:, :, None], colour, _GLASS)
        return colour, self._region_index(xs, ys)

    def render(self, x0: int, y0: int, w: int, h: int, downsample: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the box at (x0, y0) in the pixel grid of the level with that downsample.

        A pixel (i, j) of that level covers level-0 pixels [ds*j, ds*j + ds) x [ds*i, ds*i + ds) and
        holds their area average before noise: exactly for downsample 4 and 16 (up to rounding), from
        4 x 4 samples per pixel for larger ones (which only blurs edges by a fraction of a pixel).
        """
        if downsample == 1:
            return self._render_full(x0, y0, w, h)
        ds = downsample
        s = max(1, min(ds // _BLOCK, 4))  # samples per axis per pixel; exact for ds 4 and 16
        sub = (np.arange(s) + 0.5) * ds / s
        xs = _snap(ds * np.arange(x0, x0 + w)[:, None] + sub[None, :])
        out = np.empty((h, w, 3), np.uint8)
        step = max(1, _MAX_SAMPLES // (w * s * s))  # rows per pass: bounds the temporary arrays
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            ys = _snap(ds * np.arange(y0 + r0, y0 + r1)[:, None] + sub[None, :])
            colour, idx = self._base(xs, ys)
            colour[idx >= 0] = _MEAN  # a texture's area average
            if s > 1:
                colour = colour.reshape(r1 - r0, s, w, s, 3).mean(axis=(1, 3))
            out[r0:r1] = np.rint(colour)
        return out

    def _render_full(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        bx0, by0 = x0 // _BLOCK, y0 // _BLOCK
        bx1, by1 = -(-(x0 + w) // _BLOCK), -(-(y0 + h) // _BLOCK)
        xs = _BLOCK * np.arange(bx0, bx1) + _BLOCK // 2
        ys = _BLOCK * np.arange(by0, by1) + _BLOCK // 2
        colour, idx = self._base(xs.astype(np.float64), ys.astype(np.float64))
        nby, nbx = len(ys), len(xs)
        ax0, ay0 = _BLOCK * bx0, _BLOCK * by0  # the block-aligned superset of the box
        aw, ah = _BLOCK * nbx, _BLOCK * nby
        noise = self._noise_at(ax0, ay0, aw, ah)
        # upsample the blocks and add the noise in one pass
        rows = np.rint(colour).astype(np.int16).repeat(_BLOCK, axis=1).reshape(nby, 1, aw * 3)
        img = (noise.reshape(nby, _BLOCK, aw * 3) + rows).reshape(ah, aw, 3)
        if (idx >= 0).any():
            pix = _upsample(idx)
            hx = ((np.arange(ax0, ax0 + aw) // 2) & 1).astype(bool)[None, :]
            hy = ((np.arange(ay0, ay0 + ah) // 2) & 1).astype(bool)[:, None]
            dark_by_pattern = (hx == hy, np.broadcast_to(~hy, (ah, aw)), np.broadcast_to(~hx, (ah, aw)))
            for i in np.unique(idx[idx >= 0]):
                inside = pix == i
                dark = dark_by_pattern[self.regions[int(i)].pattern]
                img[inside & dark] = (noise + _DARK)[inside & dark]
                img[inside & ~dark] = (noise + _LIGHT)[inside & ~dark]
        ox, oy = x0 - ax0, y0 - ay0
        img = img[oy:oy + h, ox:ox + w]
        np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8)

    def _noise_at(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Zero-mean noise of the box, taken from the bank by a hash of each 256-px cell."""
        n = _NOISE_TILE
        if x0 % n == 0 and y0 % n == 0 and w == n and h == n:
            return self._noise[self._pick(x0 // n, y0 // n)]
        out = np.empty((h, w, 3), np.int16)
        for ty in range(y0 // n, (y0 + h - 1) // n + 1):
            for tx in range(x0 // n, (x0 + w - 1) // n + 1):
                ax0, ay0 = max(x0, tx * n), max(y0, ty * n)
                ax1, ay1 = min(x0 + w, (tx + 1) * n), min(y0 + h, (ty + 1) * n)
                out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = self._noise[self._pick(tx, ty)][
                    ay0 - ty * n:ay1 - ty * n, ax0 - tx * n:ax1 - tx * n]
        return out

    def _pick(self, tx: int, ty: int) -> int:
        return int(self._noise_pick[ty % self._noise_pick.shape[0], tx % self._noise_pick.shape[1]])

    def tiles(self, downsample: int, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
        """Full tiles of one level in row-major order (edge tiles continue the pattern past the border)."""
        for ty in range(-(-height // tile)):
            for tx in range(-(-width // tile)):
                yield self.render(tx * tile, ty * tile, tile, tile, downsample)


def _upsample(blocks: np.ndarray) -> np.ndarray:
    """Repeat each element of a block grid into a 4 x 4 square of pixels (a new contiguous array)."""
    ny, nx = blocks.shape[:2]
    rest = blocks.shape[2:]
    grid = blocks.reshape(ny, 1, nx, 1, *rest)
    return np.broadcast_to(grid, (ny, _BLOCK, nx, _BLOCK, *rest)).reshape(ny * _BLOCK, nx * _BLOCK, *rest)


def _block_centres(lo: float, hi: float) -> np.ndarray:
    """Level-0 block centres (4k + 2) between lo and hi, as float64."""
    k0, k1 = int(np.floor(lo / _BLOCK)), int(np.ceil(hi / _BLOCK))
    return (_BLOCK * np.arange(k0, k1 + 1) + _BLOCK // 2).astype(np.float64)


def _snap(points: np.ndarray) -> np.ndarray:
    """Flatten sample points and move each to the centre of its level-0 block."""
    return (np.floor(points.ravel() / _BLOCK) * _BLOCK + _BLOCK // 2).astype(np.float64)


def level_shapes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(width, height, downsample) of each pyramid level: downsample 1, 4, 16, ... (at least two levels)."""
    levels = [(width, height, 1)]
    while len(levels) < 2 or min(levels[-1][:2]) > _MIN_LEVEL_SIDE:
        ds = levels[-1][2] * _LEVEL_FACTOR
        if min(width, height) // ds < 1:
            break
        levels.append((width // ds, height // ds, ds))
    return levels


def make_slide(path: Path, *, size: int | tuple[int, int], label: str, seed: int, ome: bool = False,
               n_regions: int = 3, region_size: tuple[int, int] = (200, 400), tile: int = 256,
               quality: int = 90, n_informative: int | None = None) -> list[Region]:
    """Write one synthetic pyramidal slide to `path`; return its textured regions.

    `size` is the level-0 side, or (width, height). `label` is "positive" (checkerboard
    regions) or "negative" (look-alike stripes). With `n_informative`, only that many regions of
    a positive slide are checkerboard and the others look-alike decoys (a needle-in-a-haystack
    slide); by default every region of a positive slide is checkerboard. Level 0 is 0.25 um/px; levels have
    downsample 1, 4, 16, ... down to a side of at most 512 px. A generic TIFF keeps the
    levels in the main IFD chain; `ome=True` writes an OME-TIFF with the levels as SubIFDs.
    Tiles are JPEG (YCbCr without chroma subsampling) at `quality`. Deterministic in `seed`.
    """
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if label not in LABELS:
        raise ConfigError(f"label {label!r} is not one of {', '.join(LABELS)}")
    if min(width, height) < 256:
        raise ConfigError(f"slide size {width} x {height} is too small: each side must be at least 256 px")
    if tile <= 0 or tile % 16:
        raise ConfigError(f"tile {tile} must be a positive multiple of 16 (a TIFF requirement)")
    if seed < 0:
        raise ConfigError(f"seed {seed} must be >= 0")
    if n_regions < 0:
        raise ConfigError(f"n_regions {n_regions} must be >= 0")
    if n_informative is not None and not 0 <= n_informative <= n_regions:
        raise ConfigError(f"n_informative {n_informative} must be in 0..n_regions ({n_regions})")
    if not 0 < region_size[0] <= region_size[1]:
        raise ConfigError(f"region_size {region_size} must be (min, max) diameters with 0 < min <= max")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality {quality} must be in 1..100")
    model = _SlideModel(width, height, positive=label == "positive", seed=seed, n_regions=n_regions,
                        region_size=region_size, n_informative=n_informative)
    _write_pyramid(Path(path), model, tile=tile, quality=quality, ome=ome)
    return model.truth()


def _write_pyramid(path: Path, model: _SlideModel, *, tile: int, quality: int, ome: bool) -> None:
    levels = level_shapes(model.width, model.height)
    tile_bytes = tile * tile * 3
    workers = max(1, min(4, os.cpu_count() or 1))
    options: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
        "subsampling": (1, 1),  # no chroma subsampling: the 2-px colour texture survives intact
        "tile": (tile, tile),
        "dtype": np.uint8,
        "resolutionunit": "CENTIMETER",
        "maxworkers": workers,
        "buffersize": _BUFFER_TILES * tile_bytes,
    }
    bigtiff = model.width * model.height * 3 > 2**31  # classic TIFF offsets stop at 4 GiB; JPEG rarely gets near
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=ome, shaped=False) as tw:
            for i, (w, h, ds) in enumerate(levels):
                extra: dict[str, Any] = {"subfiletype": 1} if i else {}
                if i == 0 and ome:
                    extra["subifds"] = len(levels) - 1
                    extra["metadata"] = {"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm",
                                         "PhysicalSizeY": MPP, "PhysicalSizeYUnit": "µm"}
                pixels_per_cm = 1e4 / (MPP * ds)  # 1 cm = 1e4 um
                tw.write(data=model.tiles(ds, w, h, tile), shape=(h, w, 3),
                         resolution=(pixels_per_cm, pixels_per_cm), **options, **extra)
        if ome:
            name = f"wsiats-synth:{model.seed}:{model.positive}:{model.width}x{model.height}"
            _fix_ome_uuid(tmp, uuid.uuid5(uuid.NAMESPACE_URL, name))


def _fix_ome_uuid(path: Path, value: uuid.UUID) -> None:
    """Replace the time-based UUID tifffile writes into the OME-XML, so that the bytes depend on the seed only."""
    key = b'UUID="urn:uuid:'
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags["ImageDescription"]  # type: ignore[union-attr]  # page 0 is a TiffPage
        offset, count = tag.valueoffset, tag.count
    with open(path, "r+b") as fh:
        fh.seek(offset)
        at = fh.read(count).find(key)
        if at >= 0:
            fh.seek(offset + at + len(key))
            fh.write(str(value).encode())  # same length (36 characters): nothing else moves


#: Cohort kinds of `make_cohort`.
COHORT_KINDS = ("regions", "needles")


def needle_layout(slide_seed: int) -> tuple[int, int]:
    """(regions, informative ones on a positive slide) of a needles slide: 2-6 regions, 1-2 informative, >= 1 decoy."""
    rng = np.random.default_rng([slide_seed, 7])
    n_regions = int(rng.integers(2, 7))
    return n_regions, int(rng.integers(1, min(2, n_regions - 1) + 1))


def make_cohort(out: Path, *, n: int, size: int, seed: int, test_fraction: float = 0.25, ome_every: int = 3,
                kind: str = "regions", progress: Callable[[int, int], None] | None = None, overwrite: bool = False,
                **slide_kw: Any) -> Path:
    """Write `n` slides to OUT/slides, OUT/labels.csv and OUT/truth.json; return the labels path.

    kind "regions": every region of a positive slide is informative (checkerboard), every region of
    a negative slide a look-alike. kind "needles": every slide holds 2-6 regions that look alike below
    full resolution; on a positive slide 1-2 of them are informative and the rest decoys, on a
    negative slide all are decoys, so the informative area is a fraction of a percent of the tissue
    of a large slide and the low-resolution view cannot tell a positive slide from a negative one.

    Labels are balanced (one extra negative when `n` is odd) and shuffled by `seed`.
    `test_fraction` of each class gets split "test" (at least one of each class when
    n >= 4 and the fraction is positive, and always one of each left for training).
    Every `ome_every`-th slide is an OME-TIFF (0: none). `slide_kw` goes to `make_slide`.
    `progress(done, total)` is called after each slide. A non-empty OUT that an earlier
    `make_cohort` did not write is refused unless `overwrite` (see `wsiats._io.claim_folder`).
    """
    if n < 2:
        raise ConfigError(f"n={n}: a cohort needs at least 2 slides (one of each class)")
    if not 0 <= test_fraction < 1:
        raise ConfigError(f"test_fraction={test_fraction} must be in [0, 1)")
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    if ome_every < 0:
        raise ConfigError(f"ome_every={ome_every} must be >= 0 (0: no OME-TIFF)")
    if kind not in COHORT_KINDS:
        raise ConfigError(f"kind={kind!r} must be one of {', '.join(COHORT_KINDS)}")
    out = Path(out)
    claim_folder(out, command="synth", overwrite=overwrite)
    rng = np.random.default_rng(seed)
    labels = [LABELS[0]] * (n - n // 2) + [LABELS[1]] * (n // 2)
    labels = [labels[i] for i in rng.permutation(n)]
    splits = ["train"] * n
    for name in LABELS:
        members = [i for i in range(n) if labels[i] == name]
        k = int(round(test_fraction * len(members)))
        if n >= 4 and test_fraction > 0:
            k = max(k, 1)
        k = min(k, len(members) - 1)
        for i in rng.choice(members, size=k, replace=False) if k > 0 else []:
            splits[int(i)] = "test"
    truth: dict[str, Any] = {"mpp": MPP, "kind": kind, "slides": {}}
    for i in range(n):
        slide_id = f"synth_{i:04d}"
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        kw = dict(slide_kw)
        if kind == "needles":
            kw["n_regions"], kw["n_informative"] = needle_layout(slide_seed)
        regions = make_slide(out / "slides" / f"{slide_id}.tif", size=size, label=labels[i], seed=slide_seed,
                             ome=ome_every > 0 and i % ome_every == ome_every - 1, **kw)
        truth["slides"][slide_id] = {"label": labels[i], "width": size, "height": size,
                                     "regions": [asdict(r) for r in regions]}
        if progress is not None:
            progress(i + 1, n)
    labels_path = out / "labels.csv"
    with atomic_open(labels_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "split"])
        for i in range(n):
            writer.writerow([f"synth_{i:04d}", labels[i], splits[i]])
    with atomic_open(out / "truth.json", "w") as fh:
        json.dump(truth, fh, indent=1)
        fh.write("\n")
    return labels_path
