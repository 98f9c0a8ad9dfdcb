"""The OpenSlide backend of `wsiats.slide` (openslide-python with the openslide-bin library): NDPI, MRXS,
SCN, BIF, DICOM and the other formats OpenSlide reads."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from wsiats._base import _LEVEL_TOLERANCE, Slide, _check_side, _check_tile_bytes, _composite, _exc_text
from wsiats.errors import CorruptSlideError, SlideError, UnsupportedSlideError


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
                tw, th = (_float(self.properties.get(f"openslide.level[{i}].tile-{k}")) for k in ("width", "height"))
                if tw and th:  # OpenSlide decodes whole tiles, as ARGB
                    _check_tile_bytes(path, i, "tiles", int(tw), int(th), int(tw * th * 4))
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

    def _patch_level(self, downsample: float) -> int:
        """The coarsest level <= `downsample` whose downsample is whole. OpenSlide reads a level at level-0
        coordinates divided by its downsample, so at a level whose downsample is not whole (an SVS level at
        2.000506) every read that does not start at the origin lands between pixels and is blended: up to
        37 grey levels off the stored pixels. Patches come from a level OpenSlide addresses exactly, on its
        own grid (level 0 at worst), resized once, as the tifffile backend does."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if abs(ds - round(ds)) < 1e-9 and self.level_downsamples[best] < ds <= downsample * (1 + _LEVEL_TOLERANCE):
                best = i
        return best

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

