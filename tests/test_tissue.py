"""Tissue mask on generated views: stained blobs on glass."""

from __future__ import annotations

import numpy as np
import pytest

from wsiats.tissue import otsu_threshold, tissue_mask


def _view(seed: int = 0, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A view of white glass with scanner noise and two stained discs; returns (image, truth)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(240, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    truth = ((yy - 60) ** 2 + (xx - 70) ** 2 < 35**2) | ((yy - 140) ** 2 + (xx - 140) ** 2 < 25**2)
    stain = np.array([200, 110, 170]) + rng.normal(0, 10, (size, size, 3))
    img[truth] = np.clip(stain[truth], 0, 255).astype(np.uint8)
    img[5, 5] = (150, 40, 120)  # one saturated speck of dust on the glass
    return img, truth


def test_finds_tissue_and_not_glass() -> None:
    img, truth = _view()
    mask = tissue_mask(img)
    assert mask.shape == truth.shape and mask.dtype == bool
    assert mask[truth].mean() > 0.97  # nearly all tissue found
    assert mask[~truth].mean() < 0.01  # nearly no glass taken for tissue
    assert not mask[5, 5]  # the speck is blurred away


def test_blank_or_uniform_views_give_empty_masks() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(242, 5, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()  # Otsu alone would split the noise in two
    assert not tissue_mask(np.full((50, 50, 3), 255, np.uint8)).any()
    assert not tissue_mask(np.zeros((50, 50, 3), np.uint8)).any()  # black is not saturated either


def test_grey_background_with_faint_tissue_still_uses_otsu() -> None:
    img, truth = _view(seed=2)
    img[~truth] = 180  # darker, still unsaturated glass
    mask = tissue_mask(img, blur=0)
    assert mask[truth].mean() > 0.95 and mask[~truth].mean() < 0.01


def test_min_fraction_and_bad_input() -> None:
    img, _ = _view()
    assert not tissue_mask(img, min_fraction=0.9).any()
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(img.astype(np.float32))
    assert tissue_mask(img[:2, :2]).shape == (2, 2)


def test_otsu_threshold_separates_two_modes() -> None:
    values = np.concatenate([np.full(500, 20), np.full(300, 200)]).astype(np.uint8)
    t = otsu_threshold(values)
    assert 20 <= t < 200
    assert otsu_threshold(np.array([], np.uint8)) == 0


def test_opening_equals_pil_min_max_filters() -> None:
    """The numpy 3x3 opening gives PIL's MinFilter(3) then MaxFilter(3), edges included."""
    from PIL import Image, ImageFilter

    from wsiats.tissue import _open3

    rng = np.random.default_rng(0)
    for shape, p in (((3, 3), 0.8), ((5, 17), 0.7), ((64, 48), 0.6), ((40, 41), 0.9)):
        mask = rng.random(shape) < p
        img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
        np.testing.assert_array_equal(_open3(mask), np.asarray(img) > 0)


def test_median3_equals_pil_median_filter() -> None:
    """The numpy 3x3 median gives PIL's MedianFilter(3) exactly, edges and degenerate shapes included."""
    from PIL import Image, ImageFilter

    from wsiats.tissue import _median3

    rng = np.random.default_rng(1)
    for shape in ((1, 1), (1, 6), (2, 2), (3, 7), (17, 4), (64, 65)):
        for top in (2, 40, 256):  # few values (many ties), a saturation-like range, every byte
            values = rng.integers(0, top, shape).astype(np.uint8)
            want = np.asarray(Image.fromarray(values).filter(ImageFilter.MedianFilter(3)))
            np.testing.assert_array_equal(_median3(values), want)


@pytest.mark.parametrize("size", [200, 201])
def test_half_resolution_mask_of_a_large_view_matches_the_full_resolution_one(size: int) -> None:
    """Views above `half_above` pixels are thresholded at half resolution: same shape, ~the same mask."""
    img, truth = _view(size=size)
    full = tissue_mask(img, half_above=size * size)  # not above: full resolution
    half = tissue_mask(img, half_above=0)
    assert half.shape == full.shape == (size, size) and half.dtype == bool
    assert (half == full).mean() > 0.99
    assert half[truth].mean() > 0.97 and half[~truth].mean() < 0.01 and not half[5, 5]
