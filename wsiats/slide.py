"""Lazy, multi-backend access to whole-slide images.

`open_slide` returns a `Slide` backed by tifffile (the TIFF family: generic tiled
pyramids, Aperio SVS, OME-TIFF with SubIFD pyramids, BigTIFF) or by OpenSlide (NDPI, MRXS,
SCN, BIF, DICOM, ...). Nothing is decoded at open time; reads decode only the tiles they touch.

Conventions (the same for both backends):
- `location` arguments are level-0 pixel coordinates of a top-left corner, as in OpenSlide;
  the level pixel is floor(x * level_width / level0_width) (per-axis scale). OpenSlide itself
  interpolates sub-pixel offsets, so the backends agree exactly when x is a multiple of the
  level's downsample (always at level 0).
- Pixels outside the image are `fill` (255: white, like glass). Tiles a file leaves empty
  (byte count 0) are glass too and read as white in both backends.
- Transparent pixels (OpenSlide's premultiplied ARGB, TIFF alpha) are composited over white.
- Every failure is a `wsiats.errors.SlideError` subclass whose message starts with the path.
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

from wsiats.errors import ConfigError, CorruptSlideError, SlideError, SlideNotFoundError, SlideReadError
from wsiats.errors import UnsupportedSlideError

BACKENDS = ("auto", "tifffile", "openslide")
#: Suffixes OpenSlide should read first: vendor layouts tifffile exposes differently, and non-TIFF containers.
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
#: tifffile flags of vendor TIFF variants that OpenSlide understands better, with OpenSlide's vendor names.
_OPENSLIDE_TIFF_VENDORS = {"ndpi": "hamamatsu", "scn": "leica", "philips": "philips", "bif": "ventana"}
#: Largest plausible side: scanners stay below ~250k px; a bigger header value means corruption.
MAX_SIDE = 10**6
#: Pixel budget of one whole-level read or one view (2**28 px = 768 MiB of RGB).
PIXEL_BUDGET = 2**28
#: Side of the source chunks a view is assembled from when its source level is large (3 MiB of RGB).
_VIEW_CHUNK = 1024
#: Levels whose downsample is within 1% of the requested one count as equal (pyramid rounding).
_LEVEL_TOLERANCE = 0.01
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
    downsample: tuple[float, float]  # level-0 pixels per view pixel, x and y: (W0 / w, H0 / h)


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
        level = self.best_level_for_downsample(downsample)
        sx, sy = self._scale(level)
        exact = abs(self.level_downsamples[level] / downsample - 1.0) <= _LEVEL_TOLERANCE
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
        chunks of `_VIEW_CHUNK` source px: each chunk is reduced by integer factors (kx, ky) =
        floor(source px per view px) with block means, and since chunk sides are multiples of kx and
        ky no block straddles two chunks, so there are no seams (chunked and one-shot reads give the
        same pixels); the small intermediate is then box-resized once to the final size.
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
        kx, ky = max(1, int(lw / out_w)), max(1, int(lh / out_h))
        cw, ch = self._view_chunk(level)
        cw = lw if cw >= lw else max(kx, cw // kx * kx)
        ch = lh if ch >= lh else max(ky, ch // ky * ky)
        mid = np.empty((-(-lh // ky), -(-lw // kx), 3), np.uint8)
        corners = [(cx, cy) for cy in range(0, lh, ch) for cx in range(0, lw, cw)]
        in_flight = threading.BoundedSemaphore(4)  # at most 4 chunks decoded at once

        def one(i: int) -> None:  # chunks write disjoint blocks of `mid`, so they can run in parallel
            cx, cy = corners[i]
            with in_flight:
                chunk = self._read_px(level, cx, cy, min(cw, lw - cx), min(ch, lh - cy), 255)
                small = np.asarray(Image.fromarray(chunk).reduce((kx, ky))) if kx * ky > 1 else chunk
            mid[cy // ky: cy // ky + small.shape[0], cx // kx: cx // kx + small.shape[1]] = small

        self._map(one, len(corners), None)
        if mid.shape[:2] != (out_h, out_w):
            img = Image.fromarray(mid).resize((out_w, out_h), Image.Resampling.BOX, box=(0, 0, lw / kx, lh / ky))
            mid = np.asarray(img)
        return View(image=np.ascontiguousarray(mid), downsample=(W0 / out_w, H0 / out_h))

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
    attributed to the first caller outside this module."""
    stack = getattr(_collecting, "stack", None)
    if stack:
        if message not in stack[-1]:
            stack[-1].append(message)
        return
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, UserWarning, stacklevel=level)


_warn = note


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


# --- OpenSlide ----------------------------------------------------------------------------------------------------


class OpenSlideSlide(Slide):
    """OpenSlide backend (openslide-python with the openslide-bin library)."""

    backend = "openslide"

    def __init__(self, path: Path, *, mpp: float | None = None, open_path: Path | None = None) -> None:
        super().__init__(path)
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(open_path or path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise UnsupportedSlideError(path, "not a whole-slide image format tifffile or OpenSlide can read") from None
        except Exception as exc:  # OpenSlideError: a known format with broken content
            raise CorruptSlideError(path, f"OpenSlide cannot open it ({_exc_text(exc)})") from None
        try:
            osr = self._osr
            self.level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)
            self.properties = {str(k): str(v) for k, v in osr.properties.items()}
            self.associated_names = tuple(sorted(osr.associated_images.keys()))
            for i, (w, h) in enumerate(self.level_dimensions):
                _check_side(path, i, w, h)
        except SlideError:
            self._osr.close()
            raise
        except Exception as exc:
            self._osr.close()
            raise CorruptSlideError(path, f"OpenSlide cannot read its metadata ({_exc_text(exc)})") from None
        p = self.properties
        self.vendor = p.get("openslide.vendor") or None
        self.objective_power = _float(p.get("openslide.objective-power"))
        mx, my = _float(p.get("openslide.mpp-x")), _float(p.get("openslide.mpp-y"))
        self._set_mpp((mx, my or mx) if mx else None, "openslide", mpp)

    def _decode_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.level_downsamples[level]  # OpenSlide takes level-0 coordinates and divides by this
        img = self._osr.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        # openslide-python un-premultiplies ARGB into straight RGBA; transparent (missing) tiles become white
        return _composite(np.asarray(img), premultiplied=False)

    def _associated(self, name: str) -> np.ndarray:
        return _composite(np.asarray(self._osr.associated_images[name]), premultiplied=False)

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._osr.close()


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


# --- opening ------------------------------------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders


def open_slide(path: str | Path, *, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily.

    backend "auto": tifffile for the TIFF family (also any TIFF whose first series is 8-bit RGB),
    OpenSlide for the rest and for vendor TIFF variants (NDPI, SCN, Philips, BIF); each falls back
    to the other when it cannot open the file. "tifffile" or "openslide" forces one.
    `mpp` (microns per level-0 pixel) overrides the file's metadata.
    A directory is accepted only when it holds DICOM files (.dcm): OpenSlide opens the first one and
    finds the other levels beside it; any other directory is a SlideNotFoundError.
    """
    from wsiats._tiff import TiffSlide

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    try:
        override = None if mpp is None else float(mpp)
    except (TypeError, ValueError):
        override = math.nan
    if override is not None and not (math.isfinite(override) and override > 0):
        raise ConfigError(f"--mpp must be a positive number of microns per pixel, not {mpp!r}")
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path, "no such file")
    if path.is_dir():
        dcm = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
        if not dcm or backend == "tifffile":
            raise SlideNotFoundError(path, "is a directory, not a slide file (only a folder of DICOM .dcm files is "
                                           "read as one slide)")
        return OpenSlideSlide(path, mpp=override, open_path=dcm[0])
    if not path.is_file():
        raise SlideNotFoundError(path, "is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise SlideReadError(path, f"cannot read the file ({exc.strerror or _exc_text(exc)})") from None
    if size == 0:
        raise CorruptSlideError(path, "file is empty (0 bytes)")
    is_tiff = head in _TIFF_MAGIC
    if backend == "tifffile":
        if not is_tiff:
            raise UnsupportedSlideError(path, "not a TIFF file, so tifffile cannot read it; try --backend openslide")
        return TiffSlide(path, mpp=override)
    if backend == "openslide":
        return OpenSlideSlide(path, mpp=override)
    if not is_tiff:
        return OpenSlideSlide(path, mpp=override)
    if path.name.lower().endswith(OPENSLIDE_SUFFIXES):
        try:
            return OpenSlideSlide(path, mpp=override)
        except SlideError as exc:
            first = exc
        try:
            return TiffSlide(path, mpp=override)
        except SlideError:
            raise first from None
    try:
        slide = TiffSlide(path, mpp=override)
    except CorruptSlideError as exc:  # a TIFF tifffile cannot parse: OpenSlide's parser may be more forgiving
        try:
            return OpenSlideSlide(path, mpp=override)
        except SlideError:
            raise exc from None
    if slide.vendor in _OPENSLIDE_TIFF_VENDORS.values():  # vendor TIFF variants: OpenSlide knows their layout
        try:
            other = OpenSlideSlide(path, mpp=override)
        except SlideError:
            return slide
        slide.close()
        return other
    return slide


def describe(slide: Slide) -> dict[str, Any]:
    """JSON-able summary of a slide: what `wsiats info` prints."""
    path = slide.path
    try:
        file_size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())
    except OSError:
        file_size = None
    return {
        "path": str(path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "mpp": None if slide.mpp is None else list(slide.mpp),
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "associated_images": list(slide.associated_names),
        "file_size": file_size,
        "gigapixels": slide.dimensions[0] * slide.dimensions[1] / 1e9,
    }


def __getattr__(name: str) -> Any:
    """`wsiats.slide.TiffSlide` without importing the tifffile backend at module import."""
    if name == "TiffSlide":
        from wsiats._tiff import TiffSlide

        return TiffSlide
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
