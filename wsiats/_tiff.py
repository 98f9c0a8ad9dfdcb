"""The tifffile backend of `wsiats.slide`: the TIFF family (generic tiled pyramids, Aperio SVS,
OME-TIFF with SubIFD pyramids, BigTIFF), read tile by tile.

Ordinary levels are decoded tile by tile by tifffile's own decoder from bytes read with
os.pread; other layouts (planar RGB, multi-page levels) go through `tif.aszarr(level=...)`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from wsiats import _base
from wsiats._base import (
    _OPENSLIDE_TIFF_VENDORS,
    _UNITS_UM,
    Slide,
    _check_side,
    _check_tile_bytes,
    _composite,
    _exc_text,
    _warn,
    max_tile_bytes,
)
from wsiats.errors import CorruptSlideError, SlideError, SlideReadError, UnsupportedSlideError


class _LogCollector(logging.Handler):
    """Collects this thread's tifffile warnings (a handler also stops Python printing them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), []  # type: ignore[var-annotated]

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_log() -> Iterator[_LogCollector]:
    handler, logger = _LogCollector(), logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _TileCache:
    """Decoded tiles of every open level, least recently used first out, at most `max_bytes` in all (one
    bound for the process, however many slides are open). Patches drawn near each other share file
    tiles: a training step's 64 candidate patches of a 4k slide took 127 ms without it, 104 ms with it
    (one step, the cache cleared before it). Only patch-sized reads use it (`_TileLevel.read`), never a
    view's chunks. Thread-safe; cached tiles are read-only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self.max_bytes // 8:  # a whole strip or a huge tile: not worth the room
            return
        tile.setflags(write=False)
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self._bytes = 0

    def drop(self, level: int) -> None:
        """Forget the tiles of one level (its slide was closed)."""
        with self._lock:
            for key in [k for k in self._tiles if k[0] == level]:
                self._bytes -= self._tiles.pop(key).nbytes


#: The process's cache of decoded tiles (`_TileLevel.read`).
TILE_CACHE = _TileCache(64 * 2**20)
_LEVEL_IDS = itertools.count()


class _TileLevel:
    """A level decoded tile by tile with tifffile's decoder: bytes via os.pread (no shared file
    position), codecs release the GIL, so reads scale with threads, which zarr's single event
    loop does not (benchmarks/bench_read.py). Empty tiles (byte count 0) are `fill`."""

    def __init__(self, lev: Any, fd: int, fill: int = 255, table: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        page, key = lev.pages[0], lev.keyframe
        self._offsets, self._counts = table if table is not None else _tile_table(page, fd)
        self._W, self._H = int(key.imagewidth), int(key.imagelength)
        if key.is_tiled:
            self._th, self._tw = int(key.tilelength), int(key.tilewidth)
        else:
            self._th, self._tw = int(key.rowsperstrip) or self._H, self._W
        self._ntx = -(-self._W // self._tw)
        self.stripped = not key.is_tiled
        self.tile = (self._tw, self._th)
        self._S = int(key.samplesperpixel)
        self._decode = key.decode
        self._kwargs = {"jpegtables": page.jpegtables, "jpegheader": key.jpegheader, "_fullsize": True}
        self._fd, self._fill = fd, fill
        # whole JPEG streams per tile (NDPI's tiles are restart intervals behind a shared header: not checked)
        self._jpeg = int(key.compression) == 7 and key.jpegheader is None
        self.cache_id = next(_LEVEL_IDS)  # never reused, unlike id(): a new slide cannot hit an old slide's tiles

    @staticmethod
    def supports(lev: Any) -> bool:
        return len(lev.pages) == 1 and lev.pages[0] is not None and int(lev.keyframe.planarconfig) == 1

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """(y1 - y0, x1 - x0, samples) of the level; the box must lie inside it."""
        th, tw = self._th, self._tw
        out = np.empty((y1 - y0, x1 - x0, self._S), np.uint8)
        # patch-sized reads share tiles with their neighbours; a view's chunks decode each tile once anyway
        cached = (y1 - y0) * (x1 - x0) <= 4 * tw * th
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                dst = out[ay0 - y0: ay1 - y0, ax0 - x0: ax1 - x0]
                index = ty * self._ntx + tx
                count, offset = int(self._counts[index]), int(self._offsets[index])
                if count == 0 or offset == 0:
                    dst[:] = self._fill
                    continue
                tile = TILE_CACHE.get((self.cache_id, index)) if cached else None
                if tile is None:
                    data = os.pread(self._fd, count, offset)
                    if len(data) != count:
                        raise OSError(f"tile {index} ends past the end of the file")
                    if self._jpeg:
                        _check_jpeg(data, index)
                    tile = self._decode(data, index, **self._kwargs)[0]
                    tile = tile.reshape(-1, tw, self._S)
                    if cached:
                        TILE_CACHE.put((self.cache_id, index), tile)
                dst[:] = tile[ay0 - ty * th: ay1 - ty * th, ax0 - tx * tw: ax1 - tx * tw]
        return out


#: Tile (or strip) tables of more entries than this are read from the file as one array (`_tile_table`).
_RAW_TABLE_ABOVE = 4096
#: TIFF field types of offsets and byte counts: SHORT, LONG, LONG8.
_TABLE_TYPES = {3: "u2", 4: "u4", 16: "u8"}


def _tile_table(page: Any, fd: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, byte counts) of a page's tiles or strips, int64 arrays.

    tifffile keeps them as tuples of Python ints; turning one tuple of a 20-gigapixel level (305k tiles) into an
    array took ~15 ms, and opening a slide needs the two tables of every level (for the checks and the reader).
    So a large table is read from the file as one array, `page.dataoffsets` / `page.databytecounts` compared at 17
    entries: any difference (a vendor's correction by tifffile, NDPI's high bytes) takes tifffile's values."""
    return _table(page, page.dataoffsets, (324, 273), fd), _table(page, page.databytecounts, (325, 279), fd)


def _table(page: Any, values: Any, codes: tuple[int, int], fd: int | None) -> np.ndarray:
    """`values` (the table of the first tag of `codes` that the page has) as an int64 array."""
    n, tags = len(values), getattr(page, "tags", None)  # a TiffFrame (a page of a multi-page level) has no tags
    tag = next((tags[c] for c in codes if c in tags), None) if tags is not None else None
    tif = page.parent
    if (fd is None or n <= _RAW_TABLE_ABOVE or tag is None or tag.count != n or int(tag.dtype) not in _TABLE_TYPES
            or tif.is_ndpi):
        return np.asarray(values, dtype=np.int64)
    dtype = np.dtype(_TABLE_TYPES[int(tag.dtype)]).newbyteorder(tif.byteorder)
    raw = os.pread(fd, n * dtype.itemsize, int(tag.valueoffset))
    if len(raw) != n * dtype.itemsize:
        return np.asarray(values, dtype=np.int64)
    table = np.frombuffer(raw, dtype).astype(np.int64)
    probe = np.unique(np.linspace(0, n - 1, 17).astype(np.int64))
    if any(int(table[i]) != int(values[i]) for i in probe):
        return np.asarray(values, dtype=np.int64)
    return table


def _check_jpeg(data: bytes, index: int) -> None:
    """libjpeg decodes a damaged stream without an error (grey or smeared blocks where data is missing), so a
    JPEG tile must at least start with its start-of-image marker and end with its end-of-image marker
    (trailing zero padding allowed): a tile whose end was cut or zeroed fails here."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        where = "start-of-image" if not data.startswith(b"\xff\xd8") else "end-of-image"
        raise ValueError(f"JPEG tile {index} is damaged (no {where} marker): the file is corrupt")


class _ZarrLevel:
    """Any other layout (planar samples, multi-page levels) through tifffile's zarr store."""

    def __init__(self, series: Any, level: int, fill: int = 255) -> None:
        import zarr

        self._store = series.aszarr(level=level, fillvalue=fill)
        self._array = zarr.open(self._store, mode="r")
        self._planar = series.levels[level].axes == "SYX"
        key = series.levels[level].keyframe
        self.stripped = not key.is_tiled
        self.tile = ((int(key.tilewidth), int(key.tilelength)) if key.is_tiled
                     else (int(key.imagewidth), int(key.rowsperstrip) or int(key.imagelength)))

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if self._planar:
            return np.moveaxis(np.asarray(self._array[:, y0:y1, x0:x1]), 0, -1)  # type: ignore[index]  # a zarr Array
        return np.asarray(self._array[y0:y1, x0:x1])  # type: ignore[index]

    def close(self) -> None:
        self._store.close()


class TiffSlide(Slide):
    """tifffile backend: each level is decoded tile by tile on demand (zarr for unusual layouts)."""

    backend = "tifffile"

    def __init__(self, path: Path, *, mpp: float | None = None, _reader: str = "auto") -> None:
        super().__init__(path)
        import tifffile

        self._tif: Any = None
        self._fd: int | None = None
        self._levels: list[_TileLevel | _ZarrLevel] = []
        self._reader = _reader
        with _tifffile_log() as logged:
            try:
                self._tif = tifffile.TiffFile(path)
                self._init(mpp)
            except Exception as exc:  # anything tifffile/zarr raise on a malformed file
                self._close()
                if isinstance(exc, SlideError):
                    raise
                broken = isinstance(exc, tifffile.TiffFileError)
                what = "broken TIFF structure" if broken else "tifffile cannot parse it"
                raise CorruptSlideError(path, f"{what} ({_exc_text(exc)})") from None
        for msg in logged.messages:
            _warn(f"{path}: tifffile: {msg}")

    def _init(self, mpp: float | None) -> None:
        tif = self._tif
        if not tif.series or not tif.pages:
            raise CorruptSlideError(self.path, "broken TIFF structure (no readable image in it)")
        # the main image: the largest series (OME files may list a label or macro first)
        series = max(tif.series, key=lambda se: _area(se))
        levels = list(series.levels)
        if hasattr(os, "pread"):  # tile tables are read with it; so are tiles, unless the zarr reader is asked for
            self._fd = os.open(self.path, os.O_RDONLY)
        tables = [[_tile_table(p, self._fd) for p in lev.pages if p is not None] for lev in levels]
        dims: list[tuple[int, int]] = []
        for i, lev in enumerate(levels):
            self._check_page(lev, i, tables[i])
            shape = dict(zip(lev.axes, lev.shape))
            dims.append((int(shape["X"]), int(shape["Y"])))
        self.level_dimensions = tuple(dims)
        W0, H0 = dims[0]
        self.level_downsamples = tuple((W0 / w + H0 / h) / 2 for w, h in dims)  # OpenSlide's convention
        key = levels[0].keyframe
        # 8-bit greyscale (brightfield scanned in grey): each value becomes an RGB triple
        self._grey = int(key.samplesperpixel) == 1
        self._min_is_white = self._grey and int(key.photometric) == 0
        extra = tuple(int(e) for e in key.extrasamples)[:1]  # ExtraSamples 1: premultiplied alpha, 2: straight alpha
        self._alpha = int(key.samplesperpixel) == 4 and extra in ((1,), (2,))
        self._premultiplied = extra == (1,)
        # empty tiles (byte count 0) are glass: fill them white, as OpenSlide renders them transparent
        for i, lev in enumerate(levels):
            if self._fd is not None and self._reader != "zarr" and _TileLevel.supports(lev):
                self._levels.append(_TileLevel(lev, self._fd, 255, tables[i][0]))
            else:
                self._levels.append(_ZarrLevel(series, i, 255))
        flags = [v for k, v in _OPENSLIDE_TIFF_VENDORS.items() if getattr(tif, f"is_{k}", False)]
        self.vendor = "aperio" if tif.is_svs else "ome" if tif.is_ome else flags[0] if flags else "generic-tiff"
        self.properties = self._read_properties(key)
        self.objective_power = None
        found: tuple[float, float] | None = None
        source: str | None = None
        if tif.is_svs:
            svs = self._svs_meta()
            if svs.get("MPP"):
                found, source = (float(svs["MPP"]), float(svs["MPP"])), "aperio"
            if svs.get("AppMag"):
                self.objective_power = float(svs["AppMag"])
        if tif.is_ndpi and float(key.ndpi_tags.get("Magnification") or 0) > 0:  # Hamamatsu tag 65421
            self.objective_power = float(key.ndpi_tags["Magnification"])
        if found is None and tif.is_ome:
            found, source = self._ome_mpp()
        if found is None and not (282 in key.tags and 283 in key.tags) and mpp is None:
            # tifffile reports a missing tag as 1 pixel per inch: say the tag is missing instead
            _warn(f"{self.path}: no resolution tag (XResolution/YResolution), so mpp is unknown (pass --mpp to "
                  "set it)")
        elif found is None:
            found, source = _tiff_resolution_mpp(key)
        self._set_mpp(found, source, mpp)
        self._assoc = {se.name.lower(): se for se in tif.series
                       if se is not series and se.name.lower() in ("thumbnail", "label", "macro")}
        self.associated_names = tuple(sorted(self._assoc))

    def _check_page(self, lev: Any, level: int, tables: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Refuse non-RGB pixels, absurd sizes, and tiles that lie past the end of the file (`tables`: the
        `_tile_table` of each of the level's pages)."""
        key = lev.keyframe
        shape = dict(zip(lev.axes, lev.shape))
        channels = int(shape.get("S", shape.get("C", 1)))  # type: ignore[arg-type]
        extra = [f"{a}={n}" for a, n in shape.items() if a not in "YXSC" and n > 1]
        if int(key.compression) == 6:  # tifffile reads such pages as YCbCr without a decoder
            raise UnsupportedSlideError(self.path, "uses old-style JPEG compression (TIFF compression 6, replaced in "
                                                   "1995), which neither tifffile nor OpenSlide decodes; re-save it "
                                                   "as tiled JPEG (e.g. vips tiffsave --tile --pyramid "
                                                   "--compression jpeg)")
        if extra:
            raise UnsupportedSlideError(self.path, f"holds a stack of images ({', '.join(extra)}); wsiats reads one "
                                                   "2-D RGB image per slide")
        if channels not in (1, 3, 4) or lev.dtype != np.uint8 or "Y" not in shape or "X" not in shape:
            raise UnsupportedSlideError(self.path, f"has {channels} channel(s) of {lev.dtype}; wsiats needs 8-bit RGB "
                                                   "or 8-bit greyscale")
        if int(key.photometric) not in ((0, 1) if channels == 1 else (2, 6)):  # grey: min-is-white/black; RGB, YCbCr
            raise UnsupportedSlideError(self.path, f"stores {getattr(key.photometric, 'name', key.photometric)} "
                                                   "pixels; wsiats needs 8-bit RGB or 8-bit greyscale")
        if lev.axes not in (("YX",) if channels == 1 else ("YXS", "SYX")):
            raise UnsupportedSlideError(self.path, f"has pixel axes {lev.axes}; wsiats reads RGB stored as YXS or SYX")
        if int(key.photometric) == 6 and int(key.compression) != 7:  # YCbCr that is not JPEG: stays YCbCr in tifffile
            raise UnsupportedSlideError(self.path, "stores YCbCr pixels without JPEG; tifffile cannot convert them "
                                                   "to RGB")
        _check_side(self.path, level, int(shape["X"]), int(shape["Y"]))
        size, H, W = os.path.getsize(self.path), int(key.imagelength), int(key.imagewidth)
        if key.is_tiled:
            what, tw, th = "tiles", int(key.tilewidth), int(key.tilelength)
        else:
            what, tw, th = "strips", W, int(key.rowsperstrip) or H
        _check_tile_bytes(self.path, level, what, tw, th,
                          tw * th * (1 if int(key.planarconfig) == 2 else int(key.samplesperpixel)))
        if key.is_tiled:
            expected = -(-H // int(key.tilelength)) * -(-W // int(key.tilewidth))
        else:
            expected = -(-H // (int(key.rowsperstrip) or H))
        expected *= int(key.samplesperpixel) if int(key.planarconfig) == 2 else 1  # planar: one set per sample
        for offsets, counts in tables:
            if len(offsets) != expected:
                raise CorruptSlideError(self.path, f"level {level} has {len(offsets)} tiles/strips where its size "
                                                   f"needs {expected}: the header is corrupt")
            used = counts > 0
            end = int((offsets[used] + counts[used]).max()) if used.any() else 0
            if end > size:
                raise CorruptSlideError(self.path, f"file is truncated: level {level} needs {end} bytes but the file "
                                                   f"has {size}")

    def _view_chunk(self, level: int) -> tuple[int, int]:
        """About _VIEW_CHUNK**2 px of whole tiles (full-width rows of whole strips): each tile or strip is
        decoded once per view."""
        reader, n = self._levels[level], _base._VIEW_CHUNK
        tw, th = reader.tile
        if reader.stripped:
            rows = max(1, n * n // tw)
            return tw, -(-rows // th) * th
        return max(1, round(n / tw)) * tw, max(1, round(n / th)) * th

    def _svs_meta(self) -> dict[str, Any]:
        from tifffile.tifffile import svs_description_metadata

        try:
            return dict(svs_description_metadata(self._tif.pages[0].description))
        except Exception:  # a non-standard description: no metadata, not an error
            return {}

    def _ome_mpp(self) -> tuple[tuple[float, float] | None, str | None]:
        try:
            root = ElementTree.fromstring(self._tif.ome_metadata)
        except Exception:
            return None, None
        el = next((e for e in root.iter() if e.tag.endswith("Pixels") and e.get("PhysicalSizeX")), None)
        if el is None:
            return None, None
        units = [el.get(f"PhysicalSize{ax}Unit", "µm") for ax in "XY"]  # the OME default unit is the micron
        if not all(u in _UNITS_UM for u in units):
            return None, None
        x = float(el.get("PhysicalSizeX"))  # type: ignore[arg-type]
        y = float(el.get("PhysicalSizeY") or x)
        return (x * _UNITS_UM[units[0]], y * _UNITS_UM[units[1]]), "ome"

    def _read_properties(self, key: Any) -> dict[str, str]:
        """OpenSlide-style keys: tiff.<Tag> for descriptive tags of page 0, aperio.<key> for SVS."""
        names = ("ImageDescription", "Software", "DateTime", "Make", "Model", "Artist", "HostComputer", "Copyright",
                 "DocumentName", "XResolution", "YResolution", "ResolutionUnit", "Compression", "TileWidth",
                 "TileLength")
        props = {}
        for tag in self._tif.pages[0].tags.values():
            if tag.name in names:
                value = tag.value
                if isinstance(value, tuple) and len(value) == 2:  # a rational
                    value = value[0] / value[1] if value[1] else 0.0
                props[f"tiff.{tag.name}"] = str(getattr(value, "name", value))
        if self._tif.is_svs:
            props.update({f"aperio.{k}": str(v) for k, v in self._svs_meta().items() if k != "Header"})
        return props

    def _decode_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        data = self._levels[level].read(x0, y0, x1, y1)
        if self._grey:
            grey = data.reshape(y1 - y0, x1 - x0)
            return np.repeat((255 - grey if self._min_is_white else grey)[..., None], 3, axis=2)
        if self._alpha:
            return _composite(data, premultiplied=self._premultiplied)
        return data if data.shape[2] == 3 else np.ascontiguousarray(data[..., :3])

    def _associated(self, name: str) -> np.ndarray:
        series = self._assoc[name]
        shape = dict(zip(series.axes, series.shape))
        if int(np.prod(series.shape)) > max_tile_bytes():  # decoded whole: the same bound as one tile
            raise SlideError(self.path, f"associated image {name!r} is {shape.get('X')} x {shape.get('Y')} px, over "
                                        f"the {max_tile_bytes() / 2**20:g} MiB limit of one decoded image "
                                        "(--max-tile-mb raises it)")
        img = np.asarray(series.asarray())
        if img.dtype != np.uint8:
            raise SlideReadError(self.path, f"associated image {name!r} is {img.dtype}, not 8-bit")
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        return _composite(img, premultiplied=False) if img.shape[-1] == 4 else np.ascontiguousarray(img[..., :3])

    def _close(self) -> None:
        for lev in self._levels:
            if isinstance(lev, _TileLevel):
                TILE_CACHE.drop(lev.cache_id)
            if isinstance(lev, _ZarrLevel):
                with contextlib.suppress(Exception):
                    lev.close()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tif is not None:
            with contextlib.suppress(Exception):
                self._tif.close()


def _area(series: Any) -> int:
    shape = dict(zip(series.axes, series.shape))
    return int(shape.get("Y", 0)) * int(shape.get("X", 0))


def _tiff_resolution_mpp(page: Any) -> tuple[tuple[float, float] | None, str | None]:
    """mpp from XResolution/YResolution: pixels per centimetre (unit 3) or per inch (unit 2)."""
    try:
        unit = int(page.resolutionunit)
        rx, ry = (float(v) for v in page.resolution)
    except Exception:
        return None, None
    per_unit_um = {2: 25400.0, 3: 1e4}.get(unit)  # microns per inch, per centimetre
    if per_unit_um is None or rx <= 0 or ry <= 0:
        return None, None
    return (per_unit_um / rx, per_unit_um / ry), "tiff-resolution"

