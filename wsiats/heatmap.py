"""Attention outputs: a PNG overlay with a colour bar, a float32 TIFF map, and QuPath GeoJSON patches.

Pure output side of ``wsiats heatmap``: numpy arrays in, images / files / dicts out. No model,
no slide reading. Colormaps are small lookup tables interpolated with numpy (no matplotlib).
Every file is written atomically (``wsiats._io``): a failure never leaves a partial output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

from wsiats._io import atomic_open, atomic_path
from wsiats.errors import ConfigError, WsiatsError

# --- colormaps ------------------------------------------------------------------------------------------------------

#: matplotlib's perceptually uniform maps sampled at 10 evenly spaced stops (the widely reproduced
#: d3/plotly tables); linear interpolation between them stays within a few levels of the 256-entry original.
_CMAP_HEX: dict[str, tuple[str, ...]] = {
    "inferno": ("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60",
                "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"),
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e",
                "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"),
}
#: Names accepted by the `cmap` options.
COLORMAPS: tuple[str, ...] = tuple(sorted(_CMAP_HEX))


def _anchors(cmap: str) -> np.ndarray:
    try:
        table = _CMAP_HEX[cmap]
    except KeyError:
        raise ConfigError(f"unknown colormap {cmap!r}; choose one of: {', '.join(COLORMAPS)}") from None
    return np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in table], dtype=np.float64)


def apply_colormap(values: np.ndarray, *, cmap: str = "inferno") -> np.ndarray:
    """RGB uint8 colours, shape ``values.shape + (3,)``, of `values` in [0, 1] (clipped; NaN is an error)."""
    t = np.asarray(values, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError("colormap values must be finite")
    anchors = _anchors(cmap)
    pos = np.clip(t, 0.0, 1.0) * (len(anchors) - 1)
    stops = np.arange(len(anchors), dtype=np.float64)
    rgb = np.stack([np.interp(pos, stops, anchors[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


# --- overlay --------------------------------------------------------------------------------------------------------

#: Width in pixels of the colour-bar panel added on the right of the overlay.
COLORBAR_WIDTH = 84
#: Height in pixels of the title band added above the overlay when a title is given.
TITLE_HEIGHT = 16
#: Smallest canvas height, so the bar and its three labels (10 px font) never overlap.
_MIN_HEIGHT = 64
_BAR_X = 6  # left edge of the bar inside the panel
_BAR_W = 14  # width of the gradient
_BAR_PAD = 8  # blank rows above and below the bar
_TICK = 3  # length of a tick mark
_TEXT = (0, 0, 0)
_BACKGROUND = (255, 255, 255)


def render_overlay(thumbnail: np.ndarray, attention: np.ndarray, *, alpha: float = 0.5, cmap: str = "inferno",
                   mask: np.ndarray | None = None, log_decades: float | None = None,
                   title: str | None = None) -> Image.Image:
    """The thumbnail with the attention blended on top, a vertical colour bar on the right, an optional title.

    thumbnail: (h, w, 3) uint8 view of the slide. attention: (ha, wa) values >= 0 over the same area
    (a probability map over view cells); it is resized to (h, w) by nearest neighbour, so one cell
    becomes a block of pixels. mask: optional bool map (any shape, resized the same way); False keeps
    the plain thumbnail there.

    Normalisation: with ``vmax`` the largest attention among the blended pixels, linear scale maps
    ``a / vmax`` onto the colormap (0 -> bottom colour, vmax -> top colour); ``log_decades=d`` maps
    ``log10(a / vmax)`` from -d..0 instead (values below vmax * 10**-d get the bottom colour), which
    shows structure in peaked attention. A pixel is blended, ``(1 - alpha) * thumb + alpha * colour``,
    where attention > 0 and the mask allows; elsewhere it is the thumbnail unchanged.

    The result is (w + COLORBAR_WIDTH) x (max(h, 64) [+ TITLE_HEIGHT when `title`]) pixels: the overlay
    at the top left (below the title band), the bar on the right with ticks labelled with the attention
    values its top, middle and bottom colours stand for.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8 or thumb.shape[0] == 0 or thumb.shape[1] == 0:
        raise ValueError(f"thumbnail must be a non-empty (h, w, 3) uint8 array, got {thumb.dtype} {thumb.shape}")
    att = _check_map(attention, "attention")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if log_decades is not None and not (math.isfinite(log_decades) and log_decades > 0):
        raise ValueError(f"log_decades must be a positive number, got {log_decades}")
    _anchors(cmap)  # fail on a bad name before any work

    h, w = thumb.shape[:2]
    att_px = _resize_nearest(att, (h, w))
    blend = att_px > 0
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
        blend &= _resize_nearest(m.astype(bool), (h, w))
    vmax = float(att_px[blend].max()) if blend.any() else 0.0

    out = thumb.copy()
    if vmax > 0:
        t = _normalise(att_px[blend], vmax, log_decades)
        colours = apply_colormap(t, cmap=cmap).astype(np.float64)
        mixed = (1.0 - alpha) * thumb[blend].astype(np.float64) + alpha * colours
        out[blend] = np.rint(mixed).astype(np.uint8)

    top = TITLE_HEIGHT if title else 0
    height = max(h, _MIN_HEIGHT)
    canvas = Image.new("RGB", (w + COLORBAR_WIDTH, height + top), _BACKGROUND)
    canvas.paste(Image.fromarray(out), (0, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=_TEXT, font=font)
    _draw_colorbar(canvas, draw, font, x0=w, y0=top, height=height, vmax=vmax, cmap=cmap, log_decades=log_decades)
    return canvas


def _normalise(values: np.ndarray, vmax: float, log_decades: float | None) -> np.ndarray:
    """Attention values -> [0, 1] positions on the colormap (see render_overlay)."""
    rel = values / vmax
    if log_decades is None:
        return np.clip(rel, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(rel, 0.0))
    return np.clip(1.0 + logs / log_decades, 0.0, 1.0)


def _tick_values(vmax: float, log_decades: float | None) -> tuple[float, float, float]:
    """Attention values at the top, middle and bottom of the bar."""
    if log_decades is None:
        return vmax, vmax / 2, 0.0
    return vmax, vmax * 10.0 ** (-log_decades / 2), vmax * 10.0 ** -log_decades


def _draw_colorbar(canvas: Image.Image, draw: ImageDraw.ImageDraw, font: Any, *, x0: int, y0: int, height: int,
                   vmax: float, cmap: str, log_decades: float | None) -> None:
    bar_h = height - 2 * _BAR_PAD
    bx, by = x0 + _BAR_X, y0 + _BAR_PAD
    gradient = apply_colormap(np.linspace(1.0, 0.0, bar_h), cmap=cmap)  # top row = top colour
    canvas.paste(Image.fromarray(np.repeat(gradient[:, None, :], _BAR_W, axis=1)), (bx, by))
    draw.rectangle((bx - 1, by - 1, bx + _BAR_W, by + bar_h), outline=_TEXT)
    tx = bx + _BAR_W + 1
    for value, y in zip(_tick_values(vmax, log_decades), (by, by + bar_h // 2, by + bar_h - 1), strict=True):
        draw.line((tx, y, tx + _TICK - 1, y), fill=_TEXT)
        label = "0" if value == 0 else f"{value:.3g}"
        left, top_, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = min(max(y - (top_ + bottom) // 2, y0 + 1), y0 + height - bottom - 1)
        draw.text((tx + _TICK + 2, ty), label, fill=_TEXT, font=font)


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array: output pixel centres sampled in the input grid."""
    h, w = shape
    ha, wa = a.shape
    if (ha, wa) == (h, w):
        return a
    rows = np.minimum(((np.arange(h) + 0.5) * (ha / h)).astype(np.int64), ha - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (wa / w)).astype(np.int64), wa - 1)
    return a[rows[:, None], cols[None, :]]


def _check_map(attention: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (a < 0).any():
        raise ValueError(f"{name} must be >= 0 (a probability map), min is {a.min()}")
    return a


def write_png(path: Path, image: Image.Image) -> None:
    """Save `image` as PNG at `path`, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --- attention TIFF -------------------------------------------------------------------------------------------------

#: Value of the "wsiats" key in the ImageDescription JSON that marks an attention map.
_TIFF_KIND = "attention"
_UM_PER_CM = 1e4  # TIFF ResolutionUnit 3 counts pixels per centimetre


def write_attention_tiff(path: Path, attention: np.ndarray, *, downsample: tuple[float, float],
                         mpp: tuple[float, float] | None) -> None:
    """Write `attention` as a single-page float32 TIFF (deflate), atomically.

    Pixel (row, col) of the map covers level-0 pixels [col * ds_x, (col + 1) * ds_x) x [row * ds_y, ...).
    The ImageDescription holds JSON ``{"wsiats": "attention", "version": 1, "downsample_x", "downsample_y",
    "level0_mpp": [x, y] | null, "map_mpp": [x, y] | null}``. With `mpp` (level-0 microns per pixel, x and y)
    known, XResolution/YResolution are the map's pixels per centimetre, 1e4 / (mpp * downsample), with
    ResolutionUnit CENTIMETER, so ImageJ/QuPath-like tools show it at the slide's physical scale.
    """
    arr = np.asarray(attention)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"attention must be a non-empty 2-D array, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("attention contains NaN or infinite values")
    dsx, dsy = _positive_pair(downsample, "downsample")
    meta: dict[str, Any] = {"wsiats": _TIFF_KIND, "version": 1, "downsample_x": dsx, "downsample_y": dsy,
                            "level0_mpp": None, "map_mpp": None}
    extra: dict[str, Any] = {}
    if mpp is not None:
        mx, my = _positive_pair(mpp, "mpp")
        meta["level0_mpp"] = [mx, my]
        meta["map_mpp"] = [mx * dsx, my * dsy]
        extra = {"resolution": (_UM_PER_CM / (mx * dsx), _UM_PER_CM / (my * dsy)), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, photometric="minisblack", compression="zlib", description=json.dumps(meta),
                         metadata=None, software="wsiats", **extra)


def read_attention_tiff(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """(float32 map, (downsample_x, downsample_y)) from a file written by `write_attention_tiff`."""
    path = Path(path)
    if not path.is_file():
        raise WsiatsError(f"{path}: attention map not found")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = page.description
            arr = page.asarray()
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on broken files
        raise WsiatsError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(description)
        if meta.get("wsiats") != _TIFF_KIND:
            raise ValueError("no 'wsiats': 'attention' key")
        downsample = (float(meta["downsample_x"]), float(meta["downsample_y"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise WsiatsError(f"{path}: not a wsiats attention map (ImageDescription: {exc})") from exc
    if arr.ndim != 2 or arr.dtype != np.float32:
        raise WsiatsError(f"{path}: attention map must be 2-D float32, found {arr.dtype} {arr.shape}")
    return arr, downsample


def _positive_pair(pair: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(v) for v in pair)
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be two positive numbers (x, y), got {pair!r}")
    return values[0], values[1]


# --- GeoJSON --------------------------------------------------------------------------------------------------------

#: QuPath classification of every exported patch, and its colour (QuPath's class colours are per name).
CLASSIFICATION = "wsiats attention"
_CLASS_COLOR = [252, 255, 164]  # inferno's top colour


def patches_geojson(boxes: np.ndarray, attention: np.ndarray, *, slide_id: str, top: int | None = None,
                    cmap: str = "inferno") -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the sampled patches, highest attention first, for QuPath import.

    boxes: (n, 4) level-0 x, y, w, h; attention: (n,) the attention of each patch's location.
    Identical boxes (sampling with replacement draws a location several times) become one feature:
    its attention is the max over the copies (they are equal for repeated draws of one location:
    summing would count the location's probability once per draw) and "draws" counts them.
    Ties keep first-seen order. `top` keeps the first `top` features after sorting.

    Each feature: a closed 5-point Polygon ring [[x,y],[x+w,y],[x+w,y+h],[x,y+h],[x,y]] in level-0
    pixels (origin top left, QuPath's convention), properties::

        {"objectType": "annotation", "name": "patch <rank>",
         "classification": {"name": "wsiats attention", "color": [r, g, b]},
         "color": [r, g, b],                       # the patch's attention on `cmap`, relative to the top one
         "measurements": {"attention": a, "rank": r, "draws": k},
         "metadata": {"slide_id": slide_id}}

    QuPath conventions, from qupath/qupath qupath-core/src/main/java/qupath/lib/io/PathObjectTypeAdapters.java
    (PathObjectTypeAdapter.read, MeasurementListTypeAdapter) and GsonTools.PathClassTypeAdapter: since
    v0.4 the object type is ``properties.objectType`` (``object_type`` is the deprecated v0.3 key);
    ``measurements`` is read as a JSON object name -> number (what 0.4+/0.5 writes) or as the pre-0.4 list
    of {"name", "value"}, and since 0.4 it is applied to annotations too (0.3 dropped it for them);
    ``classification`` is {"name", "color": [r, g, b]}; ``color`` (an [r, g, b] array) is the object's own
    colour; ``metadata`` string values go to the object's metadata map. Class colour is shared by name,
    so the per-patch colour goes in ``color``. All values are plain Python types (json.dumps works).
    """
    b = np.asarray(boxes)
    a = np.asarray(attention, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (n, 4) x, y, w, h, got shape {b.shape}")
    if a.shape != (b.shape[0],):
        raise ValueError(f"attention must be ({b.shape[0]},) to match boxes, got shape {a.shape}")
    if not np.issubdtype(b.dtype, np.integer):
        b = b.astype(np.float64)
        if not np.isfinite(b).all():
            raise ValueError("boxes contain NaN or infinite values")
    if not np.isfinite(a).all():
        raise ValueError("attention contains NaN or infinite values")
    if b.shape[0] and ((b[:, 2] <= 0).any() or (b[:, 3] <= 0).any()):
        raise ValueError("every box needs a positive width and height")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    _anchors(cmap)  # fail on a bad name before any work

    features: list[dict[str, Any]] = []
    if b.shape[0]:
        uniq, first, inverse, counts = np.unique(b, axis=0, return_index=True, return_inverse=True,
                                                 return_counts=True)
        inverse = inverse.reshape(-1)
        best = np.full(len(uniq), -np.inf)
        np.maximum.at(best, inverse, a)
        order = np.lexsort((first, -best))  # attention descending, then first occurrence
        if top is not None:
            order = order[:top]
        amax = float(best[order[0]]) if len(order) else 0.0
        rel = best[order] / amax if amax > 0 else np.zeros(len(order))
        colours = apply_colormap(rel, cmap=cmap).tolist()
        for rank, (g, colour) in enumerate(zip(order.tolist(), colours, strict=True), start=1):
            x, y, w, h = uniq[g].tolist()
            ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"patch {rank}",
                    "classification": {"name": CLASSIFICATION, "color": list(_CLASS_COLOR)},
                    "color": colour,
                    "measurements": {"attention": float(best[g]), "rank": rank, "draws": int(counts[g])},
                    "metadata": {"slide_id": str(slide_id)},
                },
            })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: dict[str, Any]) -> None:
    """Write a GeoJSON dict as UTF-8 JSON at `path`, atomically (NaN/Infinity are refused: not valid JSON)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(collection, fh, allow_nan=False)
        fh.write("\n")


@dataclass
class HeatmapResult:
    slide_id: str
    path: Path
    files: list[Path] = field(default_factory=list)
    error: str = ""
    notes: list[str] = field(default_factory=list)  # warnings about this slide, each naming it


def heatmap_slides(
    paths: Sequence[Path],
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    top: int = 50,
    device: str = "auto",
    backend: str = "auto",
    mpp: float | None = None,
    thumbnail_size: int = 1024,
    allow_hub: bool = False,
) -> Iterator[HeatmapResult]:
    """For each slide write <id>.png, <id>.attention.tif and <id>.geojson into `out_dir`.

    The attention is the model's full distribution over the view (no sampling, so the maps are
    deterministic); the GeoJSON holds the `top` highest-attention cells' patch boxes.
    A slide that fails yields its error and the others go on; the warnings about a slide travel in its result.
    """
    from wsiats.checkpoint import load_model
    from wsiats.data import slide_id
    from wsiats.errors import WsiatsError
    from wsiats.pipeline import attention_map, cell_centers, patch_boxes, patch_downsample, prepare_view
    from wsiats.runtime import select_device
    from wsiats.slide import collect_notes, open_slide

    model, cfg = load_model(run_dir, allow_hub=allow_hub)
    dev = select_device(device)
    model.to(dev)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first_of: dict[str, Path] = {}
    for path in paths:
        sid = slide_id(path)
        result = HeatmapResult(sid, Path(path))
        if sid in first_of:  # a.tif and b/a.svs: the second would overwrite the first one's files
            result.error = (f"{path}: slide id {sid!r} is also the id of {first_of[sid]}; its heatmap files would "
                            "overwrite that slide's")
            yield result
            continue
        first_of[sid] = Path(path)
        written: list[Path] = []
        try:
            with collect_notes() as result.notes:
                with open_slide(path, backend=backend, mpp=mpp) as slide:
                    view = prepare_view(slide, cfg)
                    slide_mpp = slide.mpp
                    pds = patch_downsample(slide, cfg)
                    # The PNG gets a sharper thumbnail than the model's view when the view is small.
                    thumb_ds = max(1.0, max(slide.dimensions) / thumbnail_size)  # never finer than level 0
                    thumb = slide.read_view(downsample=thumb_ds).image if thumb_ds < min(view.downsample) else view.image
            att = attention_map(model, view, cfg, device=dev)
            flat = att.ravel()
            order = np.argsort(-flat, kind="stable")[: min(top, int((flat > 0).sum()))]
            centers = cell_centers(order, att.shape, view.downsample)
            boxes = patch_boxes(centers, cfg.patch_size, pds)
            png = out_dir / f"{sid}.png"
            tif = out_dir / f"{sid}.attention.tif"
            geo = out_dir / f"{sid}.geojson"
            write_png(png, render_overlay(thumb, att, mask=view.mask, title=f"{sid}: attention"))
            written.append(png)
            write_attention_tiff(tif, att.astype(np.float32), downsample=view.downsample, mpp=slide_mpp)
            written.append(tif)
            write_geojson(geo, patches_geojson(boxes, flat[order], slide_id=sid))
            result.files = [png, tif, geo]
        except WsiatsError as exc:
            result.error = str(exc)
        except (OSError, RuntimeError, ValueError, MemoryError) as exc:
            result.error = f"{path}: {type(exc).__name__}: {exc}"
        if result.error:  # a failed slide leaves none of its three files
            for done in written:
                done.unlink(missing_ok=True)
        yield result
