"""Where the forward pass gets its patches: the `PatchReader` interface and its two readers over slide files.

The pass (`wsiats.forward.forward_batch`, the nested pass) never opens a file: it asks a reader for the
pixels of the cells it sampled. `SlidePool` keeps recently used slides open (training, validation);
`OpenedSlide` reads from the one handle the caller opened for the view (predict, heatmap: each slide is
opened once). A test can hand the pass any object with these three methods, e.g. crops of an array.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from wsiats.config import Config
from wsiats.slide import Slide, collect_notes, open_slide
from wsiats.view import patch_downsample


class PatchReader(Protocol):
    """The patches of slides, by level-0 centre: what the forward pass reads through."""

    def patch_downsample(self, path: Path, cfg: Config) -> float:
        """Level-0 pixels per patch pixel of the slide at `path` (`cfg.patch_mpp` needs the slide's mpp)."""
        ...

    def read(self, path: Path, centers: np.ndarray, size: int, *, downsample: float,
             workers: int | None = None) -> np.ndarray:
        """uint8 [n, size, size, 3]: the squares of `size` pixels at `downsample` centred on `centers` [n, 2]."""
        ...

    def read_groups(self, path: Path, centers: np.ndarray, groups: np.ndarray, size: int, *, downsample: float,
                    workers: int | None = None) -> np.ndarray:
        """`read`, for patches that come in groups (`groups` [n]: the group of each; the nested pass's
        regions): a backend may read each group's bounding box at once."""
        ...


class SlidePool:
    """A `PatchReader` that keeps recently used slides open (an LRU), so patch reads do not reopen files."""

    def __init__(self, *, capacity: int = 32, backend: str = "auto", mpp: float | None = None) -> None:
        self.capacity = capacity
        self.backend = backend
        self.mpp = mpp
        self._open: OrderedDict[Path, Slide] = OrderedDict()

    def get(self, path: Path) -> Slide:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        with collect_notes():  # what there is to say about the slide was said when its view was prepared
            slide = open_slide(path, backend=self.backend, mpp=self.mpp)
        self._open[path] = slide
        while len(self._open) > self.capacity:
            _, old = self._open.popitem(last=False)
            old.close()
        return slide

    def patch_downsample(self, path: Path, cfg: Config) -> float:
        return patch_downsample(self.get(path), cfg)

    def read(self, path: Path, centers: np.ndarray, size: int, *, downsample: float,
             workers: int | None = None) -> np.ndarray:
        return self.get(path).read_patches(centers, size, downsample=downsample, workers=workers)

    def read_groups(self, path: Path, centers: np.ndarray, groups: np.ndarray, size: int, *, downsample: float,
                    workers: int | None = None) -> np.ndarray:
        return self.get(path).read_patch_groups(centers, groups, size, downsample=downsample, workers=workers)

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


class OpenedSlide(SlidePool):
    """The reader of a slide the caller opened for its view: every read comes from that handle (the caller closes it)."""

    def __init__(self, slide: Slide) -> None:
        super().__init__(capacity=1)
        self._slide = slide

    def get(self, path: Path) -> Slide:
        return self._slide
