"""Attention outputs: a PNG figure with a colour bar, a float32 TIFF map, and QuPath GeoJSON patches.

``heatmap_slides`` (what ``wsiats heatmap`` runs) loads a run's model, reads each slide's view, computes
the attention over it and writes the three files; the functions above it are the output side alone
(numpy arrays in, images / files / dicts out, no model and no slide). Colour maps, the colour bar and the figure come from matplotlib (its object API
and the Agg canvas: no pyplot state, so rendering is safe from any thread). Every file is written
atomically (``wsiats._io``): a failure never leaves a partial output.
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
from PIL import Image

from wsiats._io import atomic_open, atomic_path
from wsiats.errors import ConfigError, WsiatsError

# --- colormaps ------------------------------------------------------------------------------------------------------

#: Names accepted by the `cmap` options: matplotlib's perceptually uniform sequential maps.
COLORMAPS: tuple[str, ...] = ("cividis", "inferno", "magma", "plasma", "viridis")
#: `scale` values: each slide's own maximum, or one fixed scale for every slide.
SCALES: tuple[str, ...] = ("slide", "global")
#: The fixed (global) scale: attention times the number of cells it is spread over (1 = uniform),
#: log scale from 0.1 to 1000 (a cell 1000x the uniform share holds, on a 100 x 100-cell view, a tenth of
#: the attention).
GLOBAL_RANGE = (0.1, 1000.0)


def _colormap(cmap: str) -> Any:
    if cmap not in COLORMAPS:
        raise ConfigError(f"unknown colormap {cmap!r}; choose one of: {', '.join(COLORMAPS)}")
    import matplotlib

    return matplotlib.colormaps[cmap]


def apply_colormap(values: np.ndarray, *, cmap: str = "inferno") -> np.ndarray:
    """RGB uint8 colours, shape ``values.shape + (3,)``, of `values` in [0, 1] (clipped; NaN is an error)."""
    t = np.asarray(values, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError("colormap values must be finite")
    return np.asarray(_colormap(cmap)(np.clip(t, 0.0, 1.0), bytes=True))[..., :3]


def _norm(scale: str, vmax: float) -> Any:
    """The matplotlib normalisation of a scale: values -> [0, 1] positions on the colour map."""
    from matplotlib.colors import LogNorm, Normalize

    if scale == "global":
        return LogNorm(*GLOBAL_RANGE, clip=True)
    return Normalize(0.0, vmax if vmax > 0 else 1.0, clip=True)


# --- the figure -----------------------------------------------------------------------------------------------------

_DPI = 100
#: Smallest side of each panel on screen, in pixels: small thumbnails are enlarged (nearest neighbour).
MIN_PANEL = 400
#: Smallest panel height, so that the colour bar and its labels are legible.
_MIN_PANEL_HEIGHT = 260
_MARGIN, _GAP, _TITLE_H, _LABEL_H = 12, 16, 44, 22  # pixels
_BAR_W, _BAR_AREA = 22, 150  # the bar, and the space it takes with its ticks and label


def render_overlay(thumbnail: np.ndarray, attention: np.ndarray, *, cmap: str = "inferno",
                   mask: np.ndarray | None = None, scale: str = "slide", title: str | None = None) -> Image.Image:
    """The slide and its attention side by side, with a labelled colour bar and an optional title.

    thumbnail: (h, w, 3) uint8 view of the slide. attention: (ha, wa) values >= 0 over the same area
    (a probability map over view cells); it is resized to (h, w) by nearest neighbour, so one cell
    becomes a block of pixels. mask: optional bool map (any shape, resized the same way); the attention
    is drawn where it is > 0 and the mask allows, opaque, in exactly the colours of the bar; elsewhere
    the right panel shows the thumbnail.

    scale "slide": linear from 0 to the largest drawn attention (the bar is labelled in attention per
    cell). scale "global": the same for every slide, attention times the number of drawn cells (1 is
    the uniform share; so slides of different tissue areas compare), log scale over GLOBAL_RANGE.

    Panels are shown at the thumbnail's own pixels, enlarged by a whole factor when smaller than
    MIN_PANEL, so cell colours are exact.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8 or thumb.shape[0] == 0 or thumb.shape[1] == 0:
        raise ValueError(f"thumbnail must be a non-empty (h, w, 3) uint8 array, got {thumb.dtype} {thumb.shape}")
    att = _check_map(attention, "attention")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    colormap = _colormap(cmap)

    h, w = thumb.shape[:2]
    drawn = att > 0
    if mask is not None:
        m = np.asarray(mask)
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
        drawn &= _resize_nearest(m.astype(bool), att.shape)
    cells = int(drawn.sum())
    values = att * cells if scale == "global" else att
    vmax = float(values[drawn].max()) if cells else 0.0
    norm = _norm(scale, vmax)
    drawn_px = _resize_nearest(drawn, (h, w))
    overlay = thumb.copy()
    if cells:
        positions = np.asarray(norm(_resize_nearest(values, (h, w))[drawn_px]), dtype=np.float64)
        overlay[drawn_px] = np.asarray(colormap(positions, bytes=True))[:, :3]
    return _figure(thumb, overlay, colormap, norm, scale=scale, title=title, empty=not cells)


def _figure(thumb: np.ndarray, overlay: np.ndarray, colormap: Any, norm: Any, *, scale: str, title: str | None,
            empty: bool) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    h, w = thumb.shape[:2]
    zoom = max(1, math.ceil(MIN_PANEL / max(h, w)), math.ceil(_MIN_PANEL_HEIGHT / h))
    pw, ph = w * zoom, h * zoom
    k = min(2.0, max(1.0, ph / 450))  # text grows with the panels, so it stays legible when the PNG is shown smaller
    title_h, label_h, bar_w, bar_area = (round(v * k) for v in (_TITLE_H, _LABEL_H, _BAR_W, _BAR_AREA))
    top = title_h + label_h if title else label_h
    width = _MARGIN + pw + _GAP + pw + _GAP + bar_area
    height = top + ph + _MARGIN
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def axes(x: float, y: float, aw: float, ah: float) -> Any:  # pixels from the top left -> figure fractions
        return fig.add_axes((x / width, 1 - (y + ah) / height, aw / width, ah / height))

    for x, image, label in ((_MARGIN, thumb, "slide"), (_MARGIN + pw + _GAP, overlay, "attention")):
        ax = axes(x, top, pw, ph)
        ax.imshow(image, interpolation="nearest", resample=False)
        ax.set_axis_off()
        ax.text(0, 1.005, label, transform=ax.transAxes, fontsize=12 * k, va="bottom", ha="left")
    if empty:
        ax.text(0.5, 0.5, "no attention", transform=ax.transAxes, fontsize=12 * k, ha="center", va="center",
                bbox={"facecolor": "white", "edgecolor": "none"})
    cax = axes(_MARGIN + 2 * pw + 2 * _GAP, top, bar_w, ph)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), cax=cax)
    if scale == "global":
        bar.set_label("attention relative to uniform\n(one scale for every slide)", fontsize=10 * k)
        bar.formatter = FuncFormatter(lambda v, _: f"{v:g}x")
    else:
        bar.set_label("attention per cell\n(scaled to this slide's maximum)", fontsize=10 * k)
        bar.formatter = FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:.2g}")
    bar.ax.tick_params(labelsize=10 * k)
    bar.update_ticks()
    if title:
        fig.text(_MARGIN / width, 1 - 8 * k / height, title, fontsize=16 * k, va="top", ha="left", weight="bold")
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]  # the Agg canvas
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))


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
            description = page.description  # type: ignore[union-attr]  # page 0 is a TiffPage
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
_CLASS_COLOR = [252, 254, 164]  # inferno's top colour


def nested_geojson(out: Any, regions: np.ndarray, attention: np.ndarray, coarse_w: int, cfg: Any, *, slide_id: str,
                   cmap: str = "inferno") -> dict[str, Any]:
    """Nested sampling's GeoJSON: features "region <rank>" (the top regions by coarse attention a1, level-0
    squares of `coarse_downsample`), then "patch <rank>" (the patches of one sampled pass, their attention
    a1 a2 and, in measurements, "cell_attention" a2(i | region) and "region_attention" a1)."""
    from wsiats.nested_pass import region_boxes

    doc = patches_geojson(region_boxes(regions, coarse_w, cfg), attention, slide_id=slide_id, cmap=cmap)
    for feat in doc["features"]:
        feat["properties"]["name"] = feat["properties"]["name"].replace("patch", "region", 1)
        feat["properties"]["classification"]["name"] = "wsiats region attention"
    picks = out.nested[0]
    a1 = picks.region_attention.cpu().numpy()[picks.patch_region]
    a2 = picks.cell_attention.cpu().numpy()
    patches = patches_geojson(out.boxes[0], a1 * a2, slide_id=slide_id, cmap=cmap)
    by_box = {tuple(int(v) for v in box): (float(c), float(r)) for box, c, r in zip(out.boxes[0], a2, a1)}
    for feat in patches["features"]:
        ring = feat["geometry"]["coordinates"][0]
        key = (ring[0][0], ring[0][1], ring[1][0] - ring[0][0], ring[2][1] - ring[0][1])
        cell, region = by_box.get(key, (None, None))  # type: ignore[arg-type]
        feat["properties"]["measurements"].update(cell_attention=cell, region_attention=region)
    doc["features"] += patches["features"]
    return doc


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
    _colormap(cmap)  # fail on a bad name before any work

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
    scale: str = "slide",
    cmap: str = "inferno",
) -> Iterator[HeatmapResult]:
    """For each slide write <id>.png, <id>.attention.tif and <id>.geojson into `out_dir`.

    The attention is the model's full distribution over the view (no sampling, so the maps are
    deterministic); the GeoJSON holds the `top` highest-attention cells' patch boxes. The PNG's
    title gives the prediction of one sampling pass with seed 0, what `wsiats predict` gives by default.
    A slide that fails yields its error and the others go on; the warnings about a slide travel in its result.
    """
    import torch

    from wsiats.checkpoint import load_model
    from wsiats.data import seeded_generator, slide_id
    from wsiats.errors import WsiatsError
    from wsiats.forward import SlideBatchItem, attention_map, forward_batch
    from wsiats.reader import OpenedSlide
    from wsiats.runtime import select_device
    from wsiats.slide import collect_notes, open_slide
    from wsiats.view import cell_centers, patch_boxes, patch_downsample, prepare_view

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    _colormap(cmap)
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
            result.error = (f"{path}: slide id {sid!r} is also the id of {first_of[sid]}; its heatmap files "
                            "would overwrite that slide's")
            yield result
            continue
        first_of[sid] = Path(path)
        written: list[Path] = []
        try:
            with collect_notes() as result.notes, open_slide(path, backend=backend, mpp=mpp) as slide:
                view = prepare_view(slide, cfg)
                slide_mpp = slide.mpp
                pds = patch_downsample(slide, cfg)
                # The PNG gets a sharper thumbnail than the model's view when the view is small.
                thumb_ds = max(1.0, max(slide.dimensions) / thumbnail_size)  # never finer than level 0
                thumb = slide.read_view(downsample=thumb_ds).image if thumb_ds < min(view.downsample) else view.image
                with torch.no_grad():
                    out = forward_batch(model, [SlideBatchItem(Path(path), view)], cfg=cfg, reader=OpenedSlide(slide),
                                        generator=seeded_generator(0, 0), device=dev)
            probs = torch.softmax(out.logits.float(), -1)[0].cpu().numpy()
            best = int(probs.argmax())
            att = attention_map(model, view, cfg, device=dev)
            flat = att.ravel()
            order = np.argsort(-flat, kind="stable")[: min(top, int((flat > 0).sum()))]
            centers = cell_centers(order, att.shape, view.downsample)
            boxes = patch_boxes(centers, cfg.patch_size, pds)
            png = out_dir / f"{sid}.png"
            tif = out_dir / f"{sid}.attention.tif"
            geo = out_dir / f"{sid}.geojson"
            title = f"{sid}: predicted {cfg.classes[best]} (p = {probs[best]:.2f})"
            write_png(png, render_overlay(thumb, att, mask=view.mask, scale=scale, cmap=cmap, title=title))
            written.append(png)
            write_attention_tiff(tif, att.astype(np.float32), downsample=view.downsample, mpp=slide_mpp)
            written.append(tif)
            doc = patches_geojson(boxes, flat[order], slide_id=sid, cmap=cmap)
            if cfg.nested:  # both levels: the top regions by coarse attention, then the patches sampled inside them
                doc = nested_geojson(out, order, flat[order], att.shape[1], cfg, slide_id=sid, cmap=cmap)
            write_geojson(geo, doc)
            result.files = [png, tif, geo]
        except WsiatsError as exc:
            result.error = str(exc)
        except (OSError, RuntimeError, ValueError, MemoryError) as exc:
            result.error = f"{path}: {type(exc).__name__}: {exc}"
        if result.error:  # a failed slide leaves none of its three files
            for done in written:
                done.unlink(missing_ok=True)
        yield result
