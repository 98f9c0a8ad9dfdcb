"""One forward pass of attention sampling over a batch of slides.

view -> attention -> sample -> patches from a `wsiats.reader.PatchReader` -> features -> expectation ->
logits. The pass opens no file: the reader it is given serves the sampled cells' patches. The view's
geometry (cells, patch boxes, augmentation) is `wsiats.view`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from wsiats import mil, sampling
from wsiats.config import Config
from wsiats.embed_cache import PatchKey, embed_patches, patch_keys
from wsiats.models import ATSModel, AttentionNet, OnTissue
from wsiats.reader import PatchReader
from wsiats.view import Augment, PreparedView, cell_centers, patch_boxes


@dataclass
class SlideBatchItem:
    """What the forward pass needs of one slide."""

    slide_path: Path
    view: PreparedView
    augment: Augment = field(default_factory=Augment)


@dataclass
class ForwardResult:
    """Outputs of one pass; per-slide lists where shapes differ between slides."""

    logits: Tensor  # [B, C]
    attention: list[Tensor]  # per slide, [h*w] attention over the (augmented) view
    indices: list[np.ndarray]  # per slide, sampled cells in the ORIGINAL view, sampled order
    sampled_attention: list[Tensor]  # per slide, [n]
    weights: list[Tensor]  # per slide, [n]: coefficient of each patch's features in the pooled vector
    boxes: list[np.ndarray]  # per slide, [n, 4] level-0 x, y, w, h
    entropy_of: Callable[[], Tensor]  # computes `entropy` on its first use: predict never needs it
    distill: Tensor | None = None  # [B] view-attention distillation losses (gated pooling, training), or None
    nested: list[Any] | None = None  # per slide, `wsiats.nested_pass.NestedPicks` (both levels), with cfg.nested
    features: list[Tensor] | None = None  # per slide, [n, D] features of the pooled patches (gated pooling), with gradient

    @functools.cached_property
    def entropy(self) -> Tensor:
        """[B] entropy of each slide's attention over its view (nested: of a = a1 a2), with gradient in training;
        on a 1438^2 view it costs 5 ms, so inference that does not ask for it does not pay."""
        return self.entropy_of()


def forward_batch(
    model: ATSModel,
    items: Sequence[SlideBatchItem],
    *,
    cfg: Config,
    reader: PatchReader,
    mode: str = "sample",
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    workers: int | None = None,
    autocast: Callable[[], object] | None = None,
) -> ForwardResult:
    """Run view -> attention -> sample -> read -> features -> pooling -> logits, the patches read by `reader`.

    mode:
    - 'sample': N cells drawn from the attention (`cfg.replace`); with `cfg.pooling` 'ats' the
      estimator whose gradients are unbiased, with 'gated' gated attention MIL over the N patches;
    - 'topk': deterministic, the N highest-attention cells;
    - with gated pooling and `cfg.zoom` > 0, 'sample' and 'topk' take only N - round(zoom N) cells
      that way, kept apart (`spread_cells`: distinct places before more of one place), and the rest
      around the cell whose patch has the highest instance score (`zoom_cells`): still N patches a
      slide, but a lone informative region gets about half of them;
    - 'explore' (training, `cfg.candidates` > 0, gated pooling): `cfg.candidates` cells drawn
      without replacement from q = (1 - explore) a + explore u (u: `PreparedView.explore`, equal mass
      per colour group, or uniform), the distinct ones (`mil.distinct_patches`: a patch identical to
      an earlier one, such as empty background, is dropped) embedded without gradient, and T = max(N,
      `cfg.train_patches`) embedded again with gradient and pooled: the T - round(`cfg.select_random` T)
      with the highest instance scores and the rest drawn at random from the other candidates.
    With gated pooling the attention network learns from `ForwardResult.distill`, the cross-entropy
    of the attention over the embedded patches against the `train_patches // 4` with the highest
    instance scores (N/2 of the N when training without candidates).
    """
    if mode not in ("sample", "topk", "explore"):
        raise ValueError(f"mode must be 'sample', 'topk' or 'explore', got {mode!r}")
    if cfg.nested:
        from wsiats.nested_pass import forward_nested

        return forward_nested(model, items, cfg=cfg, reader=reader, mode=mode, generator=generator, device=device,
                              workers=workers, autocast=autocast)
    gated = model.mil is not None
    if mode == "explore" and not gated:
        raise ValueError("mode 'explore' needs a model with gated pooling")
    device = device or next(model.parameters()).device
    ctx = cast(Callable[[], AbstractContextManager[Any]], autocast or _null_context)
    attentions, indices, sampled, boxes, patches, distill = [], [], [], [], [], []
    keys: list[PatchKey] = []
    counts: list[int] = []
    # features already final per slide (zoomed inference embeds its first n1 patches to choose where to zoom)
    done: list[Tensor | None] = []
    inference = not torch.is_grad_enabled() and not model.feature_net.training
    for item in items:
        view = item.view
        h, w = view.image.shape[:2]
        net: torch.nn.Module | None = model.attention_net
        if isinstance(net, AttentionNet) and not torch.is_grad_enabled():  # inference: the logits on tissue tiles only
            net = OnTissue(model.attention_net, item.augment.maps(torch.from_numpy(view.mask)))
        mask, att = view_attention(net, item, cfg, device=device, autocast=ctx)
        n = min(cfg.n_patches, int((att > 0).sum(dtype=torch.int32)))  # int32: 2.5x faster than int64 sums
        size, pds = cfg.patch_size, reader.patch_downsample(item.slide_path, cfg)

        def read(cells: Tensor) -> tuple[np.ndarray, np.ndarray, Tensor]:
            """Cells of the augmented view -> (original-view indices, level-0 centres, augmented uint8 patches)."""
            orig = item.augment.unflip(cells.cpu().numpy(), (h, w))
            centers = cell_centers(orig, (h, w), view.downsample)
            pixels = reader.read(item.slide_path, centers, size, downsample=pds, workers=workers)
            return orig, centers, item.augment.images(torch.from_numpy(pixels).permute(0, 3, 1, 2))

        first: Tensor | None = None
        if mode == "explore":
            q = mil.exploration_mixture(att.detach(), mask, cfg.explore, explore=explore_distribution(item, device))
            m = min(int(cfg.candidates or 0), int((q > 0).sum()))
            cand, _ = sampling.sample(q, max(m, n), False, generator=generator)
            orig, centers, tiles = read(cand[0])
            distinct = mil.distinct_patches(tiles)  # identical patches are embedded and passed once
            if len(distinct) < len(tiles):
                cand, orig, centers, tiles = (cand[:, distinct.to(cand.device)], orig[distinct.numpy()],
                                              centers[distinct.numpy()], tiles[distinct])
            scores = scores_without_grad(model, tiles, device, ctx)
            if cfg.attention != "uniform":
                distill.append(mil.distillation_loss(att[0, cand[0]], scores, top=max(1, cfg.train_patches // 4)))
            keep = mil.select_for_gradient(scores, max(n, cfg.train_patches), cfg.select_random,
                                           generator=generator).cpu()
            idx, orig, centers, tiles = cand[:, keep.to(cand.device)], orig[keep.numpy()], centers[keep.numpy()], tiles[keep]
            a_k = att.gather(1, idx)
            n = len(keep)
        else:
            n1 = max(1, n - int(round(cfg.zoom * n))) if gated and n >= 2 else n
            radius = max(1, int(round(size * pds / max(view.downsample))))  # one patch, in view cells
            if n1 < n:  # zoom: first n1 cells spread over distinct places, then the rest around the best of them
                idx = spread_cells(att, n1, (h, w), SPREAD_PATCHES * radius, generator=None if mode == "topk" else generator)
                a_k = att.gather(1, idx)
            elif mode == "topk":
                idx, a_k = sampling.topk(att, n1)
            else:
                idx, a_k = sampling.sample(att, n1, cfg.replace, generator=generator)
            orig, centers, tiles = read(idx[0])
            if n1 < n:
                assert model.mil is not None
                if inference:  # these n1 features are final: embedded once, not again with the rest
                    first = embed_patches(model, tiles, patch_keys(item.slide_path, orig, view.downsample, size, pds,
                                                                   item.augment), device=device, autocast=ctx)
                    scores = model.mil.score(first)
                else:
                    scores = scores_without_grad(model, tiles, device, ctx)
                best = int(torch.argmax(scores))
                near = zoom_cells(att, idx, int(idx[0, best]), (h, w), radius, n - n1,
                                  generator=None if mode == "topk" else generator)
                o2, c2, t2 = read(near[0])
                idx, orig, centers, tiles = torch.cat([idx, near], 1), np.concatenate([orig, o2]), \
                    np.concatenate([centers, c2]), torch.cat([tiles, t2])
                a_k = att.gather(1, idx)
        done.append(first)
        skip = 0 if first is None else len(first)
        patches.append(tiles[skip:])
        keys.extend(patch_keys(item.slide_path, orig[skip:], view.downsample, size, pds, item.augment))
        attentions.append(att[0])
        indices.append(orig)
        sampled.append(a_k[0])
        boxes.append(patch_boxes(centers, size, pds))
        counts.append(n)
    feats = embed_patches(model, torch.cat(patches), keys, device=device, autocast=ctx)
    pooled, weights, per_slide = [], [], []
    start = 0
    replace = cfg.replace and mode == "sample"
    for a_k, n, first in zip(sampled, counts, done):
        skip = 0 if first is None else len(first)
        f = feats[start : start + n - skip]
        start += n - skip
        if first is not None:
            f = torch.cat([first, f])
        if model.mil is not None:
            per_slide.append(f)
            z, alpha = model.mil(f)
            pooled.append(z)
            weights.append(alpha.detach())
            if mode != "explore" and cfg.attention != "uniform" and torch.is_grad_enabled():
                distill.append(mil.distillation_loss(a_k, model.mil.score(f.detach()), top=max(1, n // 2)))
        elif mode == "topk":
            pooled.append(sampling.estimate_topk(a_k[None], f[None])[0])
            weights.append(sampling.estimate_weights(a_k[None], False)[0])
        else:
            pooled.append(sampling.expectation(a_k[None], f[None], replace)[0])
            weights.append(sampling.estimate_weights(a_k[None], replace)[0])
    logits = model.classifier(torch.stack(pooled))
    aux = torch.stack(distill) if distill else None
    return ForwardResult(logits, attentions, indices, sampled, weights, boxes,
                         lambda: torch.stack([sampling.entropy(a[None])[0] for a in attentions]), aux,
                         features=per_slide if model.mil is not None else None)


#: Least distance between the first-stage cells of zoomed inference, in patch widths (`spread_cells`).
SPREAD_PATCHES = 4


def spread_cells(attention: Tensor, n: int, shape: tuple[int, int], radius: int, *,
                 generator: torch.Generator | None = None, pool_factor: int = 8) -> Tensor:
    """n distinct cells [1, n] drawn from the attention [1, K] and kept apart: the first n*pool_factor cells
    of a Gumbel top-k draw without replacement (in draw order; by attention when `generator` is None: top-k)
    are taken greedily, each unless it lies within `radius` cells (Chebyshev) of one already taken or its
    attention is below the uniform level 1/K' (K' allowed cells: not a place the attention points to); when
    fewer than n qualify, the rest follow in draw order. A few decoys of one look then cannot take all of
    the draws meant to find the region unlike them, and once the draw has used up the cells the attention
    points to, its tail (background) is not taken just for being far away: without the uniform-level rule,
    on a cohort whose every region is informative 18% of predict's patches fell outside them."""
    h, w = shape
    allowed = int((attention > 0).sum(dtype=torch.int32))
    pool = min(allowed, n * pool_factor)
    order = sampling.highest_or_drawn(attention, pool, generator=generator)[0]
    rows, cols = order // w, order % w
    pointed = (attention[0, order] >= 1.0 / max(allowed, 1)).tolist()
    taken: list[int] = []
    for k in range(pool):
        if len(taken) == n:
            break
        if pointed[k] and all(max(abs(int(rows[k] - rows[j])), abs(int(cols[k] - cols[j]))) > radius for j in taken):
            taken.append(k)
    rest = [k for k in range(pool) if k not in set(taken)][: n - len(taken)]
    return order[taken + rest][None]


def zoom_cells(attention: Tensor, taken: Tensor, best: int, shape: tuple[int, int], radius: int, n: int,
               *, generator: torch.Generator | None = None) -> Tensor:
    """n more cells [1, n], none in `taken` [1, t]: drawn without replacement from the attention restricted
    to the square of `radius` cells around cell `best`, and, when that square holds fewer than n
    allowed cells, the rest from the attention elsewhere. Without a generator: the highest-attention
    cells there instead of a draw (deterministic)."""
    h, w = shape
    r0, c0 = divmod(best, w)
    dev = attention.device
    rows = torch.arange(max(0, r0 - radius), min(h, r0 + radius + 1), device=dev)
    cols = torch.arange(max(0, c0 - radius), min(w, c0 + radius + 1), device=dev)
    box = (rows[:, None] * w + cols[None, :]).reshape(-1)  # the square's cells, ascending
    inside = attention.detach()[0, box]
    keep = (inside > 0) & ~torch.isin(box, taken[0])
    square, inside = box[keep], inside[keep]
    take = min(n, len(square))
    # drawn among the square's allowed cells only (not over a view-sized masked copy): the same law
    picked = square[sampling.highest_or_drawn(inside[None], take, generator=generator)[0]][None] if take else taken[:, :0]
    if take < n:  # the rest from outside the square (which holds every picked cell)
        weights = attention.detach().clone()
        weights[0, taken[0]] = 0.0
        weights[0, box] = 0.0
        more = min(n - take, int((weights > 0).sum()))
        if more:
            picked = torch.cat([picked, sampling.highest_or_drawn(weights, more, generator=generator)], 1)
    return picked


def view_attention(net: torch.nn.Module | None, item: SlideBatchItem, cfg: Config, *, device: torch.device,
                   autocast: Callable[[], AbstractContextManager[Any]] | None = None) -> tuple[Tensor, Tensor]:
    """(mask [1, K], attention [1, K]) over an item's augmented view, both on `device`: uniform over the mask
    with `cfg.attention` 'uniform', otherwise the smoothed softmax of `net`'s logits over the view (zero off
    the mask). The one place the learned-vs-uniform choice is made (`forward_batch`, the nested pass,
    `attention_map`)."""
    mask = item.augment.maps(torch.from_numpy(item.view.mask)).reshape(1, -1).to(device)
    if cfg.attention == "uniform":
        return mask, sampling.uniform_attention(mask, mask.shape).to(device)
    if net is None:
        raise ValueError("learned attention needs an attention network")
    image = item.augment.images(torch.from_numpy(item.view.image).permute(2, 0, 1))
    with (autocast or _null_context)():
        logits = net(image[None].to(device, non_blocking=device.type == "cuda"))
    return mask, sampling.smooth_attention(logits.float(), mask=mask, eps=cfg.attention_eps)


def explore_distribution(item: SlideBatchItem, device: torch.device) -> Tensor | None:
    """The exploration distribution [1, K] of an item's (augmented) view, or None (uniform) without one."""
    if item.view.explore is None:
        return None
    return item.augment.maps(torch.from_numpy(item.view.explore)).reshape(1, -1).to(device)


def scores_without_grad(model: ATSModel, tiles: Tensor, device: torch.device,
                        ctx: Callable[[], AbstractContextManager[Any]]) -> Tensor:
    """Instance scores [M] of candidate patches, embedded in eval mode without gradient."""
    assert model.mil is not None
    was_training = model.feature_net.training
    model.feature_net.eval()
    try:
        with torch.no_grad(), ctx():
            f = model.feature_net(tiles.to(device, non_blocking=device.type == "cuda")).float()
            return model.mil.score(f).float()
    finally:
        model.feature_net.train(was_training)


def _null_context() -> AbstractContextManager[Any]:
    return nullcontext()


def attention_map(model: ATSModel, view: PreparedView, cfg: Config, *, device: torch.device | None = None) -> np.ndarray:
    """The full attention distribution over the view, shape (h, w), zero outside the mask.

    With `cfg.nested` the view is the coarse view and this is the coarse attention a1 over its regions."""
    device = device or next(model.parameters()).device
    h, w = view.image.shape[:2]
    net = model.coarse_net if cfg.nested and model.coarse_net is not None else model.attention_net
    with torch.no_grad():
        _, att = view_attention(net, SlideBatchItem(Path(), view), cfg, device=device)
    return att.reshape(h, w).cpu().numpy()


class ATSForward(torch.nn.Module):
    """`forward_batch` as a module, so that DistributedDataParallel can wrap the whole pass."""

    def __init__(self, model: ATSModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: Sequence[SlideBatchItem], **kwargs: object) -> ForwardResult:
        return forward_batch(self.model, items, **kwargs)  # type: ignore[arg-type]
