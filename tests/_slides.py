"""Generate small whole-slide images with tifffile, from an RGB image held in memory.

Every writer returns what a test needs to check a reader against the truth: the arrays
written for each pyramid level (so a lazy read can be compared with a crop in memory).
Layouts covered: a generic tiled pyramid in the main IFD chain, an OME-TIFF pyramid in
SubIFDs, an Aperio-SVS-like file with a thumbnail, label and macro, a single-level stripped
TIFF, non-RGB images (grayscale, 16-bit) and a sparse 10-gigapixel pyramid that is small on
disk. Also helpers that break files on purpose (truncation, patched tags, a bad tile).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

#: Tissue-like colours (H&E pink and purple) used by the synthetic images.
_PINK = (230, 150, 190)
_PURPLE = (120, 60, 150)


@dataclass(frozen=True)
class Generated:
    """A generated slide file, the arrays written for its levels, and its mpp."""

    path: Path
    levels: list[np.ndarray]
    mpp: float | None


def tissue_image(height: int, width: int, *, seed: int = 0, n_blobs: int = 6) -> np.ndarray:
    """An RGB uint8 image: white glass with a few textured pink/purple blobs (fine detail included)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 245, dtype=np.float32)
    for i in range(n_blobs):
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.06, 0.18) * height, rng.uniform(0.06, 0.18) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img[inside] = _PINK if i % 2 == 0 else _PURPLE
    # high-frequency texture so that levels and offsets are distinguishable pixel by pixel
    img += rng.normal(0.0, 12.0, size=(height, width, 1)).astype(np.float32)
    img += (8.0 * np.sin(xx / 3.0) * np.cos(yy / 5.0))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Reduce by an integer factor with PIL's box filter (the reference for pyramid levels)."""
    h, w = image.shape[:2]
    size = (max(1, w // factor), max(1, h // factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level i is `image` reduced by 2**i (sizes floor(W / 2**i), like common writers)."""
    out = [image]
    for _ in range(1, n_levels):
        out.append(area_downsample(out[-1], 2))
    return out


def _resolution(mpp: float | None) -> dict[str, object]:
    if mpp is None:
        return {}
    # pixels per centimetre: 1 cm = 1e4 um
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def write_generic_pyramid(
    path: Path, image: np.ndarray, *, n_levels: int = 3, tile: int = 128, compression: str = "zlib",
    mpp: float | None = 0.25,
) -> list[np.ndarray]:
    """Tiled pyramid with every level in the main IFD chain (OpenSlide's generic-tiff layout)."""
    levels = pyramid(image, n_levels)
    with tifffile.TiffWriter(path, shaped=False) as tw:
        for i, lev in enumerate(levels):
            tw.write(lev, photometric="rgb", tile=(tile, tile), compression=compression,
                     subfiletype=1 if i else 0, **_resolution(mpp))  # type: ignore[arg-type]
    return levels


def write_ome_subifds(path: Path, image: np.ndarray, *, n_levels: int = 3, tile: int = 128,
                      mpp: float = 0.5) -> list[np.ndarray]:
    """OME-TIFF with the reduced levels stored as SubIFDs of the full-resolution page."""
    levels = pyramid(image, n_levels)
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], photometric="rgb", tile=(tile, tile), compression="zlib", subifds=n_levels - 1,
                 metadata=meta)
        for lev in levels[1:]:
            tw.write(lev, photometric="rgb", tile=(tile, tile), compression="zlib", subfiletype=1)
    return levels


def write_svs_like(path: Path, image: np.ndarray, *, n_levels: int = 3, tile: int = 128, mpp: float = 0.25,
                   label: bool = True) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Aperio layout: level 0, a stripped thumbnail, reduced levels (downsample 4), label and macro.

    Returns {"levels": [...], "thumbnail": ..., "label": ..., "macro": ...}.
    """
    h, w = image.shape[:2]
    levels = [image]
    for _ in range(1, n_levels):
        levels.append(area_downsample(levels[-1], 4))
    thumb = area_downsample(image, 8)
    label_img = np.zeros((64, 48, 3), np.uint8)
    label_img[:, :, 1] = 200
    macro_img = np.zeros((40, 120, 3), np.uint8)
    macro_img[:, :, 2] = 180
    head = "Aperio Image Library v12.0.0 \r\n"
    desc0 = f"{head}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp:.4f}"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 95}}
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(levels[0], photometric="rgb", tile=(tile, tile), description=desc0, **jpeg)  # type: ignore[arg-type]
        tw.write(thumb, photometric="rgb", rowsperstrip=16,
                 description=f"{head}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}", **jpeg)  # type: ignore[arg-type]
        for lev in levels[1:]:
            lh, lw = lev.shape[:2]
            tw.write(lev, photometric="rgb", tile=(tile, tile), description=f"{head}{w}x{h} -> {lw}x{lh}",
                     **jpeg)  # type: ignore[arg-type]
        if label:
            tw.write(label_img, photometric="rgb", rowsperstrip=64, compression="lzw", subfiletype=1,
                     description=f"{head}label 48x64")
        tw.write(macro_img, photometric="rgb", rowsperstrip=40, subfiletype=9, description=f"{head}macro 120x40",
                 **jpeg)  # type: ignore[arg-type]
    return {"levels": levels, "thumbnail": thumb, "label": label_img, "macro": macro_img}


def write_svs_fractional(path: Path, *, size: tuple[int, int] = (2001, 1601), tile: int = 128) -> list[np.ndarray]:
    """An Aperio-like SVS whose level 1 has a downsample that is not whole (2001 x 1601 -> 1000 x 800:
    2.001125, as scanners round level sizes), lossless, over a 2-px checkerboard so that level 1 holds
    1-px detail: any interpolation between its pixels shows."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    on = ((yy // 2 + xx // 2) % 2).astype(bool)
    level0 = np.where(on[..., None], np.array([90, 40, 130], np.uint8), np.array([245, 230, 240], np.uint8))
    level1 = np.asarray(Image.fromarray(level0).resize((w // 2, h // 2), Image.Resampling.BOX))
    head = "Aperio Image Library v12.0.0 \r\n"
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(level0, photometric="rgb", tile=(tile, tile), compression="zlib",
                 description=f"{head}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 20|MPP = 0.2500")
        thumb = area_downsample(level0, 16)
        tw.write(thumb, photometric="rgb", rowsperstrip=16, compression="zlib",
                 description=f"{head}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}")
        tw.write(level1, photometric="rgb", tile=(tile, tile), compression="zlib",
                 description=f"{head}{w}x{h} -> {w // 2}x{h // 2}")
    return [level0, level1]


def write_strips(path: Path, image: np.ndarray, *, mpp: float | None = 0.5, rowsperstrip: int = 32) -> None:
    """Single-level, stripped (not tiled) RGB TIFF: the path that must be read in chunks."""
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(image, photometric="rgb", rowsperstrip=rowsperstrip, compression="zlib",
                 **_resolution(mpp))  # type: ignore[arg-type]


def write_planar(path: Path, image: np.ndarray, *, tile: int = 64) -> None:
    """Tiled RGB with separate sample planes (PlanarConfiguration 2)."""
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate", tile=(tile, tile),
                 compression="zlib")


def write_rgba(path: Path, *, premultiplied: bool, size: int = 32) -> np.ndarray:
    """Tiled RGBA with associated (premultiplied) or unassociated alpha; returns the array written."""
    img = np.zeros((size, size, 4), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 100, 20, 0
    img[..., 3] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]  # transparent to opaque, left to right
    if premultiplied:
        img[..., :3] = (img[..., :3].astype(np.uint16) * img[..., 3:4] // 255).astype(np.uint8)
    tifffile.imwrite(path, img, photometric="rgb", extrasamples=["assocalpha" if premultiplied else "unassalpha"],
                     tile=(16, 16))
    return img


def write_gray(path: Path, *, size: int = 64) -> None:
    tifffile.imwrite(path, np.full((size, size), 128, np.uint8), photometric="minisblack", tile=(16, 16))


def write_uint16(path: Path, *, size: int = 64) -> None:
    tifffile.imwrite(path, np.full((size, size), 1000, np.uint16), photometric="minisblack", tile=(16, 16))


def write_rgb16(path: Path, *, size: int = 32) -> None:
    tifffile.imwrite(path, np.full((size, size, 3), 1000, np.uint16), photometric="rgb", tile=(16, 16))


# --- the sparse 10-gigapixel slide -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseSlide:
    """Truth for `write_sparse_huge`: a level-0 pixel (x, y) is `color` where
    `blocks[y // block, x // block]` is True, and white glass (an empty tile) elsewhere."""

    path: Path
    size: int
    block: int
    blocks: np.ndarray
    color: tuple[int, int, int]
    level_dimensions: tuple[tuple[int, int], ...]

    def truth(self, x0: int, y0: int, w: int, h: int, step: int = 1) -> np.ndarray:
        """Expected RGB of the level-0 box sampled every `step` pixels (outside the slide: white)."""
        xs = x0 + step * np.arange(w)
        ys = y0 + step * np.arange(h)
        inside_x = (xs >= 0) & (xs < self.size)
        inside_y = (ys >= 0) & (ys < self.size)
        bx = np.clip(xs // self.block, 0, self.blocks.shape[1] - 1)
        by = np.clip(ys // self.block, 0, self.blocks.shape[0] - 1)
        on = self.blocks[by][:, bx] & inside_y[:, None] & inside_x[None, :]
        out = np.full((h, w, 3), 255, np.uint8)
        out[on] = self.color
        return out


def write_sparse_huge(path: Path, *, size: int = 100_000, tile: int = 256, block: int = 4096,
                      color: tuple[int, int, int] = _PURPLE, seed: int = 0, tissue_fraction: float | None = None,
                      texture: int = 0) -> SparseSlide:
    """A `size` x `size` pyramid (factor 2 down to < 1024 px) where only a few blocks hold pixels.

    Tiles that fall entirely on glass are written as empty tiles (byte count 0), which tifffile
    supports by yielding None from the tile iterator; readers render them as background. Every
    tissue tile is one flat colour, so each level equals the area-downsampled level 0 exactly
    (up to JPEG rounding) and the file stays a few megabytes.

    `tissue_fraction` (benchmarks): that share of the blocks, drawn without replacement, holds tissue;
    `texture` > 0 adds seeded uniform noise of that amplitude to the tissue tile, so that it costs to
    decode about what a real tissue tile does (`truth` then gives the noiseless colour).
    """
    rng = np.random.default_rng(seed)
    nb = -(-size // block)
    blocks = np.zeros((nb, nb), bool)
    # a few tissue blocks: about 1% of the area, enough for a tissue mask and tissue-hitting patches
    if tissue_fraction is None:
        for by, bx in rng.integers(0, nb, size=(max(2, nb * nb // 100), 2)):
            blocks[by, bx] = True
    else:
        blocks.flat[rng.choice(nb * nb, size=max(1, round(nb * nb * tissue_fraction)), replace=False)] = True
    dims: list[tuple[int, int]] = []
    s = size
    while True:
        dims.append((s, s))
        if s < 1024:
            break
        s //= 2
    flat = np.empty((tile, tile, 3), np.uint8)
    flat[:] = color
    if texture:
        noise = rng.integers(-texture, texture + 1, size=flat.shape)
        flat = np.clip(flat.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    white = np.full((tile, tile, 3), 255, np.uint8)

    def tiles(level: int, w: int, h: int):  # type: ignore[no-untyped-def]
        ds = 2**level
        span = tile * ds  # level-0 pixels covered by one tile
        for ty in range(-(-h // tile)):
            for tx in range(-(-w // tile)):
                y0, x0 = ty * span, tx * span
                b = blocks[y0 // block: (y0 + span - 1) // block + 1, x0 // block: (x0 + span - 1) // block + 1]
                if not b.any():
                    # tifffile reads the dtype from the first item, so the first tile is written white
                    yield white if tx == ty == 0 else None
                elif b.all() and span <= block:
                    yield flat
                else:  # tile spans several blocks (coarse levels): nearest-block map per pixel
                    ys = np.minimum((y0 + ds * np.arange(tile) + ds // 2) // block, nb - 1)
                    xs = np.minimum((x0 + ds * np.arange(tile) + ds // 2) // block, nb - 1)
                    t = np.full((tile, tile, 3), 255, np.uint8)
                    t[blocks[ys][:, xs]] = color
                    yield t

    with tifffile.TiffWriter(path, bigtiff=True, shaped=False) as tw:
        for i, (w, h) in enumerate(dims):
            tw.write(tiles(i, w, h), shape=(h, w, 3), dtype=np.uint8, photometric="rgb", tile=(tile, tile),
                     compression="jpeg", compressionargs={"level": 90}, subfiletype=1 if i else 0,
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER", maxworkers=1)
    return SparseSlide(path=path, size=size, block=block, blocks=blocks, color=color, level_dimensions=tuple(dims))


def write_empty_huge(path: Path, *, size: int = 200_000, tile: int = 2048) -> None:
    """One level of `size` x `size` px whose tiles are all empty but the first: a small file whose header
    claims a huge image, without a pyramid to read a view or a coarse patch from."""
    first = np.full((tile, tile, 3), 255, np.uint8)
    n = (-(-size // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True, shaped=False) as tw:
        tw.write((first if i == 0 else None for i in range(n)), shape=(size, size, 3), dtype=np.uint8,
                 photometric="rgb", tile=(tile, tile), compression="zlib", maxworkers=1)


# --- breaking files on purpose -----------------------------------------------------------------------------------


def truncate(src: Path, dst: Path, *, keep: float = 0.6) -> None:
    """Copy the first `keep` fraction of `src` to `dst` (a download cut short)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])


def patch_tag(path: Path, code: int, value: int, *, page: int = 0) -> None:
    """Overwrite the value of a SHORT/LONG tag of one page in place (classic or BigTIFF)."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[code]  # type: ignore[union-attr]
        offset, dtype, byteorder = tag.valueoffset, tag.dtype, tif.byteorder
    fmt = {3: "H", 4: "I", 16: "Q"}[int(dtype)]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(struct.pack(byteorder + fmt, value))


def corrupt_tile(path: Path, *, page: int = 0, index: int = 0) -> tuple[int, int]:
    """Overwrite the bytes of one tile with garbage of the same length; returns its (offset, bytecount)."""
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        offset, count = int(p.dataoffsets[index]), int(p.databytecounts[index])  # type: ignore[union-attr]
    rng = np.random.default_rng(1)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(rng.integers(0, 256, count, dtype=np.uint8).tobytes())
    return offset, count


def crop(image: np.ndarray, x: int, y: int, w: int, h: int, fill: int = 255) -> np.ndarray:
    """The (h, w) window of `image` at (x, y), `fill` outside it: what a lazy read must return."""
    out = np.full((h, w, 3), fill, np.uint8)
    H, W = image.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y: y1 - y, x0 - x: x1 - x] = image[y0:y1, x0:x1]
    return out
