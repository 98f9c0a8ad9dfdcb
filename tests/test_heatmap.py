"""Heatmap outputs: overlay PNG with colour bar, float32 attention TIFF, QuPath GeoJSON, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiats import heatmap
from wsiats.errors import ConfigError, WsiatsError
from wsiats.heatmap import (
    apply_colormap,
    patches_geojson,
    read_attention_tiff,
    render_overlay,
    write_attention_tiff,
    write_geojson,
    write_png,
)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 relative luminance weights."""
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


@pytest.fixture()
def thumb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)


@pytest.fixture()
def attention() -> np.ndarray:
    """(6, 8) map: one cell at the max (row 2, col 5), a zero region in the left column, the rest small."""
    a = np.full((6, 8), 0.01)
    a[:, 0] = 0.0
    a[2, 5] = 0.5
    return a


def _leftover(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- colormap -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", heatmap.COLORMAPS)
def test_colormap_ends_and_monotone_luminance(cmap: str) -> None:
    rgb = apply_colormap(np.linspace(0, 1, 256), cmap=cmap)
    assert rgb.shape == (256, 3) and rgb.dtype == np.uint8
    lum = _luminance(rgb)
    assert (np.diff(lum[::15]) > 0).all()  # brighter up the map (plasma wobbles by < 1 level between neighbours)
    assert lum[-1] - lum[0] > 150
    # matplotlib's published end colours (hex), within its float -> uint8 truncation
    ends = {"inferno": ("000004", "fcffa4"), "viridis": ("440154", "fde725"), "magma": ("000004", "fcfdbf"),
            "plasma": ("0d0887", "f0f921"), "cividis": ("00224e", "fee838")}[cmap]
    for got, hexa in zip((rgb[0], rgb[-1]), ends):
        want = np.array([int(hexa[i:i + 2], 16) for i in (0, 2, 4)])
        assert np.abs(got.astype(int) - want).max() <= 1, (cmap, got, hexa)
    # clipped outside [0, 1]
    assert apply_colormap(np.array([-1.0, 2.0]), cmap=cmap).tolist() == [rgb[0].tolist(), rgb[-1].tolist()]


def test_unknown_colormap_names_the_choices(thumb: np.ndarray, attention: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="'jet'.*cividis, inferno, magma, plasma, viridis"):
        render_overlay(thumb, attention, cmap="jet")
    with pytest.raises(ConfigError, match="unknown scale 'batch'; choose one of: slide, global"):
        render_overlay(thumb, attention, scale="batch")


# --- the figure -----------------------------------------------------------------------------------------------------


class _Layout:
    """Where render_overlay puts things, from the module's layout constants (see heatmap._figure)."""

    def __init__(self, h: int, w: int, *, title: bool) -> None:
        import math

        self.zoom = max(1, math.ceil(heatmap.MIN_PANEL / max(h, w)), math.ceil(heatmap._MIN_PANEL_HEIGHT / h))
        self.pw, self.ph = w * self.zoom, h * self.zoom
        k = min(2.0, max(1.0, self.ph / 450))
        self.title_h, label_h, self.bar_w = round(heatmap._TITLE_H * k), round(heatmap._LABEL_H * k), round(heatmap._BAR_W * k)
        self.top = self.title_h + label_h if title else label_h
        self.left_x = heatmap._MARGIN
        self.right_x = heatmap._MARGIN + self.pw + heatmap._GAP
        self.bar_x = heatmap._MARGIN + 2 * self.pw + 2 * heatmap._GAP
        self.size = (self.bar_x + round(heatmap._BAR_AREA * k) - heatmap._GAP + heatmap._GAP, self.top + self.ph + heatmap._MARGIN)

    def panel(self, img: np.ndarray, which: str) -> np.ndarray:
        """The panel's pixels, reduced back to thumbnail resolution (the centre of each zoomed block)."""
        x = self.left_x if which == "slide" else self.right_x
        block = img[self.top: self.top + self.ph, x: x + self.pw]
        c = self.zoom // 2
        return block[c::self.zoom, c::self.zoom]

    def on_bar(self, img: np.ndarray, colour: np.ndarray, fraction: float) -> bool:
        """Whether `colour` is the bar's colour at `fraction` of its height from the bottom: the bar row nearest
        in colour (off its antialiased outline) is within 2% of the height there, and within 4 levels (the bar's
        256 colours span ph rows, its edge rows are blended with the outline)."""
        rows = img[self.top + 2: self.top + self.ph - 2, self.bar_x + self.bar_w // 2].astype(int)
        dist = np.abs(rows - colour.astype(int)).max(axis=1)
        best = int(dist.argmin())
        found = 1 - (best + 2) / (self.ph - 1)
        return bool(dist[best] <= 4 and abs(found - fraction) <= 0.02)


def _close(a: np.ndarray, b: np.ndarray, tol: int = 4) -> bool:
    return bool(np.abs(a.astype(int) - b.astype(int)).max() <= tol)


def test_attention_colours_are_the_bar_colours(thumb: np.ndarray, attention: np.ndarray) -> None:
    """The drawn cells are opaque, in the colour the bar shows for their value (no blend towards beige)."""
    img = np.asarray(render_overlay(thumb, attention))
    lay = _Layout(120, 160, title=False)
    assert (img.shape[1], img.shape[0]) == lay.size
    right = lay.panel(img, "attention")
    # attention (6, 8) -> (120, 160): the max cell is rows 40:60, cols 100:120, the top colour of the bar
    hot = right[45, 105]
    assert _close(hot, apply_colormap(np.array(1.0)), tol=0)
    assert lay.on_bar(img, hot, 1.0)
    # cells at 0.01 are 0.02 of the way up the bar (linear scale from 0 to the slide's max)
    assert _close(right[5, 25], apply_colormap(np.array(0.02)), tol=0)
    assert lay.on_bar(img, right[5, 25], 0.02)
    # attention == 0: the plain thumbnail; the left panel is the thumbnail everywhere
    assert (right[:, 0:20] == thumb[:, 0:20]).all()
    assert (lay.panel(img, "slide") == thumb).all()


def test_mask_keeps_the_thumbnail_and_sets_the_scale(thumb: np.ndarray, attention: np.ndarray) -> None:
    mask = np.ones((120, 160), dtype=bool)
    mask[:, 80:] = False  # right half is "background", including the max cell
    img = np.asarray(render_overlay(thumb, attention, mask=mask))
    right = _Layout(120, 160, title=False).panel(img, "attention")
    assert (right[:, 80:] == thumb[:, 80:]).all()
    # the colour scale spans the drawn values: the 0.01 cells are now the top colour
    assert (right[0:20, 20:80] == apply_colormap(np.array(1.0))).all()


def test_global_scale_is_the_same_for_every_slide(thumb: np.ndarray) -> None:
    """Per slide, a peaked and a flat map both reach the top colour; on the global scale (attention x cells,
    log from 0.1x to 1000x) a cell at 100x uniform and one at 2x get different colours, the bar's at 100x and 2x."""
    cells = 60 * 80  # 2 x 2 thumbnail pixels a cell; the hot cell is (20, 50): pixels (40:42, 100:102)
    peaked = np.full((60, 80), (1 - 100 / cells) / (cells - 1))
    peaked[20, 50] = 100 / cells  # 100x the uniform share
    flat = np.full((60, 80), (1 - 2 / cells) / (cells - 1))
    flat[20, 50] = 2 / cells
    lay = _Layout(120, 160, title=False)
    top = apply_colormap(np.array(1.0))
    for a in (peaked, flat):
        per_slide = lay.panel(np.asarray(render_overlay(thumb, a)), "attention")
        assert _close(per_slide[40, 100], top, tol=0)
    lo, hi = (np.log10(v) for v in heatmap.GLOBAL_RANGE)
    img = np.asarray(render_overlay(thumb, peaked, scale="global"))
    at_100 = (2 - lo) / (hi - lo)
    assert _close(lay.panel(img, "attention")[40, 100], apply_colormap(np.array(at_100)), tol=1)
    assert lay.on_bar(img, lay.panel(img, "attention")[40, 100], at_100)
    img = np.asarray(render_overlay(thumb, flat, scale="global"))
    at_2 = (np.log10(2) - lo) / (hi - lo)
    assert _close(lay.panel(img, "attention")[40, 100], apply_colormap(np.array(at_2)), tol=1)
    assert lay.on_bar(img, lay.panel(img, "attention")[40, 100], at_2)
    assert not _close(apply_colormap(np.array(at_2)), apply_colormap(np.array(at_100)), tol=20)


def test_tiny_thumbnails_are_enlarged_and_the_title_sits_above_the_bar(attention: np.ndarray) -> None:
    """A 20 x 30 px view (a tiny slide) used to give a 100 x 80 PNG with the title over the bar."""
    small = np.full((20, 30, 3), 200, dtype=np.uint8)
    img = render_overlay(small, attention, title="slide-1: predicted tumour (p = 0.93)")
    lay = _Layout(20, 30, title=True)
    assert img.size == lay.size and lay.zoom == 14 and lay.pw >= heatmap.MIN_PANEL
    arr = np.asarray(img)
    title_band = arr[:lay.title_h]
    dark_rows = np.flatnonzero((title_band.sum(-1) < 200).any(axis=1))
    assert dark_rows.size and dark_rows.max() - dark_rows.min() >= 14  # bold 16 pt text: legible, not ~10 px
    assert (arr[:lay.top - 1, lay.bar_x: lay.bar_x + lay.bar_w] > 200).all()  # nothing drawn over the bar's top
    assert (lay.panel(arr, "slide") == small).all()


def test_all_zero_attention_shows_the_thumbnail(thumb: np.ndarray) -> None:
    img = np.asarray(render_overlay(thumb, np.zeros((3, 4))))
    right = _Layout(120, 160, title=False).panel(img, "attention")
    assert (right[:10] == thumb[:10]).mean() > 0.99  # "no attention" is written in the middle only


@pytest.mark.parametrize("bad", [np.array([[0.1, -0.2]]), np.array([[np.nan, 0.1]]), np.zeros(5)])
def test_overlay_rejects_bad_attention(thumb: np.ndarray, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="attention"):
        render_overlay(thumb, bad)


def test_overlay_rejects_a_bad_thumbnail(thumb: np.ndarray, attention: np.ndarray) -> None:
    with pytest.raises(ValueError, match="thumbnail"):
        render_overlay(thumb.astype(np.float32), attention)


def test_write_png_round_trip(tmp_path: Path, thumb: np.ndarray, attention: np.ndarray) -> None:
    img = render_overlay(thumb, attention)
    path = tmp_path / "sub" / "overlay.png"
    write_png(path, img)
    assert _leftover(path.parent) == ["overlay.png"]
    with Image.open(path) as back:
        assert back.format == "PNG"
        assert (np.asarray(back) == np.asarray(img)).all()


def test_write_png_failure_leaves_nothing(tmp_path: Path, thumb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.fromarray(thumb)

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(str(fp)).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(tmp_path / "overlay.png", img)
    assert _leftover(tmp_path) == []


# --- attention TIFF -------------------------------------------------------------------------------------------------


def test_attention_tiff_round_trip_with_tags(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(35)).reshape(5, 7).astype(np.float32)
    a[0, 0] = np.float32(1e-30)  # tiny values survive exactly
    path = tmp_path / "attn.tif"
    write_attention_tiff(path, a, downsample=(32.0, 32.5), mpp=(0.25, 0.26))
    assert _leftover(tmp_path) == ["attn.tif"]

    back, ds = read_attention_tiff(path)
    assert back.dtype == np.float32 and np.array_equal(back, a)
    assert ds == (32.0, 32.5)

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.dtype == np.float32 and page.shape == (5, 7)
        meta = json.loads(page.description)
        assert meta["wsiats"] == "attention"
        assert (meta["downsample_x"], meta["downsample_y"]) == (32.0, 32.5)
        assert meta["level0_mpp"] == [0.25, 0.26]
        assert int(page.resolutionunit) == 3  # CENTIMETER
        xres, yres = page.resolution
        assert xres == pytest.approx(1e4 / (0.25 * 32.0), rel=1e-6)  # 1250 map pixels per cm
        assert yres == pytest.approx(1e4 / (0.26 * 32.5), rel=1e-6)


def test_attention_tiff_without_mpp_has_no_physical_unit(tmp_path: Path) -> None:
    path = tmp_path / "attn.tiff"
    write_attention_tiff(path, np.ones((3, 4)), downsample=(8, 8), mpp=None)
    back, ds = read_attention_tiff(path)
    assert back.dtype == np.float32 and (back == 1).all() and ds == (8.0, 8.0)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert json.loads(page.description)["level0_mpp"] is None
        assert int(page.resolutionunit) not in (2, 3)  # not inch / centimetre


def test_attention_tiff_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="downsample"):
        write_attention_tiff(tmp_path / "a.tif", np.ones((2, 2)), downsample=(0, 4), mpp=None)
    with pytest.raises(ValueError, match="2-D"):
        write_attention_tiff(tmp_path / "a.tif", np.ones(4), downsample=(4, 4), mpp=None)
    assert _leftover(tmp_path) == []


def test_read_attention_tiff_refuses_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.ones((2, 2), np.float32))
    with pytest.raises(WsiatsError, match="plain.tif: not a wsiats attention map"):
        read_attention_tiff(plain)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(WsiatsError, match="junk.tif: not a readable TIFF"):
        read_attention_tiff(junk)
    with pytest.raises(WsiatsError, match="missing.tif: attention map not found"):
        read_attention_tiff(tmp_path / "missing.tif")


def test_attention_tiff_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tifffile.imwrite
    path = tmp_path / "attn.tif"
    path.write_bytes(b"previous")

    def broken(file: object, data: np.ndarray, **kwargs: object) -> None:
        real(file, data[:1], **kwargs)  # a partial file on disk ...
        raise OSError("killed")  # ... then the write dies

    monkeypatch.setattr(heatmap.tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="killed"):
        write_attention_tiff(path, np.ones((4, 4)), downsample=(2, 2), mpp=None)
    assert _leftover(tmp_path) == ["attn.tif"]
    assert path.read_bytes() == b"previous"  # the old file is untouched


# --- GeoJSON --------------------------------------------------------------------------------------------------------


def _boxes() -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array([[0, 0, 256, 256], [512, 256, 256, 256], [0, 0, 256, 256], [1024, 768, 256, 128],
                      [256, 0, 256, 256]], dtype=np.int64)
    att = np.array([0.1, 0.4, 0.1, 0.05, 0.3], dtype=np.float32)
    return boxes, att


def test_geojson_structure_and_order() -> None:
    boxes, att = _boxes()
    fc = patches_geojson(boxes, att, slide_id="s1")
    assert fc["type"] == "FeatureCollection"
    feats = fc["features"]
    assert len(feats) == 4  # the repeated box is merged
    values = [f["properties"]["measurements"]["attention"] for f in feats]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx([0.4, 0.3, 0.1, 0.05])
    for rank, f in enumerate(feats, start=1):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        (ring,) = f["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["name"] == f"patch {rank}"
        assert props["measurements"]["rank"] == rank
        assert props["classification"]["name"] == "wsiats attention"
        assert len(props["classification"]["color"]) == 3 and len(props["color"]) == 3
        assert props["metadata"] == {"slide_id": "s1"}
    # coordinates are the boxes, in level-0 pixels
    x, y, w, h = boxes[1].tolist()
    assert feats[0]["geometry"]["coordinates"][0] == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    x, y, w, h = boxes[3].tolist()
    assert feats[3]["geometry"]["coordinates"][0] == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    # colours follow the attention: the top patch gets the top colour
    assert feats[0]["properties"]["color"] == apply_colormap(np.array(1.0)).tolist()
    lums = [_luminance(np.array(f["properties"]["color"])) for f in feats]
    assert lums == sorted(lums, reverse=True)


def test_geojson_dedupe_counts_draws_and_keeps_max() -> None:
    boxes = np.array([[10, 20, 30, 30]] * 3 + [[40, 20, 30, 30]])
    fc = patches_geojson(boxes, np.array([0.2, 0.2, 0.25, 0.3]), slide_id="s")
    m = [f["properties"]["measurements"] for f in fc["features"]]
    assert m == [{"attention": 0.3, "rank": 1, "draws": 1}, {"attention": 0.25, "rank": 2, "draws": 3}]


def test_geojson_top_n_and_ties_keep_input_order() -> None:
    boxes = np.array([[0, 0, 8, 8], [8, 0, 8, 8], [16, 0, 8, 8], [24, 0, 8, 8]])
    fc = patches_geojson(boxes, np.array([0.1, 0.5, 0.1, 0.1]), slide_id="s", top=3)
    xs = [f["geometry"]["coordinates"][0][0][0] for f in fc["features"]]
    assert xs == [8, 0, 16]
    assert patches_geojson(boxes, np.ones(4), slide_id="s", top=0)["features"] == []
    assert patches_geojson(np.zeros((0, 4)), np.zeros(0), slide_id="s")["features"] == []


def test_geojson_is_plain_json(tmp_path: Path) -> None:
    boxes, att = _boxes()
    fc = patches_geojson(boxes.astype(np.int32), att.astype(np.float16), slide_id="s1", top=2)
    text = json.dumps(fc)  # raises on numpy scalars
    assert json.loads(text) == fc
    float_boxes = patches_geojson(boxes.astype(np.float64) + 0.5, att, slide_id="s1")
    json.dumps(float_boxes)
    assert float_boxes["features"][0]["geometry"]["coordinates"][0][0] == [512.5, 256.5]


def test_geojson_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="boxes"):
        patches_geojson(np.zeros((3, 3)), np.zeros(3), slide_id="s")
    with pytest.raises(ValueError, match="attention"):
        patches_geojson(np.ones((3, 4)), np.zeros(2), slide_id="s")
    with pytest.raises(ValueError, match="width and height"):
        patches_geojson(np.array([[0, 0, 0, 4]]), np.ones(1), slide_id="s")


def test_write_geojson_atomic(tmp_path: Path) -> None:
    boxes, att = _boxes()
    fc = patches_geojson(boxes, att, slide_id="s1")
    path = tmp_path / "patches.geojson"
    write_geojson(path, fc)
    assert _leftover(tmp_path) == ["patches.geojson"]
    assert json.loads(path.read_text(encoding="utf-8")) == fc


def test_write_geojson_failure_leaves_nothing(tmp_path: Path) -> None:
    boxes, att = _boxes()
    fc = patches_geojson(boxes, att, slide_id="s1")
    fc["features"][-1]["properties"]["bad"] = np.float32(1.0)  # json fails after writing most of the file
    with pytest.raises(TypeError):
        write_geojson(tmp_path / "patches.geojson", fc)
    fc["features"][-1]["properties"]["bad"] = float("nan")  # not valid JSON
    with pytest.raises(ValueError):
        write_geojson(tmp_path / "patches.geojson", fc)
    assert _leftover(tmp_path) == []
