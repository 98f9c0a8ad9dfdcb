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
    COLORBAR_WIDTH,
    TITLE_HEIGHT,
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
    assert (np.diff(lum) >= -0.5).all()  # monotone up to uint8 rounding of one channel
    assert lum[-1] - lum[0] > 150
    ends = {"inferno": ([0, 0, 4], [252, 255, 164]), "viridis": ([68, 1, 84], [253, 231, 37])}[cmap]
    assert rgb[0].tolist() == ends[0] and rgb[-1].tolist() == ends[1]
    # clipped outside [0, 1]
    assert apply_colormap(np.array([-1.0, 2.0]), cmap=cmap).tolist() == [ends[0], ends[1]]


def test_unknown_colormap_names_the_choices(thumb: np.ndarray, attention: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="'jet'.*inferno, viridis"):
        render_overlay(thumb, attention, cmap="jet")


# --- overlay --------------------------------------------------------------------------------------------------------


def test_overlay_size_and_blending(thumb: np.ndarray, attention: np.ndarray) -> None:
    img = render_overlay(thumb, attention, alpha=1.0)
    assert img.mode == "RGB"
    assert img.size == (160 + COLORBAR_WIDTH, 120)
    out = np.asarray(img)[:, :160]
    # attention (6, 8) -> (120, 160): each cell is a 20 x 20 block; the max cell is rows 40:60, cols 100:120
    top = apply_colormap(np.array(1.0))
    assert (out[40:60, 100:120] == top).all()
    assert (out[40:60, 100:120] != thumb[40:60, 100:120]).any(axis=-1).mean() > 0.95
    # cells at 0.01 / 0.5 = 0.02 of the max get a colour near the bottom of the map
    assert (out[0:20, 20:40] == apply_colormap(np.array(0.02))).all()
    # attention == 0: plain thumbnail
    assert (out[:, 0:20] == thumb[:, 0:20]).all()


def test_overlay_half_alpha_mixes_thumbnail_and_colour(thumb: np.ndarray, attention: np.ndarray) -> None:
    out = np.asarray(render_overlay(thumb, attention, alpha=0.5))[:, :160]
    top = apply_colormap(np.array(1.0)).astype(np.float64)
    expected = np.rint(0.5 * thumb[40:60, 100:120].astype(np.float64) + 0.5 * top).astype(np.uint8)
    assert (out[40:60, 100:120] == expected).all()


def test_overlay_mask_keeps_thumbnail(thumb: np.ndarray, attention: np.ndarray) -> None:
    mask = np.ones((120, 160), dtype=bool)
    mask[:, 80:] = False  # right half is "background", including the max cell
    out = np.asarray(render_overlay(thumb, attention, alpha=0.7, mask=mask))[:, :160]
    assert (out[:, 80:] == thumb[:, 80:]).all()
    assert (out[:, 20:80] != thumb[:, 20:80]).any()
    # the colour scale spans the visible values: the 0.01 cells are now the top colour
    assert (out[0:20, 20:40] == np.rint((1 - 0.7) * thumb[0:20, 20:40] + 0.7 * apply_colormap(np.array(1.0)))).all()


def test_overlay_mask_at_attention_resolution(thumb: np.ndarray, attention: np.ndarray) -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[2, 5] = True
    out = np.asarray(render_overlay(thumb, attention, alpha=1.0, mask=mask))[:, :160]
    changed = (out != thumb).any(axis=-1)
    assert changed[40:60, 100:120].all()
    changed[40:60, 100:120] = False
    assert not changed.any()


def test_colorbar_gradient_is_monotone_in_luminance(thumb: np.ndarray, attention: np.ndarray) -> None:
    arr = np.asarray(render_overlay(thumb, attention, cmap="inferno"))
    x = 160 + heatmap._BAR_X + heatmap._BAR_W // 2
    column = arr[heatmap._BAR_PAD:120 - heatmap._BAR_PAD, x]
    lum = _luminance(column)
    assert (np.diff(lum) <= 0).all()  # top of the bar is the top colour
    assert column[0].tolist() == apply_colormap(np.array(1.0)).tolist()
    assert column[-1].tolist() == apply_colormap(np.array(0.0)).tolist()
    # tick labels are drawn as dark text right of the bar
    labels = arr[:, 160 + heatmap._BAR_X + heatmap._BAR_W + heatmap._TICK + 2:]
    assert (labels.sum(axis=-1) < 200).sum() > 30


def test_colorbar_labels_change_with_the_values(thumb: np.ndarray, attention: np.ndarray) -> None:
    a = np.asarray(render_overlay(thumb, attention))[:, 160:]
    b = np.asarray(render_overlay(thumb, attention * 1e-3))[:, 160:]
    bar = slice(heatmap._BAR_X - 1, heatmap._BAR_X + heatmap._BAR_W + 1)
    assert (a[:, bar] == b[:, bar]).all()  # same gradient: normalised by max
    assert (a != b).any()  # different label text


def test_overlay_title_and_small_thumbnails(attention: np.ndarray) -> None:
    small = np.full((20, 30, 3), 200, dtype=np.uint8)
    img = render_overlay(small, attention, title="slide-1: tumour 0.93")
    assert img.size == (30 + COLORBAR_WIDTH, heatmap._MIN_HEIGHT + TITLE_HEIGHT)
    arr = np.asarray(img)
    assert (arr[:TITLE_HEIGHT, :30] < 100).any()  # title text
    assert (arr[TITLE_HEIGHT + 20:, :30] == 255).all()  # padding below the thumbnail is white


def test_overlay_log_scale_lifts_small_values(thumb: np.ndarray, attention: np.ndarray) -> None:
    out = np.asarray(render_overlay(thumb, attention, alpha=1.0, log_decades=2.0))[:, :160]
    # 0.02 of max is 1.7 decades below: position 1 - 1.699 / 2 = 0.15
    expected = apply_colormap(np.array(1 + np.log10(0.02) / 2))
    assert (out[0:20, 20:40] == expected).all()
    assert (out[40:60, 100:120] == apply_colormap(np.array(1.0))).all()


def test_overlay_all_zero_attention_is_plain_thumbnail(thumb: np.ndarray) -> None:
    out = np.asarray(render_overlay(thumb, np.zeros((3, 4))))
    assert (out[:, :160] == thumb).all()


@pytest.mark.parametrize("bad", [np.array([[0.1, -0.2]]), np.array([[np.nan, 0.1]]), np.zeros(5)])
def test_overlay_rejects_bad_attention(thumb: np.ndarray, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="attention"):
        render_overlay(thumb, bad)


def test_overlay_rejects_bad_thumbnail_and_alpha(thumb: np.ndarray, attention: np.ndarray) -> None:
    with pytest.raises(ValueError, match="thumbnail"):
        render_overlay(thumb.astype(np.float32), attention)
    with pytest.raises(ValueError, match="alpha"):
        render_overlay(thumb, attention, alpha=1.5)


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
