"""Tissue mask of a low-resolution view: where sampling is allowed.

CLAM's convention (Lu et al. 2021): HSV saturation, median blur, Otsu threshold. Glass is
bright and unsaturated, stained tissue is saturated. Pure numpy + PIL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

#: Saturation (0-255) below which a pixel is never tissue: glass, dust and scanner noise stay under ~15.
MIN_SATURATION = 15


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of (<= t, > t)."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean0 = np.divide(m0, w0, out=np.zeros(256), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


#: Views with more pixels than this are thresholded at half resolution (`tissue_mask`).
HALF_RESOLUTION_ABOVE = 1 << 20
#: The same for the coarse view of nested sampling (`wsiats.view.prepare_view`), which grows with the slide's
#: area while the rest of nested predict does not: the mask of the 20-gigapixel benchmark slide's 552^2 coarse view
#: took 0.090 s, 0.012 s at half resolution, the two agreeing on 99.6% of the pixels (98.5% on the real
#: CMU-1-Small-Region.svs at downsample 4, 742 x 555, at tissue edges). bench_learning's coarse views (32^2) are under.
COARSE_HALF_RESOLUTION_ABOVE = 1 << 16


def tissue_mask(image: np.ndarray, *, min_saturation: int = MIN_SATURATION, blur: int = 7,
                min_fraction: float = 0.0, half_above: int = HALF_RESOLUTION_ABOVE) -> np.ndarray:
    """(h, w) bool mask, True on tissue, for an (h, w, 3) uint8 RGB view.

    Saturation is median-blurred with a `blur`-pixel window (odd; 0 or 1: none) and thresholded
    at max(Otsu, `min_saturation`), so a blank slide gives an all-False mask rather than Otsu
    splitting noise in two. A 3x3 opening then removes isolated specks, and if the tissue covers
    less than `min_fraction` of the view the mask is cleared.

    A view of more than `half_above` pixels is blurred and thresholded at half resolution (2x2 block
    means of the saturation, a median window of about blur / 2) and the result repeated back to full
    size before the opening: the median filter was the largest stage of predict on gigapixel slides
    (a 1536^2 view: ~6x faster; on three synthetic 1536^2 views the two masks agreed on 99.92-99.95% of
    the pixels, on the real CMU-1-Small-Region.svs at downsample 2 (1484 x 1110) on 98.4%, at tissue edges).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs an (h, w, 3) uint8 image, got {image.shape} {image.dtype}")
    sat_image = Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("HSV").getchannel(1)
    h, w = image.shape[:2]
    half = h * w > half_above and min(h, w) >= 2
    if half:
        sat_image = sat_image.reduce(2)
    if blur > 1:
        window = max(3, (blur // 2) | 1) if half else blur
        size = window if window % 2 else window + 1  # the median filter needs an odd window
        if size == 3:
            sat = _median3(np.asarray(sat_image))
        else:
            sat = np.asarray(sat_image.filter(ImageFilter.MedianFilter(size)))
    else:
        sat = np.asarray(sat_image)
    threshold = max(otsu_threshold(sat), int(min_saturation))
    mask = sat > threshold
    if half:
        mask = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[:h, :w]
        if mask.shape != (h, w):  # odd sides: PIL's reduce kept the partial last block, so this is only a guard
            mask = np.pad(mask, ((0, h - mask.shape[0]), (0, w - mask.shape[1])), mode="edge")
    if mask.shape[0] >= 3 and mask.shape[1] >= 3:
        mask = _open3(mask)
    if min_fraction > 0 and mask.mean() < min_fraction:
        mask[:] = False
    return mask


def _median3(values: np.ndarray) -> np.ndarray:
    """PIL's 3x3 `MedianFilter` of a uint8 image (edges replicated), the same pixels, from min / max of arrays.

    Each column of a window is sorted (lo, mid, hi); the median of the 9 values is the median of (the largest lo,
    the median of the mids, the smallest hi) of its three columns. On the half-resolution saturation of the
    20-gigapixel nested benchmark slide's coarse view (552^2) PIL took 5.1 ms, this 0.3 ms; on random bytes
    22 ms against 0.34 ms (PIL's rank filter slows with the spread of values)."""
    p = np.pad(values, 1, mode="edge")
    a, b, c = p[:-2], p[1:-1], p[2:]  # the three rows of every window, column by column
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    mid = np.maximum(lo, np.minimum(hi, c))
    lo, hi = np.minimum(lo, c), np.maximum(hi, c)
    lo = np.maximum(np.maximum(lo[:, :-2], lo[:, 1:-1]), lo[:, 2:])
    hi = np.minimum(np.minimum(hi[:, :-2], hi[:, 1:-1]), hi[:, 2:])
    mid = _median_of(mid[:, :-2], mid[:, 1:-1], mid[:, 2:])
    return _median_of(lo, mid, hi)


def _median_of(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Element-wise median of three arrays."""
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def _open3(mask: np.ndarray) -> np.ndarray:
    """Binary opening with a 3x3 square (erode, then dilate), edges replicated as PIL's rank
    filters do; separable AND/OR of shifted rows and columns (10x faster than PIL's Min/MaxFilter)."""
    return _filter3(_filter3(mask, np.logical_and), np.logical_or)


def _filter3(mask: np.ndarray, op: np.ufunc) -> np.ndarray:
    """op (AND: erosion, OR: dilation) over each 3x3 neighbourhood, edge pixels replicated."""
    p = np.pad(mask, 1, mode="edge")
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return op(op(rows[:-2], rows[1:-1]), rows[2:])


#: A view whose channels all stay within this many grey levels is blank (an empty, white or black scan).
BLANK_SPREAD = 8


def no_tissue_message(path: object, image: np.ndarray) -> str:
    """The warning for a view without tissue (sampling then falls back to the whole view), naming the slide."""
    flat = np.asarray(image).reshape(-1, np.asarray(image).shape[-1])
    blank = ""
    if flat.size and int((flat.max(0).astype(np.int16) - flat.min(0)).max()) <= BLANK_SPREAD:
        rgb = ", ".join(str(int(round(v))) for v in flat.mean(0))
        blank = f" (the view is blank, every pixel about RGB {rgb})"
    return f"{path}: no tissue found in the view{blank}; sampling from the whole slide"
