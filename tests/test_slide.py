"""The slide layer: metadata, pixels against the in-memory truth, both backends, laziness, errors."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import _slides
import numpy as np
import pytest
import tifffile
from _slides import Generated, crop
from PIL import Image

import wsiats._base
import wsiats.slide as slide_mod
from wsiats.errors import (
    ConfigError,
    CorruptSlideError,
    SlideError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedSlideError,
)
from wsiats.slide import Slide, describe, open_slide, patch_box


def _open(path: Path, backend: str = "auto", **kw: Any) -> Slide:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_slide(path, backend=backend, **kw)


def _area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _refusal(path: Path, error: type[SlideError], backends: tuple[str, ...] = ("auto", "tifffile")) -> str:
    """The one message with which every backend in `backends` refuses to open `path`."""
    messages = set()
    for backend in backends:
        with pytest.raises(error) as err:
            open_slide(path, backend=backend)
        messages.add(str(err.value))
    assert len(messages) == 1, messages
    return messages.pop()


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# --- metadata ---------------------------------------------------------------------------------------------------


def test_generic_tiff_levels_and_mpp(generic_tiff: Generated) -> None:
    with open_slide(generic_tiff.path) as s:
        assert (s.backend, s.vendor) == ("tifffile", "generic-tiff")
        assert s.level_dimensions == ((800, 600), (400, 300), (200, 150))
        assert s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.dimensions == (800, 600) and s.level_count == 3
        assert s.mpp == pytest.approx((0.25, 0.25)) and s.mpp_source == "tiff-resolution"
        assert s.associated_names == ()


def test_ome_subifd_pyramid_all_levels_with_tifffile_one_with_openslide(ome_tiff: Generated) -> None:
    with open_slide(ome_tiff.path) as s:
        assert (s.backend, s.vendor) == ("tifffile", "ome")
        assert s.level_dimensions == ((800, 600), (400, 300), (200, 150))
        assert s.mpp == pytest.approx((0.5, 0.5)) and s.mpp_source == "ome"
        for i, lev in enumerate(ome_tiff.levels):
            np.testing.assert_array_equal(s.read_level(i), lev)
    with open_slide(ome_tiff.path, backend="openslide") as o:
        assert o.level_count == 1  # OpenSlide reads only the main IFD chain
        np.testing.assert_array_equal(o.read_level(0), ome_tiff.levels[0])


def test_svs_levels_associated_images_and_metadata(svs: tuple[Generated, dict[str, np.ndarray]]) -> None:
    gen, extras = svs
    for backend in ("auto", "openslide"):
        with open_slide(gen.path, backend=backend) as s:
            assert s.vendor == "aperio"
            assert s.level_dimensions == ((800, 600), (200, 150), (50, 37))
            assert s.mpp == pytest.approx((0.25, 0.25)) and s.objective_power == 20.0
            assert s.associated_names == ("label", "macro", "thumbnail")
            np.testing.assert_array_equal(s.associated_image("label"), extras["label"])  # LZW: lossless
            assert _diff(s.associated_image("thumbnail"), extras["thumbnail"]).mean() < 3  # JPEG
            with pytest.raises(KeyError, match="no associated image 'slide'"):
                s.associated_image("slide")


def test_single_level_strip_tiff(strip_tiff: Generated) -> None:
    with open_slide(strip_tiff.path) as s:
        assert s.level_dimensions == ((800, 600),)
        assert s.mpp == pytest.approx((0.5, 0.5))
        np.testing.assert_array_equal(s.read_region((100, 50), 0, (64, 32)), strip_tiff.levels[0][50:82, 100:164])
    with pytest.raises(UnsupportedSlideError, match="OpenSlide can read"):
        open_slide(strip_tiff.path, backend="openslide")  # OpenSlide needs tiles


def test_mpp_override_and_missing_mpp(generic_jpeg: Generated) -> None:
    with open_slide(generic_jpeg.path) as s:
        assert s.mpp is None and s.mpp_source is None
        with pytest.raises(SlideError, match="--mpp"):
            s.read_view(mpp=4.0)
    with open_slide(generic_jpeg.path, mpp=0.5) as s:
        assert s.mpp == (0.5, 0.5) and s.mpp_source == "override"
        assert s.read_view(mpp=4.0).image.shape == (75, 100, 3)


def test_implausible_mpp_is_dropped_with_a_warning(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "far.tif"
    _slides.write_generic_pyramid(path, image[:64, :64], n_levels=1, tile=16, mpp=500.0)
    with pytest.warns(UserWarning, match="implausible resolution 500"), open_slide(path) as s:
        assert s.mpp is None


@pytest.mark.parametrize("name", ["strip-rgb.tif", "rgba-tiled.tiff"])
def test_missing_resolution_tag_is_named_not_called_implausible(shared_slides: Path, name: str) -> None:
    """Real files with no XResolution/YResolution: tifffile's 1-px-per-inch default is not a resolution."""
    path = shared_slides / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = open_slide(path, backend="tifffile")
    with s:
        assert s.mpp is None and s.mpp_source is None
    assert [str(w.message) for w in caught] == [
        f"{path}: no resolution tag (XResolution/YResolution), so mpp is unknown (pass --mpp to set it)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # --mpp given: nothing to warn about
        with open_slide(path, mpp=0.5) as s:
            assert s.mpp == (0.5, 0.5)


SHARED = [
    # file, backend chosen by auto, vendor, level dimensions, mpp, objective, associated images
    ("CMU-1-Small-Region.svs", "tifffile", "aperio", ((2220, 2967),), 0.499, 20.0, ("label", "macro", "thumbnail")),
    ("small.svs", "tifffile", "aperio", ((16, 16),), 0.499, 20.0, ("thumbnail",)),
    ("boxes.tiff", "tifffile", "generic-tiff", ((300, 250), (150, 125), (75, 62), (37, 31)), None, None, ()),
    ("sm_image.dcm", "openslide", "dicom", ((50, 50),), 0.499, None, ()),
    ("dicom-boxes", "openslide", "dicom", ((16, 16),), 0.499, 20.0, ("thumbnail",)),
    ("small-HE-levels.tiff", "tifffile", "generic-tiff", ((300, 250), (150, 125), (75, 62), (37, 31)), None, None,
     ()),
    ("grey-jpeg-pyramid.tif", "tifffile", "generic-tiff", ((120, 180), (60, 90), (30, 45)), None, None, ()),
    ("fluorescence-TRITC.ndpi", "openslide", "hamamatsu",
     tuple((3968 >> i, 4864 >> i) for i in range(7)), 0.2281750559028887, 40.0, ("macro",)),
]


@pytest.mark.parametrize(("name", "backend", "vendor", "dims", "mpp", "objective", "assoc"), SHARED)
def test_real_slides(shared_slides: Path, name: str, backend: str, vendor: str, dims: tuple[tuple[int, int], ...],
                     mpp: float | None, objective: float | None, assoc: tuple[str, ...]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = open_slide(shared_slides / name)
    with s:
        assert (s.backend, s.vendor, s.level_dimensions) == (backend, vendor, dims)
        assert s.objective_power == objective and s.associated_names == assoc
        if mpp is None:
            assert s.mpp is None
            assert any("72 dpi" in str(w.message) and str(shared_slides / name) in str(w.message) for w in caught)
        else:
            assert s.mpp == pytest.approx((mpp, mpp))
        for name_ in assoc:
            assert s.associated_image(name_).dtype == np.uint8
        view = s.read_view(max_size=64)
        assert max(view.image.shape[:2]) <= 64 and view.image.dtype == np.uint8
        assert json.loads(json.dumps(describe(s)))["level_dimensions"] == [list(d) for d in dims]


def test_ndpi_objective_from_its_tags_with_tifffile(shared_slides: Path) -> None:
    """tifffile sees the 4 stored levels (OpenSlide adds 3 it scales down from JPEG); both read 40x from the tags."""
    path = shared_slides / "fluorescence-TRITC.ndpi"
    with open_slide(path, backend="tifffile") as t, open_slide(path) as auto:
        assert (t.vendor, t.objective_power, t.level_count) == ("hamamatsu", 40.0, 4)
        assert (auto.backend, auto.objective_power, auto.level_count) == ("openslide", 40.0, 7)
        assert t.mpp == pytest.approx(auto.mpp) and t.mpp == pytest.approx((0.22818, 0.22818), abs=1e-5)
        assert t.level_dimensions == auto.level_dimensions[:4]


def test_old_style_jpeg_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ojpeg.tif"
    tifffile.imwrite(path, _slides.tissue_image(32, 32), photometric="ycbcr", tile=(16, 16), compression="jpeg")
    _slides.patch_tag(path, 259, 6)  # Compression: old-style JPEG
    assert _refusal(path, UnsupportedSlideError) == (f"{path}: uses old-style JPEG compression (TIFF compression 6, replaced in 1995), "
                                                     "which neither tifffile nor OpenSlide decodes; re-save it as "
                                                     "tiled JPEG (e.g. vips tiffsave --tile --pyramid --compression "
                                                     "jpeg)")


def test_boxes_tiff_mpp_unknown_with_both_backends(shared_slides: Path) -> None:
    for backend in ("tifffile", "openslide"):
        with pytest.warns(UserWarning, match="72 dpi, a software default"):
            s = open_slide(shared_slides / "boxes.tiff", backend=backend)
        assert s.mpp is None
        s.close()


# --- both backends read the same pixels -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["generic_tiff", "generic_jpeg", "svs", "cmu", "boxes"])
def test_backends_return_identical_pixels(which: str, request: pytest.FixtureRequest) -> None:
    if which in ("cmu", "boxes"):
        shared = request.getfixturevalue("shared_slides")
        path = shared / ("CMU-1-Small-Region.svs" if which == "cmu" else "boxes.tiff")
    else:
        gen = request.getfixturevalue(which)
        path = (gen[0] if isinstance(gen, tuple) else gen).path
    t, o = _open(path, "tifffile"), _open(path, "openslide")
    with t, o:
        assert t.level_dimensions == o.level_dimensions
        for level, ds in enumerate(t.level_downsamples):
            if ds == int(ds):  # OpenSlide interpolates at fractional level offsets; compare where it cannot
                np.testing.assert_array_equal(t.read_level(level), o.read_level(level))
        rng = np.random.default_rng(0)
        W, H = t.dimensions
        for x, y in zip(rng.integers(-40, W, 8), rng.integers(-40, H, 8)):
            np.testing.assert_array_equal(t.read_region((x, y), 0, (70, 50)), o.read_region((x, y), 0, (70, 50)))
            np.testing.assert_array_equal(t.read_region((x, y), 0, (70, 50), fill=0),
                                          o.read_region((x, y), 0, (70, 50), fill=0))
        for name in t.associated_names:
            np.testing.assert_array_equal(t.associated_image(name), o.associated_image(name))


@pytest.mark.parametrize("which", ["generic_tiff", "generic_jpeg", "svs", "strip_tiff", "ome_tiff", "cmu"])
def test_tile_reader_equals_tifffile_zarr_store(which: str, request: pytest.FixtureRequest) -> None:
    if which == "cmu":
        path = request.getfixturevalue("shared_slides") / "CMU-1-Small-Region.svs"
    else:
        gen = request.getfixturevalue(which)
        path = (gen[0] if isinstance(gen, tuple) else gen).path
    with slide_mod.TiffSlide(path) as fast, slide_mod.TiffSlide(path, _reader="zarr") as ref:
        assert {type(r).__name__ for r in fast._levels} == {"_TileLevel"}
        assert {type(r).__name__ for r in ref._levels} == {"_ZarrLevel"}
        for level in range(fast.level_count):
            np.testing.assert_array_equal(fast.read_level(level), ref.read_level(level))
        rng = np.random.default_rng(5)
        W, H = fast.dimensions
        for x, y in zip(rng.integers(-30, W, 6), rng.integers(-30, H, 6)):
            np.testing.assert_array_equal(fast.read_region((x, y), 0, (300, 130)),
                                          ref.read_region((x, y), 0, (300, 130)))


def test_planar_rgb_is_read_through_zarr(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "planar.tif"
    _slides.write_planar(path, image)
    with open_slide(path) as s:
        assert type(s._levels[0]).__name__ == "_ZarrLevel"  # type: ignore[attr-defined]
        np.testing.assert_array_equal(s.read_level(0), image)
        np.testing.assert_array_equal(s.read_region((790, -4), 0, (20, 10)), crop(image, 790, -4, 20, 10))


# --- regions, patches, views against the image in memory -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_read_region_fills_outside_the_image(generic_tiff: Generated, backend: str) -> None:
    img = generic_tiff.levels[0]
    with open_slide(generic_tiff.path, backend=backend) as s:
        for (x, y), fill in [((-10, -20), 255), ((770, 590), 0), ((-5, 300), 17), ((900, 700), 255)]:
            np.testing.assert_array_equal(s.read_region((x, y), 0, (64, 48), fill=fill), crop(img, x, y, 64, 48, fill))
        whole = s.read_region((-8, -8), 1, (420, 320))  # level 1 is 400 x 300
        np.testing.assert_array_equal(whole, crop(generic_tiff.levels[1], -4, -4, 420, 320))
        assert s.read_region((0, 0), 0, (0, 5)).shape == (5, 0, 3)


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_read_regions_equals_sequential_reads(generic_jpeg: Generated, workers: int | None) -> None:
    rng = np.random.default_rng(1)
    locs = [(int(x), int(y)) for x, y in zip(rng.integers(-50, 800, 20), rng.integers(-50, 600, 20))]
    with open_slide(generic_jpeg.path) as s:
        batch = s.read_regions(locs, 1, (40, 30), workers=workers)
        assert batch.shape == (20, 30, 40, 3)
        for i, loc in enumerate(locs):
            np.testing.assert_array_equal(batch[i], s.read_region(loc, 1, (40, 30)))
        if workers == 3:  # one thread pool per slide, reused by later calls
            pool = s._pool
            s.read_patches(np.array([[100.0, 100.0], [200.0, 50.0]]), 16, workers=2)
            assert pool is not None and s._pool is pool


def test_patch_box_convention() -> None:
    assert patch_box((100.0, 50.0), 32, 1.0) == (84, 34, 32, 32)
    assert patch_box((100.0, 50.0), 32, 2.0) == (68, 18, 64, 64)
    assert patch_box((10.25, 10.75), 3, 1.0) == (9, 9, 3, 3)  # 8.75 -> 9, 9.25 -> 9
    assert patch_box((0.0, 0.0), 10, 1.5) == (-7, -7, 15, 15)  # -7.5 rounds half up to -7


def _centers(rng: np.random.Generator, n: int, w: int, h: int) -> np.ndarray:
    pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1)
    return np.concatenate([pts, [[0, 0], [w, h], [w - 1, 3], [2.5, h - 0.5]]])  # corners and borders


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_read_patches_equal_crops_of_the_image(generic_tiff: Generated, backend: str) -> None:
    rng = np.random.default_rng(2)
    centers = _centers(rng, 12, 800, 600)
    with open_slide(generic_tiff.path, backend=backend) as s:
        got = s.read_patches(centers, 48)
        for c, patch in zip(centers, got):
            x0, y0, w0, h0 = patch_box((c[0], c[1]), 48, 1.0)
            np.testing.assert_array_equal(patch, crop(generic_tiff.levels[0], x0, y0, w0, h0))
        # downsample 2 is stored (level 1): the patch is a crop of that level at floor(x0 / 2)
        got = s.read_patches(centers, 32, downsample=2.0, workers=2)
        for c, patch in zip(centers, got):
            x0, y0, _, _ = patch_box((c[0], c[1]), 32, 2.0)
            np.testing.assert_array_equal(patch, crop(generic_tiff.levels[1], x0 // 2, y0 // 2, 32, 32))


def test_read_patches_between_levels_are_area_resized(generic_tiff: Generated) -> None:
    rng = np.random.default_rng(3)
    centers = _centers(rng, 30, 800, 600)
    img, level1 = generic_tiff.levels[0], generic_tiff.levels[1]
    with open_slide(generic_tiff.path) as s:
        got = s.read_patches(centers, 24, downsample=3.0)  # from level 1 (ds 2), resized by 1.5
    errors, shifted = [], []
    for c, patch in zip(centers, got):
        x0, y0, w0, h0 = patch_box((c[0], c[1]), 24, 3.0)
        # exactly: the level-1 box (x0 / 2, y0 / 2, 36 x 36 level-1 px) area-resized to 24 x 24
        ix, iy = math.floor(x0 / 2), math.floor(y0 / 2)
        src = crop(level1, ix, iy, math.ceil((x0 + 72) / 2) - ix, math.ceil((y0 + 72) / 2) - iy)
        box = (x0 / 2 - ix, y0 / 2 - iy, (x0 + 72) / 2 - ix, (y0 + 72) / 2 - iy)
        want = np.asarray(Image.fromarray(src).resize((24, 24), Image.Resampling.BOX, box=box))
        np.testing.assert_array_equal(patch, want)
        # approximately: the level-0 box area-resized (level 1 is itself an area reduction)
        errors.append(_diff(patch, _area(crop(img, x0, y0, w0, h0), (24, 24))).mean())
        shifted.append(_diff(patch, _area(crop(img, x0 + 3, y0, w0, h0), (24, 24))).mean())
    assert np.mean(errors) < 3.5 and max(errors) < 6, errors
    assert np.mean(shifted) > np.mean(errors) + 1  # one patch pixel off is measurably worse


@pytest.mark.parametrize("downsample", [2.0, 2.001125, 3.0, 1.5])
def test_openslide_patches_at_a_fractional_level_are_not_blended(tmp_path: Path, downsample: float) -> None:
    """Level 1 has downsample 2.001125: OpenSlide blends every read of it that does not start at its origin
    (up to 96 grey levels off here, on 1-px detail). Patches now come from a level it addresses exactly,
    resized once: the area average of level 0 over the patch's box."""
    path = tmp_path / "fractional.svs"
    level0 = _slides.write_svs_fractional(path)[0]
    rng = np.random.default_rng(3)
    centers = np.column_stack([rng.uniform(100, 1900, 12), rng.uniform(100, 1500, 12)])
    with open_slide(path, backend="openslide") as s:
        assert (s.vendor, s.level_downsamples) == ("aperio", (1.0, 2.001125))
        got = s.read_patches(centers, 40, downsample=downsample)
    for patch, (cx, cy) in zip(got, centers):
        x0, y0, _, _ = patch_box((cx, cy), 40, downsample)
        box = (x0, y0, x0 + 40 * downsample, y0 + 40 * downsample)
        np.testing.assert_array_equal(patch, np.asarray(Image.fromarray(level0).resize(
            (40, 40), Image.Resampling.BOX, box=box)))


def test_best_level_for_downsample(generic_tiff: Generated, shared_slides: Path) -> None:
    with open_slide(generic_tiff.path) as s:
        got = [s.best_level_for_downsample(d) for d in (0.5, 1.0, 1.9, 1.99, 2.0, 3.9, 4.0, 100.0)]
        assert got == [0, 0, 0, 1, 1, 1, 2, 2]
    with _open(shared_slides / "boxes.tiff") as s:
        assert s.best_level_for_downsample(4.0) == 2  # 4.016 is within 1% of 4


def _assert_close_to_area(view: np.ndarray, image: np.ndarray) -> None:
    """A view is the area-average of level 0 up to pyramid rounding, which shows only on sharp edges."""
    d = _diff(view, _area(image, (view.shape[1], view.shape[0]))).max(-1)
    assert d.mean() < 3 and (d > 40).mean() < 0.01, (d.mean(), (d > 40).mean())


def test_read_view_matches_area_downsample(generic_tiff: Generated) -> None:
    img = generic_tiff.levels[0]
    with open_slide(generic_tiff.path) as s:
        v = s.read_view(downsample=4.0)  # exactly level 2
        np.testing.assert_array_equal(v.image, generic_tiff.levels[2])
        assert v.downsample == (4.0, 4.0)
        for ds in (5.0, 3.0, 7.3):
            v = s.read_view(downsample=ds)
            w, h = round(800 / ds), round(600 / ds)
            assert v.image.shape == (h, w, 3) and v.downsample == (800 / w, 600 / h)
            _assert_close_to_area(v.image, img)
        assert s.read_view(max_size=100).image.shape == (75, 100, 3)
        assert s.read_view(mpp=2.0).image.shape == (75, 100, 3)  # 2 um/px over 0.25 um/px: downsample 8
        assert s.read_view().image.shape == (600, 800, 3)  # default: longest side at most 1024
        with pytest.raises(SlideError, match="finer than level 0"):
            s.read_view(downsample=0.5)


def test_read_view_at_a_near_integer_factor_is_block_means_with_their_geometry(tmp_path: Path) -> None:
    """460 px at downsample 8 is a 58 px view; level 2 has 115 px, a factor of 1.983 (it was reduced by 1 and
    the whole level resized): now it is level 2's 2 x 2 block means, and its downsample is 2 x 4 = 8, not 460 / 58."""
    path = tmp_path / "odd.tif"
    levels = _slides.write_generic_pyramid(path, _slides.tissue_image(460, 460, seed=5), n_levels=3, tile=64)
    with open_slide(path) as s:
        v = s.read_view(downsample=8.0)
    assert levels[2].shape == (115, 115, 3) and v.image.shape == (58, 58, 3)
    assert v.downsample == (8.0, 8.0)
    np.testing.assert_array_equal(v.image, np.asarray(Image.fromarray(levels[2]).reduce(2)))


def test_read_view_of_single_level_slide_is_chunked_without_seams(strip_tiff: Generated,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    img = strip_tiff.levels[0]
    with open_slide(strip_tiff.path) as s:
        one_shot = s.read_view(downsample=6.5)
        sizes: list[tuple[int, int]] = []
        original = s._read_px

        def spy(level: int, x: int, y: int, w: int, h: int, fill: int) -> np.ndarray:
            sizes.append((w, h))
            return original(level, x, y, w, h, fill)

        monkeypatch.setattr(s, "_read_px", spy)
        monkeypatch.setattr(wsiats._base, "_VIEW_CHUNK", 100)
        chunked = s.read_view(downsample=6.5)
    # never the whole level at once: whole strips of 32 rows (blocks of 6 rows straddle them)
    assert sizes == [(800, 32)] * 18 + [(800, 24)]
    np.testing.assert_array_equal(chunked.image, one_shot.image)  # chunk borders leave no seams
    assert chunked.image.shape == (round(600 / 6.5), round(800 / 6.5), 3)
    _assert_close_to_area(chunked.image, img)


@pytest.mark.parametrize("ds", [3.0, 7.3, 1.0])
def test_read_view_decodes_each_tile_once(tmp_path: Path, image: np.ndarray, ds: float) -> None:
    """Chunks follow the tiles, so no tile is decoded again for the next chunk (it was, per 1024^2 chunk)."""
    path = tmp_path / "one_level.tif"
    _slides.write_generic_pyramid(path, image, n_levels=1, tile=96)  # 800 x 600: 9 x 7 tiles
    with open_slide(path) as s:
        one_shot = s.read_view(downsample=ds)
        reader = s._levels[0]  # type: ignore[attr-defined]
        decoded: list[int] = []
        original = reader._decode

        def counting(data: bytes, index: int, **kw: Any) -> Any:
            decoded.append(index)
            return original(data, index, **kw)

        reader._decode = counting
        from wsiats._tiff import TILE_CACHE

        TILE_CACHE.drop(reader.cache_id)  # the one-shot read's tiles: decode them again, counted
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(wsiats._base, "_VIEW_CHUNK", 200)  # 2 x 2 tiles a chunk
            chunked = s.read_view(downsample=ds)
    assert sorted(decoded) == list(range(63))
    np.testing.assert_array_equal(chunked.image, one_shot.image)
    _assert_close_to_area(chunked.image, image)


def test_tile_or_strip_over_the_decoded_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2.6 MB file with one 30000^2 deflate tile made `info` take 2.7 GB: the header says how big tiles are."""
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.full((1024, 2048, 3), 240, np.uint8), photometric="rgb", tile=(1024, 2048),
                     compression="zlib")  # 6 MiB when decoded, a few kB on disk
    monkeypatch.setenv("WSIATS_MAX_TILE_MB", "4")
    assert _refusal(path, SlideError) == (f"{path}: level 0 stores tiles of 2048 x 1024 px (6 MiB each, decoded), "
                                          "over the 4 MiB limit of one decoded tile or strip (a decompression "
                                          "bomb?); --max-tile-mb raises the limit")
    strips = tmp_path / "strips.tif"
    tifffile.imwrite(strips, np.full((1024, 2048, 3), 240, np.uint8), photometric="rgb", rowsperstrip=1024)
    with pytest.raises(SlideError, match=r"level 0 stores strips of 2048 x 1024 px \(6 MiB each"):
        open_slide(strips)
    monkeypatch.setenv("WSIATS_MAX_TILE_MB", "8")
    with open_slide(path) as s:
        assert s.read_region((5, 5), 0, (1, 1)).tolist() == [[[240, 240, 240]]]
    monkeypatch.setenv("WSIATS_MAX_TILE_MB", "lots")
    with pytest.raises(ConfigError, match="WSIATS_MAX_TILE_MB must be a positive number of MiB, not 'lots'"):
        open_slide(path)


def test_views_and_patches_of_a_huge_header_without_pyramid_are_refused_at_once(tmp_path: Path) -> None:
    """200000^2 px of empty tiles: a view at downsample 2000 read all 4e10 px (> 60 s), a patch at 4000
    allocated gigabytes; both now stop before reading, naming the option."""
    path = tmp_path / "huge.tif"
    _slides.write_empty_huge(path)
    t0 = time.perf_counter()
    with open_slide(path) as s:
        with pytest.raises(SlideError) as err:
            s.read_view(downsample=2000)
        assert str(err.value) == (f"{path}: a view at downsample 2000 (--view-downsample or --view-mpp) would decode "
                                  "level 0 whole (200000 x 200000 px), over the 4294967296-pixel budget of a view; the "
                                  "slide has no coarser level to read it from")
        with pytest.raises(SlideError) as err:
            s.read_patches(np.array([[1e5, 1e5]] * 10), 224, downsample=4000)
        assert str(err.value) == (f"{path}: 10 patch(es) of 224 px at downsample 4000 (--patch-downsample or "
                                  "--patch-mpp, --patch-size) would decode 896001 x 896001 px of level 0 each, over "
                                  "the 268435456-pixel budget of a patch read; the slide has no coarser level to read "
                                  "them from")
        assert s.read_patches(np.array([[1e5, 1e5]]), 224, downsample=16).shape == (1, 224, 224, 3)  # 3585^2: fine
    assert time.perf_counter() - t0 < 5


# --- laziness on a 10-gigapixel slide -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_sparse_ten_gigapixel_slide_is_read_lazily(sparse: _slides.SparseSlide, backend: str) -> None:
    rng = np.random.default_rng(4)
    tissue = np.argwhere(sparse.blocks)
    picks = tissue[rng.integers(0, len(tissue), 32)]
    in_tissue = (picks[:, ::-1] + rng.uniform(0.2, 0.8, (32, 2))) * sparse.block
    anywhere = rng.uniform(0, sparse.size, (32, 2))
    centers = np.concatenate([in_tissue, anywhere])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    t0 = time.perf_counter()
    with open_slide(sparse.path, backend=backend) as s:
        assert s.dimensions == (100_000, 100_000) and s.level_count == 8
        assert s.dimensions[0] * s.dimensions[1] >= 10**10
        view = s.read_view(max_size=1024)
        patches = s.read_patches(centers, 256)
        with pytest.raises(SlideError, match="budget"):
            s.read_level(0)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert elapsed < 10, elapsed
    assert peak < 300e6 and grown_mb < 300, (peak, grown_mb)
    assert view.image.shape == (1024, 1024, 3)
    # the view shows the tissue blocks: compare with the truth at each view pixel's centre
    step = view.downsample[0]
    xs = ((np.arange(1024) + 0.5) * step).astype(int)
    want = sparse.blocks[(xs // sparse.block)[:, None], (xs // sparse.block)[None, :]]
    got = np.abs(view.image.astype(int) - 255).sum(-1) > 60
    assert (got != want).mean() < 0.02
    for c, patch in zip(centers, patches):
        x0, y0, _, _ = patch_box((c[0], c[1]), 256, 1.0)
        assert _diff(patch, sparse.truth(x0, y0, 256, 256)).max() <= 12  # JPEG of flat colour / empty tiles


def test_large_tile_tables_read_from_the_file_are_tifffiles(sparse: _slides.SparseSlide) -> None:
    """Levels of more tiles than `_RAW_TABLE_ABOVE` take their offsets and byte counts from the file's bytes,
    equal to tifffile's; a table that differs from tifffile's (as its vendor fixes make them) falls back to it."""
    import tifffile

    from wsiats import _tiff

    with tifffile.TiffFile(sparse.path) as tf:
        fd = os.open(sparse.path, os.O_RDONLY)
        try:
            page = tf.series[0].levels[0].pages[0]
            assert len(page.dataoffsets) > _tiff._RAW_TABLE_ABOVE
            offsets, counts = _tiff._tile_table(page, fd)
            np.testing.assert_array_equal(offsets, np.asarray(page.dataoffsets))
            np.testing.assert_array_equal(counts, np.asarray(page.databytecounts))
            shifted = tuple(v + 1 for v in page.dataoffsets)
            np.testing.assert_array_equal(_tiff._table(page, shifted, (324, 273), fd), np.asarray(shifted))
        finally:
            os.close(fd)


def test_sparse_slide_empty_tiles_are_white_in_both_backends(sparse: _slides.SparseSlide) -> None:
    by, bx = np.argwhere(sparse.blocks)[0]
    x, y = int(bx * sparse.block - 100), int(by * sparse.block - 100)  # straddles glass and tissue
    with open_slide(sparse.path) as t, open_slide(sparse.path, backend="openslide") as o:
        a, b = t.read_region((x, y), 0, (300, 300)), o.read_region((x, y), 0, (300, 300))
    np.testing.assert_array_equal(a, b)
    assert (a[:100, :100] == 255).all() and _diff(a, sparse.truth(x, y, 300, 300)).max() <= 12


# --- errors ---------------------------------------------------------------------------------------------------------


def test_missing_file_directory_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError, match=r"nope\.svs: no such file$"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    with pytest.raises(SlideNotFoundError, match="is a directory, not a slide file"):
        open_slide(tmp_path / "folder")
    empty = tmp_path / "x.tif"
    empty.touch()
    with pytest.raises(CorruptSlideError) as err:
        open_slide(empty)
    assert str(err.value) == f"{empty}: file is empty (0 bytes)"


def test_random_bytes_are_unsupported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for backend in ("auto", "openslide"):
        with pytest.raises(UnsupportedSlideError) as err:
            open_slide(junk, backend=backend)
        assert str(err.value) == f"{junk}: not a whole-slide image format tifffile or OpenSlide can read"
    with pytest.raises(UnsupportedSlideError, match="not a TIFF file"):
        open_slide(junk, backend="tifffile")
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"II*\x00" + bytes(range(256)) * 4)  # TIFF magic, garbage after it
    with pytest.raises(CorruptSlideError, match="broken TIFF structure"):
        open_slide(fake)


@pytest.mark.parametrize("keep", [0.6, 0.2])
def test_truncated_tiff_is_corrupt_and_silent(tmp_path: Path, generic_jpeg: Generated, keep: float,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.tiff"
    _slides.truncate(generic_jpeg.path, cut, keep=keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptSlideError, match=r"^.*cut\.tiff: file is truncated: level \d needs \d+ bytes"):
            open_slide(cut)
    assert capfd.readouterr().err == ""  # tifffile's log lines never reach the terminal


def test_absurd_or_inconsistent_dimensions_are_corrupt(tmp_path: Path, generic_jpeg: Generated) -> None:
    for width, message in [(3_000_000, "claims 3000000 x 600 px"), (5000, "tiles/strips where its size needs")]:
        bad = tmp_path / f"w{width}.tif"
        shutil.copy(generic_jpeg.path, bad)
        _slides.patch_tag(bad, 256, width)  # ImageWidth
        with pytest.raises(CorruptSlideError, match=message):
            _open(bad, "tifffile")


@pytest.mark.parametrize(("writer", "message"), [
    (_slides.write_uint16, "has 1 channel(s) of uint16; wsiats needs 8-bit RGB or 8-bit greyscale"),
    (_slides.write_rgb16, "has 3 channel(s) of uint16; wsiats needs 8-bit RGB or 8-bit greyscale"),
])
def test_non_rgb_images_are_unsupported(tmp_path: Path, writer: Any, message: str) -> None:
    """Neither reader decodes these (OpenSlide opens them, then fails on the first pixel): tifffile's reason."""
    path = tmp_path / "img.tif"
    writer(path)
    assert _refusal(path, UnsupportedSlideError) == f"{path}: {message}"


@pytest.mark.parametrize("photometric", ["minisblack", "miniswhite"])
def test_8_bit_greyscale_is_read_as_rgb(tmp_path: Path, photometric: str) -> None:
    path = tmp_path / "grey.tif"
    grey = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    tifffile.imwrite(path, grey, photometric=photometric, tile=(16, 16), compression="zlib")
    want = 255 - grey if photometric == "miniswhite" else grey
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        np.testing.assert_array_equal(s.read_level(0), np.repeat(want[..., None], 3, axis=2))
        np.testing.assert_array_equal(s.read_region((5, 7), 0, (20, 9)), np.repeat(want[7:16, 5:25, None], 3, axis=2))


def test_real_grey_jpeg_pyramid_is_read_by_tifffile(shared_slides: Path) -> None:
    """large_image's test_orient6.tif was refused ('has 1 channel(s) of uint8'), though OpenSlide reads it."""
    path = shared_slides / "grey-jpeg-pyramid.tif"
    with tifffile.TiffFile(path) as tif:
        stored = [page.asarray() for page in tif.pages]
    with _open(path) as s:
        assert (s.backend, s.level_dimensions) == ("tifffile", ((120, 180), (60, 90), (30, 45)))
        for level, grey in enumerate(stored):  # the stored grid: like OpenSlide, wsiats ignores Orientation
            np.testing.assert_array_equal(s.read_level(level), np.repeat(grey[..., None], 3, axis=2))
        assert s.read_view(max_size=32).image.shape == (32, 21, 3)


def test_auto_falls_back_to_openslide_when_tifffile_refuses_the_pixels(tmp_path: Path) -> None:
    path = tmp_path / "palette.tif"
    index = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    lut = np.stack([np.arange(256), 255 - np.arange(256), np.full(256, 128)]).astype(np.uint16) * 257
    tifffile.imwrite(path, index, photometric="palette", colormap=lut, tile=(16, 16), compression="zlib")
    with pytest.raises(UnsupportedSlideError, match="stores PALETTE pixels"):
        open_slide(path, backend="tifffile")
    with open_slide(path) as s:
        assert s.backend == "openslide"
        np.testing.assert_array_equal(s.read_level(0), (lut[:, index] // 257).transpose(1, 2, 0).astype(np.uint8))


@pytest.mark.parametrize("premultiplied", [False, True])
def test_alpha_is_composited_over_white(tmp_path: Path, premultiplied: bool) -> None:
    path = tmp_path / "rgba.tif"
    rgba = _slides.write_rgba(path, premultiplied=premultiplied).astype(np.int32)
    rgb, a = rgba[..., :3], rgba[..., 3:]
    want = rgb + (255 - a) if premultiplied else (rgb * a + 127) // 255 + (255 - a)
    for backend in ("tifffile", "openslide"):
        with open_slide(path, backend=backend) as s:
            got = s.read_level(0).astype(np.int32)
        assert np.abs(got - np.minimum(want, 255)).max() <= 1, backend  # OpenSlide un-premultiplies: +-1


def test_unknown_codec_fails_at_read_time(tmp_path: Path, generic_tiff: Generated) -> None:
    bad = tmp_path / "codec.tif"
    shutil.copy(generic_tiff.path, bad)
    _slides.patch_tag(bad, 259, 60001)  # Compression: a scheme nobody implements
    with open_slide(bad) as s:
        with pytest.raises(SlideReadError, match=r"cannot read level 0 region .*compression"):
            s.read_region((0, 0), 0, (10, 10))


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_bad_tile_fails_naming_level_and_region(tmp_path: Path, generic_jpeg: Generated, backend: str) -> None:
    bad = tmp_path / "badtile.tif"
    shutil.copy(generic_jpeg.path, bad)
    _slides.corrupt_tile(bad, index=1)  # level 0, second tile: x 128..255, y 0..127
    with open_slide(bad, backend=backend) as s, open_slide(generic_jpeg.path, backend=backend) as good:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (100, 100)), good.read_region((0, 0), 0, (100, 100)))
        with pytest.raises(SlideReadError, match=r"badtile\.tif: cannot read level 0 region x=1\d\d y=0"):
            s.read_region((150, 0), 0, (20, 20))


def test_jpeg_tile_with_its_end_zeroed_is_damaged_not_decoded(tmp_path: Path, generic_jpeg: Generated) -> None:
    """libjpeg returns smeared pixels for such a tile without an error; the marker check refuses it."""
    bad = tmp_path / "zeroed.tif"
    shutil.copy(generic_jpeg.path, bad)
    with tifffile.TiffFile(bad) as tif:
        offset, count = int(tif.pages[0].dataoffsets[1]), int(tif.pages[0].databytecounts[1])
    with open(bad, "r+b") as fh:
        fh.seek(offset + count // 2)
        fh.write(bytes(count - count // 2))
    with open_slide(bad) as s, open_slide(generic_jpeg.path) as good:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (100, 100)), good.read_region((0, 0), 0, (100, 100)))
        with pytest.raises(SlideReadError) as err:
            s.read_region((150, 0), 0, (20, 20))
        assert str(err.value) == (f"{bad}: cannot read level 0 region x=150 y=0 20x20 px: ValueError: JPEG tile 1 is "
                                  "damaged (no end-of-image marker): the file is corrupt")


def test_bad_arguments_and_closed_slide(generic_tiff: Generated) -> None:
    with pytest.raises(ConfigError, match="--backend"):
        open_slide(generic_tiff.path, backend="pil")
    with pytest.raises(ConfigError, match="--mpp"):
        open_slide(generic_tiff.path, mpp=0)
    s = open_slide(generic_tiff.path)
    with pytest.raises(SlideError, match="level 3 does not exist"):
        s.read_region((0, 0), 3, (4, 4))
    s.close()
    with pytest.raises(SlideReadError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


def test_describe_is_json(svs: tuple[Generated, dict[str, np.ndarray]]) -> None:
    with open_slide(svs[0].path) as s:
        d = json.loads(json.dumps(describe(s)))
    assert d["path"] == str(svs[0].path) and d["backend"] == "tifffile" and d["vendor"] == "aperio"
    assert d["level_count"] == 3 and d["level_dimensions"][1] == [200, 150]
    assert d["level_downsamples"][1] == 4.0 and d["mpp"] == [0.25, 0.25] and d["mpp_source"] == "aperio"
    assert d["objective_power"] == 20.0 and d["associated_images"] == ["label", "macro", "thumbnail"]
    assert d["file_size"] == svs[0].path.stat().st_size and math.isclose(d["gigapixels"], 0.00048)


def test_decoded_tiles_are_cached_within_a_bound_and_dropped_on_close(tmp_path: Path) -> None:
    """Patches that share file tiles decode each tile once; the cache is bounded, read-only, and forgets a
    closed slide's tiles (a new slide never hits them)."""
    from wsiats import _tiff
    from wsiats.slide import open_slide

    image = _slides.tissue_image(512, 512, seed=3)
    path = tmp_path / "s.tif"
    _slides.write_generic_pyramid(path, image, n_levels=1, tile=128)
    slide = open_slide(path, backend="tifffile")
    level = slide._levels[0]  # type: ignore[attr-defined]
    calls = []
    decode = level._decode
    level._decode = lambda *a, **k: calls.append(a[1]) or decode(*a, **k)
    centers = np.array([[100.0, 100.0], [110.0, 105.0], [300.0, 300.0]])
    first = slide.read_patches(centers, 32, workers=1)
    n_first = len(calls)
    again = slide.read_patches(centers, 32, workers=1)
    assert np.array_equal(first, again) and np.array_equal(first[0], image[84:116, 84:116])
    assert len(calls) == n_first  # every tile came from the cache
    assert n_first == len(set(calls))  # and within the first read each tile was decoded once
    tile = _tiff.TILE_CACHE.get((level.cache_id, calls[0]))
    assert tile is not None and not tile.flags.writeable
    slide.close()
    assert _tiff.TILE_CACHE.get((level.cache_id, calls[0])) is None

    small = _tiff._TileCache(max_bytes=8 * 1000)
    for i in range(20):
        small.put((0, i), np.zeros(1000, np.uint8))
    assert small.get((0, 0)) is None and small.get((0, 19)) is not None  # oldest out, at most 8 kB held
    assert sum(t.nbytes for t in small._tiles.values()) <= 8000
    small.put((0, 99), np.zeros(2000, np.uint8))  # over max_bytes / 8: not kept
    assert small.get((0, 99)) is None
