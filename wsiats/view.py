"""The low-resolution view of a slide and its geometry: what attention sampling looks at before it reads a patch.

`prepare_view` reads the view at the configured resolution and its tissue mask; `cell_centers` and
`patch_boxes` turn view cells into level-0 patch boxes; `Augment` flips and recolours a view and its
patches alike. The geometry convention: attention cell (r, c) of a view with downsample (dx, dy) is
centred on level-0 point ((c + 0.5) dx, (r + 0.5) dy), and its patch is the square of `patch_size`
pixels at `patch_downsample` centred there (see `wsiats.slide.patch_box`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wsiats import mil
from wsiats.config import Config
from wsiats.errors import SlideError
from wsiats.slide import Slide, collect_notes, note, open_slide, patch_box
from wsiats.tissue import COARSE_HALF_RESOLUTION_ABOVE, HALF_RESOLUTION_ABOVE, no_tissue_message, tissue_mask


@dataclass
class PreparedView:
    """The low-resolution view of one slide and everything derived from it."""

    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, True where sampling is allowed
    downsample: tuple[float, float]  # level-0 pixels per view pixel (x, y)
    fell_back: bool  # no tissue found: the whole view is allowed
    mpp: float | None = None  # the slide's level-0 microns per pixel (x), None when unknown
    mpp_source: str | None = None  # where that came from: "override", "openslide", a TIFF tag ...
    notes: list[str] = field(default_factory=list)  # warnings about this slide, each naming it
    explore: np.ndarray | None = None  # (h, w) float32 exploration distribution (`mil.exploration_prior`), training only


def _level0_per_pixel(slide: Slide, mpp: float | None, downsample: float, what: str) -> float:
    """Level-0 pixels per pixel of the view or patches: from an mpp (needs slide mpp) or as given."""
    if mpp is None:
        return downsample
    if slide.mpp is None:
        raise SlideError(slide.path, f"{what}_mpp is set but the slide has no mpp; pass --mpp or use --{what}-downsample")
    return mpp / slide.mpp[0]


def view_downsample(slide: Slide, cfg: Config) -> float:
    """The downsample of the view `prepare_view` reads: `view_mpp` or `view_downsample`, or with `nested` the
    coarse view's `coarse_downsample` (the fine view is then read only inside the picked regions)."""
    if getattr(cfg, "nested", False):
        return float(cfg.coarse_downsample)
    return _level0_per_pixel(slide, cfg.view_mpp, cfg.view_downsample, "view")


def patch_downsample(slide: Slide, cfg: Config) -> float:
    """Level-0 pixels per patch pixel from `patch_mpp` or `patch_downsample`."""
    return _level0_per_pixel(slide, cfg.patch_mpp, cfg.patch_downsample, "patch")


def prepare_view(slide: Slide, cfg: Config) -> PreparedView:
    """Read the view at the configured resolution (with `cfg.nested`, the coarse view) and compute its tissue mask."""
    view = slide.read_view(downsample=view_downsample(slide, cfg))
    h, w = view.image.shape[:2]
    if cfg.tissue_mask:
        mask = tissue_mask(view.image, half_above=COARSE_HALF_RESOLUTION_ABOVE if getattr(cfg, "nested", False)
                           else HALF_RESOLUTION_ABOVE)
    else:
        mask = np.ones((h, w), dtype=bool)
    fell_back = not mask.any()
    if fell_back:
        note(no_tissue_message(slide.path, view.image))
        mask = np.ones((h, w), dtype=bool)
    image = np.require(view.image, dtype=np.uint8, requirements=["C", "W"])  # torch wants writable arrays
    return PreparedView(image=image, mask=mask, downsample=view.downsample, fell_back=fell_back,
                        mpp=None if slide.mpp is None else slide.mpp[0], mpp_source=slide.mpp_source)


def load_view(path: Path, cfg: Config, *, backend: str = "auto", mpp: float | None = None) -> PreparedView:
    """Open a slide and prepare its view; the warnings about the slide travel in `view.notes` (safe in threads)."""
    with collect_notes() as notes:
        with open_slide(path, backend=backend, mpp=mpp) as slide:
            view = prepare_view(slide, cfg)
    view.notes = notes
    return view


def with_exploration(view: PreparedView, cfg: Config) -> bool:
    """Give a training view its exploration distribution when `cfg` trains with candidates; True if it was added."""
    if not cfg.candidates or view.explore is not None:
        return False
    view.explore = mil.exploration_prior(view.image, view.mask)
    return True


def cell_centers(indices: np.ndarray, view_shape: tuple[int, int], downsample: tuple[float, float]) -> np.ndarray:
    """Flat view-cell indices -> level-0 (x, y) centres, shape (n, 2) float64."""
    h, w = view_shape
    rows, cols = np.divmod(np.asarray(indices, dtype=np.int64), w)
    if (rows < 0).any() or (rows >= h).any():
        raise ValueError("cell index outside the view")
    return np.stack([(cols + 0.5) * downsample[0], (rows + 0.5) * downsample[1]], axis=1)


def patch_boxes(centers: np.ndarray, size: int, downsample: float) -> np.ndarray:
    """Level-0 boxes (n, 4) as x, y, width, height for patches centred on `centers`."""
    return np.array([patch_box((float(x), float(y)), size, downsample) for x, y in centers], dtype=np.int64).reshape(-1, 4)


@dataclass(frozen=True)
class Augment:
    """Per-slide augmentation, applied identically to the view and to its patches."""

    flip_h: bool = False
    flip_v: bool = False
    brightness: float = 0.0  # added, in [0, 1] units
    contrast: float = 1.0  # multiplied around 0.5

    @staticmethod
    def draw(generator: torch.Generator) -> Augment:
        u = torch.rand(4, generator=generator).tolist()
        # Ranges as in common H&E pipelines: +-0.1 brightness, 0.9-1.1 contrast.
        return Augment(u[0] < 0.5, u[1] < 0.5, (u[2] - 0.5) * 0.2, 0.9 + u[3] * 0.2)

    def is_identity(self) -> bool:
        return self == Augment()

    def maps(self, x: Tensor) -> Tensor:
        """Flip per-cell maps [..., H, W] (a tissue mask, an exploration distribution) as `images` flips the view."""
        dims = [d for d, on in ((-1, self.flip_h), (-2, self.flip_v)) if on]
        return torch.flip(x, dims) if dims else x

    def images(self, x: Tensor) -> Tensor:
        """Apply to uint8 images [..., 3, H, W]; returns uint8."""
        if self.is_identity():
            return x
        x = self.maps(x)
        if self.brightness != 0.0 or self.contrast != 1.0:
            y = x.float() / 255.0
            y = (y - 0.5) * self.contrast + 0.5 + self.brightness
            x = (y.clamp(0, 1) * 255.0).round().to(torch.uint8)
        return x

    def unflip(self, indices: np.ndarray, view_shape: tuple[int, int]) -> np.ndarray:
        """Indices in the augmented view -> indices in the original view."""
        h, w = view_shape
        rows, cols = np.divmod(np.asarray(indices, dtype=np.int64), w)
        if self.flip_h:
            cols = w - 1 - cols
        if self.flip_v:
            rows = h - 1 - rows
        return rows * w + cols

