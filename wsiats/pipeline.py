"""One forward pass of attention sampling over a batch of slides.

view -> attention -> sample -> read the sampled patches lazily -> features -> expectation ->
logits. The geometry convention: attention cell (r, c) of a view with downsample (dx, dy) is
centred on level-0 point ((c + 0.5) dx, (r + 0.5) dy), and its patch is the square of
`patch_size` pixels at `patch_downsample` centred there (see `wsiats.slide.patch_box`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsiats import sampling
from wsiats.config import Config
from wsiats.embed_cache import embed_patches, patch_keys
from wsiats.errors import ConfigError, SlideError
from wsiats.models import ATSModel
from wsiats.slide import Slide, open_slide, patch_box
from wsiats.tissue import tissue_mask


@dataclass
class PreparedView:
    """The low-resolution view of one slide and everything derived from it."""

    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool, True where sampling is allowed
    downsample: tuple[float, float]  # level-0 pixels per view pixel (x, y)
    fell_back: bool  # no tissue found: the whole view is allowed


def _level0_per_pixel(slide: Slide, mpp: float | None, downsample: float, what: str) -> float:
    """Level-0 pixels per pixel of the view or patches: from an mpp (needs slide mpp) or as given."""
    if mpp is None:
        return downsample
    if slide.mpp is None:
        raise SlideError(slide.path, f"{what}_mpp is set but the slide has no mpp; pass --mpp or use --{what}-downsample")
    return mpp / slide.mpp[0]


def view_downsample(slide: Slide, cfg: Config) -> float:
    """The view's downsample from `view_mpp` or `view_downsample`."""
    return _level0_per_pixel(slide, cfg.view_mpp, cfg.view_downsample, "view")


def patch_downsample(slide: Slide, cfg: Config) -> float:
    """Level-0 pixels per patch pixel from `patch_mpp` or `patch_downsample`."""
    return _level0_per_pixel(slide, cfg.patch_mpp, cfg.patch_downsample, "patch")


def prepare_view(slide: Slide, cfg: Config) -> PreparedView:
    """Read the view at the configured resolution and compute its tissue mask."""
    view = slide.read_view(downsample=view_downsample(slide, cfg))
    h, w = view.image.shape[:2]
    if cfg.tissue_mask:
        mask = tissue_mask(view.image)
    else:
        mask = np.ones((h, w), dtype=bool)
    fell_back = not mask.any()
    if fell_back:
        warnings.warn(f"{slide.path}: no tissue found in the view; sampling from the whole slide", stacklevel=2)
        mask = np.ones((h, w), dtype=bool)
    image = np.require(view.image, dtype=np.uint8, requirements=["C", "W"])  # torch wants writable arrays
    return PreparedView(image=image, mask=mask, downsample=view.downsample, fell_back=fell_back)


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

    def images(self, x: Tensor) -> Tensor:
        """Apply to uint8 images [..., 3, H, W]; returns uint8."""
        if self.is_identity():
            return x
        dims = [d for d, on in ((-1, self.flip_h), (-2, self.flip_v)) if on]
        if dims:
            x = torch.flip(x, dims)
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


@dataclass
class SlideBatchItem:
    """What the forward pass needs of one slide."""

    slide_path: Path
    view: PreparedView
    augment: Augment = Augment()


@dataclass
class ForwardResult:
    """Outputs of one pass; per-slide lists where shapes differ between slides."""

    logits: Tensor  # [B, C]
    attention: list[Tensor]  # per slide, [h*w] attention over the (augmented) view
    indices: list[np.ndarray]  # per slide, sampled cells in the ORIGINAL view, sampled order
    sampled_attention: list[Tensor]  # per slide, [n]
    weights: list[Tensor]  # per slide, [n]: coefficient of each patch's features in the estimate
    boxes: list[np.ndarray]  # per slide, [n, 4] level-0 x, y, w, h
    entropy: Tensor  # [B]


class SlidePool:
    """Keeps recently used slides open (an LRU), so patch reads do not reopen files."""

    def __init__(self, *, capacity: int = 32, backend: str = "auto", mpp: float | None = None) -> None:
        self.capacity = capacity
        self.backend = backend
        self.mpp = mpp
        self._open: OrderedDict[Path, Slide] = OrderedDict()

    def get(self, path: Path) -> Slide:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        slide = open_slide(path, backend=self.backend, mpp=self.mpp)
        self._open[path] = slide
        while len(self._open) > self.capacity:
            _, old = self._open.popitem(last=False)
            old.close()
        return slide

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()


def forward_batch(
    model: ATSModel,
    items: Sequence[SlideBatchItem],
    *,
    cfg: Config,
    pool: SlidePool,
    mode: str = "sample",
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    workers: int | None = None,
    autocast: Callable[[], object] | None = None,
) -> ForwardResult:
    """Run view -> attention -> sample -> read -> features -> expectation -> logits.

    mode: 'sample' (the estimator; gradients unbiased) or 'topk' (deterministic: the n
    highest-attention cells, combined with the without-replacement formula).
    """
    if mode not in ("sample", "topk"):
        raise ValueError(f"mode must be 'sample' or 'topk', got {mode!r}")
    device = device or next(model.parameters()).device
    use_cuda = device.type == "cuda"
    ctx = autocast or _null_context
    attentions, indices, sampled, boxes, patches, keys = [], [], [], [], [], []
    counts: list[int] = []
    for item in items:
        view = item.view
        h, w = view.image.shape[:2]
        image = torch.from_numpy(view.image).permute(2, 0, 1)
        image = item.augment.images(image)
        mask = torch.from_numpy(view.mask)
        if item.augment.flip_h:
            mask = torch.flip(mask, [1])
        if item.augment.flip_v:
            mask = torch.flip(mask, [0])
        mask = mask.reshape(1, -1).to(device)
        if cfg.attention == "uniform":
            att = sampling.uniform_attention(mask, mask.shape).to(device)
        else:
            with ctx():
                logits = model.attention_net(image[None].to(device, non_blocking=use_cuda))
            att = sampling.smooth_attention(logits.float(), mask=mask, eps=cfg.attention_eps)
        n = min(cfg.n_patches, int((att > 0).sum()))
        if mode == "topk":
            idx, a_k = sampling.topk(att, n)
        else:
            idx, a_k = sampling.sample(att, n, cfg.replace, generator=generator)
        idx_np = item.augment.unflip(idx[0].cpu().numpy(), (h, w))
        slide = pool.get(item.slide_path)
        size, pds = cfg.patch_size, patch_downsample(slide, cfg)
        centers = cell_centers(idx_np, (h, w), view.downsample)
        pixels = slide.read_patches(centers, size, downsample=pds, workers=workers)
        tiles = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        patches.append(item.augment.images(tiles))
        keys.extend(patch_keys(item.slide_path, idx_np, view.downsample, size, pds, item.augment))
        attentions.append(att[0])
        indices.append(idx_np)
        sampled.append(a_k[0])
        boxes.append(patch_boxes(centers, size, pds))
        counts.append(n)
    feats = embed_patches(model, torch.cat(patches), keys, device=device, autocast=ctx)
    pooled, weights = [], []
    start = 0
    replace = cfg.replace and mode == "sample"
    for a_k, n in zip(sampled, counts):
        f = feats[start : start + n][None]
        start += n
        if mode == "topk":
            pooled.append(sampling.estimate_topk(a_k[None], f)[0])
        else:
            pooled.append(sampling.expectation(a_k[None], f, replace)[0])
        weights.append(sampling.estimate_weights(a_k[None], replace)[0])
    logits = model.classifier(torch.stack(pooled))
    entropy = torch.stack([sampling.entropy(a[None])[0] for a in attentions])
    return ForwardResult(logits, attentions, indices, sampled, weights, boxes, entropy)


def _null_context() -> object:
    import contextlib

    return contextlib.nullcontext()


def attention_map(model: ATSModel, view: PreparedView, cfg: Config, *, device: torch.device | None = None) -> np.ndarray:
    """The full attention distribution over the view, shape (h, w), zero outside the mask."""
    device = device or next(model.parameters()).device
    h, w = view.image.shape[:2]
    mask = torch.from_numpy(view.mask).reshape(1, -1).to(device)
    if cfg.attention == "uniform":
        att = sampling.uniform_attention(mask, mask.shape)
    else:
        image = torch.from_numpy(view.image).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            att = sampling.smooth_attention(model.attention_net(image).float(), mask=mask, eps=cfg.attention_eps)
    return att.reshape(h, w).cpu().numpy()


def class_weights(labels: Sequence[int], n_classes: int) -> Tensor:
    """Inverse-frequency class weights, normalised to mean 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise ConfigError("every class needs at least one training slide for class weighting")
    weights = counts.sum() / (n_classes * counts)
    return torch.tensor(weights, dtype=torch.float32)


def loss_fn(result: ForwardResult, targets: Tensor, *, cfg: Config, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cross-entropy minus entropy_weight * attention entropy. Returns (loss, ce)."""
    ce = F.cross_entropy(result.logits, targets, weight=weight)
    return ce - cfg.entropy_weight * result.entropy.mean(), ce


class ATSForward(torch.nn.Module):
    """`forward_batch` as a module, so that DistributedDataParallel can wrap the whole pass."""

    def __init__(self, model: ATSModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: Sequence[SlideBatchItem], **kwargs: object) -> ForwardResult:
        return forward_batch(self.model, items, **kwargs)  # type: ignore[arg-type]
