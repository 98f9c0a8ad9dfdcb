"""The forward pass of nested attention sampling (the estimator is `wsiats.nested`).

coarse view -> coarse attention a1 over its pixels (the regions) -> M regions drawn -> each picked
region's crop of the fine view read lazily from the slide -> fine attention a2 inside it -> N cells
drawn over the picked regions -> their patches read -> features -> nested estimator -> logits.
Per slide this reads the coarse view, M crops of (ratio + 2 halo)^2 fine pixels and N patches:
nothing else of the slide, whatever its area. With gated pooling (`forward_nested`) GATED_REGIONS * M
crops are read and the patches are chosen among their cells, then pooled by the gated MIL head.

Geometry, in level-0 pixels (d1 = `coarse_downsample`, d2 = `view_downsample`, ratio = d1 / d2):
region (R, C), pixel (R, C) of the coarse view, is the square [C d1, (C + 1) d1) x [R d1, (R + 1) d1)
(the coarse view's own downsample, W0 / round(W0 / d1) or for block means k times a level's, differs from d1
by under half a region over the whole slide); its fine cell (j, k) is centred on
((C ratio + k + 0.5) d2, (R ratio + j + 0.5) d2), cell (R ratio + j, C ratio + k) of the fine grid, as the
one-level view's cells are (`wsiats.view`).
The crop carries a halo of `HALO` fine pixels on each side (the attention network's receptive field),
so the fine logits of a region are those the network gives on the whole fine view, except at the
slide's border (pixels outside the slide read as white, not replicated). A fine cell whose crop
pixel has saturation below `wsiats.tissue.MIN_SATURATION` (glass) is not sampled, unless the whole
region is glass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from wsiats import mil, nested, sampling
from wsiats.config import Config
from wsiats.embed_cache import embed_patches, patch_keys
from wsiats.forward import ForwardResult, SlideBatchItem, explore_distribution, scores_without_grad, view_attention
from wsiats.models import ATSModel, AttentionNet, OnTissue
from wsiats.reader import PatchReader
from wsiats.tissue import MIN_SATURATION
from wsiats.view import patch_boxes

#: Fine pixels read around each region on every side: half the attention network's receptive field.
HALO = AttentionNet.receptive_field // 2


@dataclass
class NestedPicks:
    """Both levels of one slide's nested pass, in the slide's orientation (not the augmented one)."""

    regions: np.ndarray  # [M] picked coarse-view pixels (flat index), in pick order
    region_boxes: np.ndarray  # [M, 4] level-0 x, y, width, height
    region_attention: Tensor  # [M] a1 at the picked regions
    region_weights: Tensor  # [M] C_m: each region's coefficient in the estimate
    patch_region: np.ndarray  # [N] for each patch, the position m of its region in `regions`
    cell_attention: Tensor  # [N] a2(i | r) of each patch inside its region


def ratio(cfg: Config) -> int:
    """Fine cells per region side."""
    return int(round(cfg.coarse_downsample / cfg.view_downsample))


def region_boxes(regions: np.ndarray, coarse_w: int, cfg: Config) -> np.ndarray:
    """Level-0 boxes [M, 4] (x, y, w, h) of flat coarse-view pixels."""
    rows, cols = np.divmod(np.asarray(regions, dtype=np.int64), coarse_w)
    d1 = float(cfg.coarse_downsample)
    side = np.full_like(rows, int(round(d1)))
    return np.stack([np.round(cols * d1), np.round(rows * d1), side, side], axis=1).astype(np.int64).reshape(-1, 4)


def fine_cells(regions: np.ndarray, local: np.ndarray, coarse_w: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(flat fine-grid indices [n], level-0 centres [n, 2]) of local cells (j ratio + k) of regions."""
    r = ratio(cfg)
    rows, cols = np.divmod(np.asarray(regions, dtype=np.int64), coarse_w)
    j, k = np.divmod(np.asarray(local, dtype=np.int64), r)
    fr, fc = rows * r + j, cols * r + k
    d2 = float(cfg.view_downsample)
    centers = np.stack([(fc + 0.5) * d2, (fr + 0.5) * d2], axis=1).reshape(-1, 2)
    return fr * (coarse_w * r) + fc, centers


def region_centers(regions: np.ndarray, coarse_w: int, cfg: Config) -> np.ndarray:
    rows, cols = np.divmod(np.asarray(regions, dtype=np.int64), coarse_w)
    d1 = float(cfg.coarse_downsample)
    return np.stack([(cols + 0.5) * d1, (rows + 0.5) * d1], axis=1).reshape(-1, 2)


def glass(crops: Tensor) -> Tensor:
    """[M, 3, s, s] uint8 crops -> [M, ratio^2] bool interior cells that are glass (HSV saturation < the floor)."""
    x = crops[..., HALO: crops.shape[-2] - HALO, HALO: crops.shape[-1] - HALO].int()
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(hi > 0, (hi - lo) * 255 // hi.clamp_min(1), 0)
    return (sat <= MIN_SATURATION).flatten(1)


def gated_scores(region_attention: Tensor, cell_attention: Tensor) -> Tensor:
    """Where gated pooling puts its patches among the read regions' cells: a1(r) [M] times a2(i | r) [M, C]
    relative to uniform over the region's n_r allowed cells (a2 n_r), detached, [M, C]. Plain a1 a2 would
    favour a region of the tissue's edge, whose few allowed cells share all of a2 (the first zoomed patches
    of a test slide all fell into one region of 3 tissue cells)."""
    allowed = (cell_attention > 0).sum(dim=1, keepdim=True).to(cell_attention.dtype)
    return (region_attention.detach()[:, None].to(cell_attention.device) * cell_attention.detach() * allowed)


def _pick(scores: Tensor, n: int, *, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(region [k], cell [k]) of the k = min(n, non-zero) highest entries of scores [M, C] (drawn from them,
    without replacement, with a generator)."""
    flat = scores.reshape(1, -1)
    k = min(n, int((flat > 0).sum()))
    if k == 0:
        return flat.new_zeros(0, dtype=torch.long), flat.new_zeros(0, dtype=torch.long)
    pick = sampling.highest_or_drawn(flat, k, generator=generator)
    return pick[0] // scores.shape[1], pick[0] % scores.shape[1]


def region_distillation(region_attention: Tensor, owner: Tensor, scores: Tensor, *, top: int) -> Tensor:
    """The coarse attention's own target: `mil.distillation_loss` of a1 over the drawn regions that hold
    candidates [M] against each region's best candidate score (owner [k]: the region of each candidate with
    score [k]). Through a = a1 a2 alone, a1 got a share of a target spread over cells: after 30 epochs on the
    needle cohort the entropy of a was still 8.4-8.8 nats (one level: ~5)."""
    held = torch.unique(owner)
    best = torch.full((region_attention.shape[0],), -torch.inf, device=scores.device, dtype=scores.dtype)
    best = best.scatter_reduce(0, owner.to(scores.device), scores.detach(), reduce="amax")
    return mil.distillation_loss(region_attention[held.to(region_attention.device)], best[held.to(best.device)],
                                 top=top)


def spread_pick(scores: Tensor, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(region [k], cell [k]) of k = min(n, non-zero) cells of scores [M, C], one a region first: the best cell of
    each of the n regions with the highest best cells (with a generator: n regions drawn without replacement in
    proportion to their summed scores, a cell of each drawn in proportion to its score), then, when n > M, the
    rest by `_pick`. A region is a few patch widths across, so the first stage covers n distinct places, as one
    level's `spread_cells` does: the highest cells lie together in the region of highest a1, and a lone
    informative region among same-looking decoys was missed when they took all of the first stage."""
    best, cells = scores.max(dim=1)
    live = int((best > 0).sum())
    k = min(n, live)
    if generator is None:
        regions = torch.argsort(best, descending=True, stable=True)[:k]
        cell = cells[regions]
    else:
        mass = scores.sum(dim=1)
        regions = sampling.sample((mass / mass.sum())[None], k, False, generator=generator)[0][0] if k else cells[:0]
        rows = scores[regions]
        cell = torch.multinomial(rows / rows.sum(dim=1, keepdim=True), 1, generator=generator)[:, 0] if k else cells[:0]
    if n > k:
        rest = scores.clone()
        rest[regions, cell] = 0.0
        o2, c2 = _pick(rest, n - k, generator=generator)
        regions, cell = torch.cat([regions, o2]), torch.cat([cell, c2])
    return regions, cell


def zoom_region(cell_attention: Tensor, taken: Tensor, n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Up to n more cells [k] of one region, none in `taken`: drawn without replacement from its fine
    attention a2 [C] (the highest cells without a generator: deterministic)."""
    weights = cell_attention.detach().clone()
    weights[taken] = 0.0
    return _pick(weights[None], n, generator=generator)[1]


def explore_cells(cell_attention: Tensor, crops: Tensor, n: int, rho: float, *,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Training candidates over the cells of M drawn regions: (region [k], cell [k]) of k = min(n, allowed)
    cells drawn jointly without replacement from q = (1 - rho) a2 / M + rho u, u equal mass per colour
    group of the regions' cells (`mil.exploration_prior` over the crops' interiors, as one level has it over
    the view), a2 [M, C] the fine attention, crops [M, 3, s, s] uint8. A rare look (a few tumour cells
    among many of tissue) gets as much of the exploration as a common one, wherever it lies."""
    m, c = cell_attention.shape
    r = int(round(c ** 0.5))
    inner = crops[:, :, HALO: HALO + r, HALO: HALO + r].permute(0, 2, 3, 1).reshape(m * r, r, 3)
    allowed = (cell_attention.detach() > 0).reshape(m * r, r).cpu().numpy()
    u = torch.from_numpy(mil.exploration_prior(inner.cpu().numpy(), allowed)).reshape(1, m * c)
    joint = cell_attention.detach().reshape(1, m * c) / m
    q = mil.exploration_mixture(joint, joint > 0, rho, explore=u.to(joint.device))
    pick, _ = sampling.sample(q, min(n, int((q > 0).sum())), False, generator=generator)
    return pick[0] // c, pick[0] % c


#: With gated pooling: regions whose fine crops are read a slide, as a multiple of `Config.regions` (M). Their
#: cells hold the training candidates and, at inference, the patches (where a1 a2 is highest among them): on the
#: needle cohort the M regions of highest a1 held a tumour cell on 42-83% of the positive test slides.
GATED_REGIONS = 4


def forward_nested(
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
    """`wsiats.forward.forward_batch` for `cfg.nested`: each item's view is its COARSE view.

    mode 'sample': regions and cells drawn (`cfg.replace` at both levels); 'topk': the highest at both
    levels, deterministic. With `cfg.pooling` 'ats' the patches are pooled by the unbiased nested
    estimator (M = `cfg.regions` regions, N // M patches each), with 'gated' by the gated attention MIL
    head: GATED_REGIONS * M regions are read (drawn from a1 without replacement, or the highest), and
    the patches are cells of high `gated_scores` among theirs, one a region first (`spread_pick`); with `cfg.zoom` > 0 only n1 = N - round(zoom N) of them, and the rest from the fine
    attention of the region that holds the patch with the highest instance score (`zoom_region`), as
    one level zooms around its best patch. 'explore' (training, gated
    pooling, `cfg.candidates` > 0), the one-level explore pass over two levels: GATED_REGIONS *
    `cfg.regions` regions drawn without replacement from q1 = (1 - explore) a1 + explore u1 (u1 the
    coarse view's exploration distribution), then `cfg.candidates` of their cells
    drawn jointly without replacement (`explore_cells`: a2 mixed with equal mass per colour group of
    the regions' cells); the distinct ones embedded without gradient, max(N, `cfg.train_patches`) of the
    highest instance scores embedded again with gradient and pooled. Both attention networks learn
    from `ForwardResult.distill`, the cross-entropy of a(i) = a1(r(i)) a2(i | r(i)) over the candidates
    against those with the best instance scores (`mil.distillation_loss`), so log a1 and log a2 get
    the same target. `ForwardResult.attention` holds a1 over the coarse view, `sampled_attention` a(i)
    of each patch, `nested` both levels.
    """
    if mode not in ("sample", "topk", "explore"):
        raise ValueError(f"nested sampling has modes 'sample', 'topk' and 'explore', got {mode!r}")
    if model.coarse_net is None and cfg.attention != "uniform":
        raise ValueError("nested sampling needs a model built with nested=True (a coarse attention network)")
    gated = model.mil is not None
    if mode == "explore" and not gated:
        raise ValueError("mode 'explore' needs a model with gated pooling")
    device = device or next(model.parameters()).device
    ctx = cast(Callable[[], AbstractContextManager[Any]], autocast or (lambda: torch.autocast(device.type, enabled=False)))
    r, d2 = ratio(cfg), float(cfg.view_downsample)
    side = r + 2 * HALO
    replace = cfg.replace and mode == "sample"
    learn = cfg.attention != "uniform" and torch.is_grad_enabled()
    inference = not torch.is_grad_enabled() and not model.feature_net.training
    n = cfg.n_patches
    # zoom (gated pooling, not 'explore'): n1 patches over the M regions, the rest where the best of them lies
    n1 = max(1, n - int(round(cfg.zoom * n))) if gated and mode != "explore" and n >= 2 else n
    pooled, attentions, indices, sampled, weights, boxes, entropies, picks = [], [], [], [], [], [], [], []
    distill, per_slide = [], []
    for item in items:
        view, aug = item.view, item.augment
        h1, w1 = view.image.shape[:2]
        coarse: torch.nn.Module | None = model.coarse_net
        if model.coarse_net is not None and not torch.is_grad_enabled():  # inference: the logits on tissue only
            coarse = OnTissue(model.coarse_net, item.augment.maps(torch.from_numpy(view.mask)))
        mask, a1 = view_attention(coarse, item, cfg, device=device, autocast=ctx)
        if mode == "explore":
            q1 = mil.exploration_mixture(a1.detach(), mask, cfg.explore, explore=explore_distribution(item, device))
            m = min(GATED_REGIONS * cfg.regions, int((q1 > 0).sum()))
            ridx, _ = sampling.sample(q1, m, False, generator=generator)
            a1_k = a1.gather(1, ridx)
        elif gated:
            m = min(GATED_REGIONS * cfg.regions, int((a1 > 0).sum()))
            ridx, a1_k = sampling.topk(a1, m) if mode == "topk" else sampling.sample(a1, m, False, generator=generator)
        else:
            m = min(cfg.regions, n1, int((a1 > 0).sum()))
            ridx, a1_k = sampling.topk(a1, m) if mode == "topk" else nested.sample_regions(a1, m, replace, generator)
        regions = aug.unflip(ridx[0].cpu().numpy(), (h1, w1))
        crops = reader.read(item.slide_path, region_centers(regions, w1, cfg), side, downsample=d2, workers=workers)
        crops_t = aug.images(torch.from_numpy(crops).permute(0, 3, 1, 2))
        allowed = (~glass(crops_t)).to(device)
        if cfg.attention == "uniform":
            a2 = sampling.uniform_attention(allowed, allowed.shape).to(device)
        else:
            with ctx():
                fine = model.attention_net(crops_t.to(device)).float().reshape(m, side, side)
            fine = fine[:, HALO: HALO + r, HALO: HALO + r].reshape(m, r * r)
            a2 = sampling.smooth_attention(fine, mask=allowed, eps=cfg.attention_eps)
        cells: list[tuple[Tensor, Tensor]] = []
        if mode == "explore":
            owner_t, cell_idx = explore_cells(a2, crops_t, int(cfg.candidates or 0), cfg.explore, generator=generator)
            big = torch.full((m,), 1.0 / m, device=a1.device)  # the entropy's region weights: a plain mean
        elif gated:  # the n1 cells of highest (or drawn from) `gated_scores` among the read regions' cells
            joint = gated_scores(a1_k[0], a2)
            owner_t, cell_idx = spread_pick(joint, n1, generator=None if mode == "topk" else generator)
            big = nested.region_weights(a1_k[0], False)
        else:
            caps = [cfg.n_patches] * m if replace else [int(c) for c in (a2 > 0).sum(dim=1)]
            counts = nested.allocate(n1, caps)
            cells = nested.topk_cells(a2, counts) if mode == "topk" else nested.sample_cells(a2, counts, replace, generator)
            big = nested.region_weights(a1_k[0], replace)
            cell_idx = torch.cat([c for c, _ in cells])
            owner_t = torch.as_tensor(np.repeat(np.arange(m), counts), device=a2.device)
        owner = owner_t.cpu().numpy()
        a2_sel = a2[owner_t, cell_idx]  # a2(i | r(i)) of each drawn cell, with gradient (not q for 'explore')
        local = aug.unflip(cell_idx.cpu().numpy(), (r, r))
        flat, centers = fine_cells(regions[owner], local, w1, cfg)
        size, pds = cfg.patch_size, reader.patch_downsample(item.slide_path, cfg)
        pixels = reader.read_groups(item.slide_path, centers, owner, size, downsample=pds, workers=workers)  # a read a region
        tiles = aug.images(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        first: Tensor | None = None
        if n1 < cfg.n_patches:  # zoom: the rest of the N patches inside the region of the most telling one
            assert model.mil is not None
            if inference:  # these n1 features are final: embedded once, not again with the rest
                first = embed_patches(model, tiles, patch_keys(item.slide_path, flat, (d2, d2), size, pds, aug),
                                      device=device, autocast=autocast)
                scores = model.mil.score(first)
            else:
                scores = scores_without_grad(model, tiles, device, ctx)
            best = int(owner[int(torch.argmax(scores))])
            gen = None if mode == "topk" else generator
            extra = zoom_region(a2[best], cell_idx[owner_t == best], cfg.n_patches - n1, generator=gen)
            more_t = torch.full_like(extra, best)
            if len(extra) < cfg.n_patches - n1:  # the region is short of cells: the rest by the scores elsewhere
                rest = joint.clone()
                rest[owner_t, cell_idx] = 0.0
                rest[best] = 0.0
                o3, c3 = _pick(rest, cfg.n_patches - n1 - len(extra), generator=gen)
                more_t, extra = torch.cat([more_t, o3]), torch.cat([extra, c3])
            if len(extra):
                more = more_t.cpu().numpy()
                f2, c2 = fine_cells(regions[more], aug.unflip(extra.cpu().numpy(), (r, r)), w1, cfg)
                p2 = reader.read_groups(item.slide_path, c2, more, size, downsample=pds, workers=workers)
                owner, flat, centers = np.concatenate([owner, more]), np.concatenate([flat, f2]), np.concatenate([centers, c2])
                tiles = torch.cat([tiles, aug.images(torch.from_numpy(p2).permute(0, 3, 1, 2))])
                owner_t = torch.as_tensor(owner, device=a2.device)
                a2_sel = torch.cat([a2_sel, a2[more_t, extra]])
        a_cells = a1_k[0][owner_t.to(a1_k.device)] * a2_sel
        if mode == "explore":
            distinct = mil.distinct_patches(tiles).numpy()  # identical patches are embedded and passed once
            owner, flat, centers, tiles = owner[distinct], flat[distinct], centers[distinct], tiles[distinct]
            owner_t, a2_sel, a_cells = owner_t[distinct], a2_sel[distinct], a_cells[distinct]
            scores = scores_without_grad(model, tiles, device, ctx)
            if cfg.attention != "uniform":
                distill.append(mil.distillation_loss(a_cells, scores, top=max(1, cfg.train_patches // 4))
                               + region_distillation(a1_k[0], owner_t, scores, top=max(1, cfg.regions // 2)))
            keep = mil.select_for_gradient(scores, max(cfg.n_patches, cfg.train_patches), cfg.select_random,
                                           generator=generator).cpu().numpy()
            owner, flat, centers, tiles = owner[keep], flat[keep], centers[keep], tiles[keep]
            a2_sel, a_cells = a2_sel[keep], a_cells[keep]
        skip = 0 if first is None else len(first)
        keys = patch_keys(item.slide_path, flat[skip:], (d2, d2), size, pds, aug)
        feats = embed_patches(model, tiles[skip:], keys, device=device, autocast=autocast)
        if first is not None:
            feats = torch.cat([first, feats])
        if gated:
            assert model.mil is not None
            z, alpha = model.mil(feats)
            pooled.append(z)
            weights.append(alpha.detach())
            per_slide.append(feats)
            if mode != "explore" and learn:
                distill.append(mil.distillation_loss(a_cells, model.mil.score(feats.detach()),
                                                     top=max(1, len(feats) // 2)))
        else:
            a2_k = [a for _, a in cells]
            f_k = list(torch.split(feats, counts))
            if mode == "topk":
                pooled.append(nested.estimate_topk(a1_k[0], a2_k, f_k))
            else:
                pooled.append(nested.expectation(a1_k[0], a2_k, f_k, replace_regions=replace, replace_cells=replace))
            weights.append(torch.cat(nested.weights(a1_k[0], a2_k, replace_regions=replace, replace_cells=replace)))
        entropies.append(nested.entropy(a1[0], a2, big))
        attentions.append(a1[0])
        indices.append(flat)
        sampled.append(a_cells)
        boxes.append(patch_boxes(centers, size, pds))
        picks.append(NestedPicks(regions=regions, region_boxes=region_boxes(regions, w1, cfg),
                                 region_attention=a1_k[0].detach(), region_weights=big, patch_region=owner,
                                 cell_attention=a2_sel.detach()))
    logits = model.classifier(torch.stack(pooled))
    return ForwardResult(logits=logits, attention=attentions, indices=indices, sampled_attention=sampled,
                         weights=weights, boxes=boxes, entropy_of=lambda: torch.stack(entropies), nested=picks,
                         distill=torch.stack(distill) if distill else None, features=per_slide if gated else None)
