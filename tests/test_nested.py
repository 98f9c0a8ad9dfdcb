"""Tests of wsiats.nested: exact unbiasedness of the two-level estimator by enumeration.

For a few regions of a few cells, every ordered sample is enumerated at both levels with its
probability (prod a1(r_m) / pm_m for the regions without replacement, prod a1(r_m) with; the same
inside each picked region with a2), and the expectations of the estimate and of its gradients with
respect to the region logits, the cell logits and the features are compared with the true value
and gradients of <g, sum_i a1(r(i)) a2(i | r(i)) f(i)>. Gradients are taken through the smoothed
softmaxes, so a constant the score-function gradient adds per softmax is (correctly) invisible.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor

from wsiats import nested
from wsiats.sampling import smooth_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Allowed cells of the 3 regions (3, 2 and 1 cells): the allocation meets full regions.
MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])


def ordered(p: Tensor, n: int, replace: bool) -> Iterator[tuple[tuple[int, ...], float]]:
    """Every ordered sample of n locations from p [K] with its probability."""
    allowed = [int(i) for i in torch.nonzero(p > 0).flatten()]
    seqs = itertools.product(allowed, repeat=n) if replace else itertools.permutations(allowed, n)
    for seq in seqs:
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= float(p[i]) / (1.0 if replace else left)
            left -= 0 if replace else float(p[i])
        yield seq, prob


def problem(seed: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = (torch.randn(3, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()  # region logits
    v = (torch.randn(3, 3, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()  # cell logits
    f = torch.randn(3, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()  # features
    g = torch.randn(2, generator=gen, dtype=torch.float64)
    return u, v, f, g


def attentions(u: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    return smooth_attention(u[None], eps=0.05)[0], smooth_attention(v, mask=mask, eps=0.05)


Estimator = Callable[..., Tensor]


def enumerate_expectation(u: Tensor, v: Tensor, f: Tensor, g: Tensor, *, mask: Tensor | None, m: int, n: int,
                          replace_regions: bool, replace_cells: bool,
                          estimator: Estimator = nested.expectation) -> tuple[Tensor, list[Tensor]]:
    """(E[F], [E[dL/du], E[dL/dv], E[dL/df]]) over every ordered two-level sample, L = <g, F>."""
    a1, a2 = attentions(u, v, mask)
    value = torch.zeros(2, dtype=torch.float64)
    grads = [torch.zeros_like(t) for t in (u, v, f)]
    total = 0.0
    for regions, p_regions in ordered(a1.detach(), m, replace_regions):
        caps = [n] * m if replace_cells else [int((a2[r] > 0).sum()) for r in regions]
        counts = nested.allocate(n, caps)
        per_region = [list(ordered(a2[r].detach(), k, replace_cells)) for r, k in zip(regions, counts)]
        for combo in itertools.product(*per_region):
            prob = p_regions
            for _, p in combo:
                prob *= p
            idx = torch.tensor(regions)
            cells = [torch.tensor(c) for c, _ in combo]
            est = estimator(a1[idx], [a2[r][c] for r, c in zip(regions, cells)],
                            [f[r][c] for r, c in zip(regions, cells)],
                            replace_regions=replace_regions, replace_cells=replace_cells)
            out = torch.autograd.grad((est * g).sum(), (u, v, f), retain_graph=True)
            value += prob * est.detach()
            for acc, d in zip(grads, out):
                acc += prob * d
            total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    return value, grads


def truth(u: Tensor, v: Tensor, f: Tensor, g: Tensor, mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    a1, a2 = attentions(u, v, mask)
    s = (a1[:, None, None] * a2[:, :, None] * f).sum(dim=(0, 1))
    return s.detach(), list(torch.autograd.grad((s * g).sum(), (u, v, f)))


REPLACE = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("replace_regions, replace_cells", REPLACE)
@pytest.mark.parametrize("m, n, masked", [(2, 2, False), (2, 3, True)])
def test_value_and_both_gradients_unbiased_by_enumeration(replace_regions: bool, replace_cells: bool, m: int,
                                                          n: int, masked: bool) -> None:
    mask = MASK if masked else None
    u, v, f, g = problem(seed=7 + m + n)
    want_value, want_grads = truth(u, v, f, g, mask)
    value, grads = enumerate_expectation(u, v, f, g, mask=mask, m=m, n=n, replace_regions=replace_regions,
                                         replace_cells=replace_cells)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(("region logits", "cell logits", "features"), grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda s, name=name: f"{name}: {s}")


def test_peaked_attention_unbiased_without_replacement() -> None:
    """Without replacement at both levels, peaked attention: where a biased
    without-replacement gradient shows most (ATS_NOTES: ~190%)."""
    u, v, f, g = problem(seed=3)
    with torch.no_grad():
        u.mul_(4.0)
        v.mul_(4.0)
    want_value, want_grads = truth(u, v, f, g, MASK)
    value, grads = enumerate_expectation(u, v, f, g, mask=MASK, m=2, n=3, replace_regions=False, replace_cells=False)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _pooled_mean(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor],
                 **_: bool) -> Tensor:
    """A plausible wrong estimator: the plain mean of the N patches read from the picked regions."""
    return torch.cat(list(features)).mean(0) + 0 * region_attention.sum() + 0 * torch.cat(list(cell_attention)).sum()


def _flat_inner(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor],
                **kw: bool) -> Tensor:
    """Another: the inner estimates averaged without the outer without-replacement weights."""
    from wsiats import sampling

    inner = [sampling.expectation(a[None], f[None], kw["replace_cells"])[0] for a, f in zip(cell_attention, features)]
    return sampling.expectation(region_attention[None], torch.stack(inner)[None], True)[0]


@pytest.mark.parametrize("wrong", [_pooled_mean, _flat_inner])
def test_enumeration_catches_a_biased_estimator(wrong: Estimator) -> None:
    u, v, f, g = problem(seed=11)
    want_value, want_grads = truth(u, v, f, g, None)
    value, grads = enumerate_expectation(u, v, f, g, mask=None, m=2, n=2, replace_regions=False,
                                         replace_cells=False, estimator=wrong)
    off = [float((got - want).abs().max()) for got, want in zip([value, *grads], [want_value, *want_grads])]
    assert max(off) > 1e-3, off


def test_inner_estimate_is_only_conditionally_unbiased() -> None:
    """Given the region, G_m is unbiased for G(r_m) = sum_{i in r_m} a2(i | r_m) f(i) (not for S)."""
    from wsiats import sampling

    u, v, f, g = problem(seed=5)
    _, a2 = attentions(u, v, None)
    for r in range(3):
        mean = torch.zeros(2, dtype=torch.float64)
        for cells, p in ordered(a2[r].detach(), 2, False):
            c = torch.tensor(cells)
            mean += p * sampling.expectation(a2[r][c][None], f[r][c][None], False)[0].detach()
        torch.testing.assert_close(mean, (a2[r, :, None] * f[r]).sum(0).detach())


def test_weights_are_the_feature_coefficients_and_sum_to_one() -> None:
    u, v, f, g = problem(seed=2)
    a1, a2 = attentions(u, v, None)
    idx, cells = torch.tensor([2, 0]), [torch.tensor([1, 0]), torch.tensor([2])]
    for rr, rc in REPLACE:
        est = nested.expectation(a1[idx], [a2[r][c] for r, c in zip(idx.tolist(), cells)],
                                 [f[r][c] for r, c in zip(idx.tolist(), cells)], replace_regions=rr, replace_cells=rc)
        w = nested.weights(a1[idx], [a2[r][c] for r, c in zip(idx.tolist(), cells)], replace_regions=rr,
                           replace_cells=rc)
        direct = sum((wm[:, None] * f[r][c]).sum(0) for wm, r, c in zip(w, idx.tolist(), cells))
        torch.testing.assert_close(est.detach(), direct.detach())
        assert float(torch.cat(w).sum()) == pytest.approx(1.0)


def test_estimate_topk_is_one_level_topk_at_each_level() -> None:
    u, v, f, g = problem(seed=4)
    a1, a2 = attentions(u, v, None)
    ridx, ra = nested.sample_regions(a1[None].detach(), 2, False)
    top = torch.topk(a1.detach(), 2).indices
    got = nested.topk_cells(a2[top].detach(), [2, 1])
    assert [len(i) for i, _ in got] == [2, 1]
    for (i, a), r in zip(got, top.tolist()):
        assert i.tolist() == torch.topk(a2[r].detach(), len(i)).indices.tolist()
    est = nested.estimate_topk(a1[top], [a for _, a in got], [f[r][i] for (i, _), r in zip(got, top.tolist())])
    assert est.shape == (2,)
    assert ridx.shape == ra.shape == (1, 2)


def test_sample_cells_draws_distinct_cells_of_each_row() -> None:
    a2 = smooth_attention(torch.randn(4, 9), mask=torch.rand(4, 9) > 0.3)
    gen = torch.Generator().manual_seed(0)
    for (idx, a), row in zip(nested.sample_cells(a2, [3, 1, 2, 2], False, generator=gen), a2):
        assert len(set(idx.tolist())) == len(idx)
        assert bool((row[idx] > 0).all())
        torch.testing.assert_close(a, row[idx])


@pytest.mark.parametrize("n, caps, want", [
    (4, [9, 9], [2, 2]),
    (5, [9, 9], [3, 2]),
    (4, [1, 9], [1, 3]),
    (4, [1, 1], [1, 1]),  # fewer cells than patches: fewer patches
    (3, [2, 2, 2], [1, 1, 1]),
])
def test_allocate(n: int, caps: list[int], want: list[int]) -> None:
    assert nested.allocate(n, caps) == want


def test_allocate_refuses_fewer_patches_than_regions() -> None:
    with pytest.raises(ValueError, match="at least one patch per picked region"):
        nested.allocate(1, [3, 3])


# ---------------------------------------------------------------------------------------------
# The nested forward pass on a generated slide (wsiats.nested_pass)
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import _slides  # noqa: E402
import numpy as np  # noqa: E402

from wsiats.checkpoint import MODEL_FILE, build_model, save_weights  # noqa: E402
from wsiats.config import Config  # noqa: E402
from wsiats.errors import ConfigError  # noqa: E402
from wsiats.forward import SlideBatchItem, forward_batch  # noqa: E402
from wsiats.models import AttentionNet  # noqa: E402
from wsiats.models import OnTissue  # noqa: E402
from wsiats.nested_pass import GATED_REGIONS, HALO, fine_cells, region_centers  # noqa: E402
from wsiats.reader import OpenedSlide
from wsiats.slide import open_slide  # noqa: E402
from wsiats.view import Augment, prepare_view

#: Fine view at downsample 4 (a level of the slide), coarse view at 32: regions of 8 x 8 fine cells.
NESTED = dict(classes=["a", "b"], nested=True, pooling="ats", view_downsample=4.0, coarse_downsample=32.0,
              regions=4, n_patches=8, patch_size=16, feature_dim=8)


@pytest.fixture(scope="module")
def nested_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nested") / "slide.tif"
    _slides.write_generic_pyramid(path, _slides.tissue_image(512, 512, seed=1), n_levels=3, tile=64)  # 1x, 2x, 4x
    return path


def test_config_of_nested_sampling() -> None:
    assert not Config().nested  # one level stays the default
    assert Config(nested=True).pooling == "gated" and Config(nested=True).candidates == 256  # gated works nested
    with pytest.raises(ConfigError, match="integer multiple"):
        Config(**{**NESTED, "coarse_downsample": 30.0})
    with pytest.raises(ConfigError, match="at most n_patches"):
        Config(**{**NESTED, "regions": 9})
    assert Config(**{**NESTED, "regions": 9, "pooling": "gated"}).regions == 9  # gated reads 4M, takes N of their cells


def test_region_crops_are_the_fine_view_and_give_its_logits(nested_slide: Path) -> None:
    """A region's crop read lazily equals the same square of the whole fine view held in memory, and the
    attention network on the crop (with its halo) gives the whole view's logits at the region's cells."""
    cfg = Config(**NESTED)
    model = build_model(cfg)
    with open_slide(nested_slide) as slide:
        fine = slide.read_view(downsample=4.0).image  # 128 x 128: the one-level view
        coarse = prepare_view(slide, cfg)
        assert coarse.image.shape[:2] == (16, 16)
        regions = np.array([5 * 16 + 7, 9 * 16 + 3])
        side = 8 + 2 * HALO
        crops = slide.read_patches(region_centers(regions, 16, cfg), side, downsample=4.0)
    with torch.no_grad():
        full = model.attention_net(torch.from_numpy(fine).permute(2, 0, 1)[None]).reshape(128, 128)
        local = model.attention_net(torch.from_numpy(crops).permute(0, 3, 1, 2)).reshape(2, side, side)
    for crop, loc, reg in zip(crops, local, regions):
        row, col = divmod(int(reg), 16)
        box = np.s_[row * 8 - HALO: row * 8 + 8 + HALO, col * 8 - HALO: col * 8 + 8 + HALO]
        np.testing.assert_array_equal(crop, fine[box])
        torch.testing.assert_close(loc[HALO:-HALO, HALO:-HALO], full[row * 8: row * 8 + 8, col * 8: col * 8 + 8])
    flat, centers = fine_cells(regions[:1], np.array([0, 9]), 16, cfg)  # cells (0, 0) and (1, 1) of region (5, 7)
    assert flat.tolist() == [40 * 128 + 56, 41 * 128 + 57]
    np.testing.assert_allclose(centers, [[(56 + 0.5) * 4, (40 + 0.5) * 4], [(57 + 0.5) * 4, (41 + 0.5) * 4]])


@pytest.mark.parametrize("shape, density", [((61, 45), 0.05), ((61, 45), 0.3), ((40, 40), 1.0), ((9, 70), 0.1)])
def test_attention_on_tissue_tiles_is_the_whole_views_on_the_mask(shape: tuple[int, int], density: float) -> None:
    """`OnTissue`: the coarse network run tile by tile on the mask's tiles gives the whole view's logits on every
    mask cell (borders, partial tiles and blobs included), and the same attention."""
    torch.manual_seed(1)
    net = AttentionNet().eval()
    h, w = shape
    gen = np.random.default_rng(2)
    mask = gen.random((h // 4 + 1, w // 4 + 1)) < density  # blobs of 4 x 4 cells
    mask = np.repeat(np.repeat(mask, 4, 0), 4, 1)[:h, :w]
    mask[0, 0] = mask[-1, -1] = True  # the corners: crops clipped at the border
    view = torch.from_numpy(gen.integers(0, 256, (1, 3, h, w), dtype=np.uint8))
    on_tissue, inner = OnTissue(net, torch.from_numpy(mask)), []
    unpadded = net.unpadded
    net.unpadded = lambda crops: inner.append(len(crops)) or unpadded(crops)  # type: ignore[method-assign]
    with torch.no_grad():
        full, tiled = net(view), on_tissue(view)
    if density == 0.05:  # a sparse mask on a view wide enough for inner tiles: they took the unpadded path
        assert inner
    m = torch.from_numpy(mask).reshape(1, -1)
    torch.testing.assert_close(tiled[m], full[m])
    torch.testing.assert_close(smooth_attention(tiled, mask=m), smooth_attention(full, mask=m))


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (100, 37), (65, 130), (300, 301)])
def test_on_tissue_grids_are_the_masks_tiles(shape: tuple[int, int]) -> None:
    """`OnTissue._grids` (8 mask cells read as one uint64, each larger side reduced from the smaller) marks
    exactly the tiles of each side that hold a mask cell, and nothing past the view."""
    h, w = shape
    mask = np.random.default_rng(h * w).random(shape) < 0.02
    mask[h // 2, w // 2] = True
    grids = OnTissue(AttentionNet(), torch.from_numpy(mask))._grids()
    for side in OnTissue.SIDES:
        rows, cols = -(-h // side), -(-w // side)
        padded = np.pad(mask, ((0, rows * side - h), (0, cols * side - w)))
        expected = padded.reshape(rows, side, cols, side).any(axis=(1, 3))
        assert np.array_equal(grids[side][:rows, :cols], expected), side
        assert not grids[side][rows:].any() and not grids[side][:, cols:].any()


class CountingSlide:
    """A slide handle that records every read (what nested predict may touch)."""

    def __init__(self, slide: object) -> None:
        self.slide, self.reads = slide, []  # type: ignore[var-annotated]

    def read_patches(self, centers: np.ndarray, size: int, **kw: object) -> np.ndarray:
        self.reads.append((len(centers), size, kw.get("downsample")))
        return self.slide.read_patches(centers, size, **kw)  # type: ignore[attr-defined]

    def read_patch_groups(self, centers: np.ndarray, groups: np.ndarray, size: int, **kw: object) -> np.ndarray:
        self.reads.append((len(centers), size, kw.get("downsample")))
        return self.slide.read_patch_groups(centers, groups, size, **kw)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode, augment", [("sample", Augment()), ("sample", Augment(True, True, 0.05, 1.1)),
                                           ("topk", Augment())])
def test_forward_reads_m_regions_and_n_patches_inside_them(nested_slide: Path, mode: str, augment: Augment) -> None:
    cfg = Config(**NESTED)
    torch.manual_seed(0)
    model = build_model(cfg)
    with open_slide(nested_slide) as slide:
        view = prepare_view(slide, cfg)
        counting = CountingSlide(slide)
        out = forward_batch(model, [SlideBatchItem(nested_slide, view, augment)], cfg=cfg,
                            reader=OpenedSlide(counting), mode=mode,  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(1))
    assert counting.reads == [(4, 8 + 2 * HALO, 4.0), (8, 16, 1.0)]  # the M crops, then the N patches: nothing else
    picks = out.nested[0]  # type: ignore[index]
    assert len(set(picks.regions.tolist())) == 4 and bool(view.mask.reshape(-1)[picks.regions].all())
    assert np.bincount(picks.patch_region).tolist() == [2, 2, 2, 2]
    centers = out.boxes[0][:, :2] + 8  # the patches' level-0 centres lie in their regions' boxes
    rb = picks.region_boxes[picks.patch_region]
    assert bool(((centers >= rb[:, :2]) & (centers < rb[:, :2] + rb[:, 2:])).all())
    torch.testing.assert_close(out.sampled_attention[0].detach(),
                               picks.region_attention[picks.patch_region] * picks.cell_attention)
    assert float(out.weights[0].sum()) == pytest.approx(1.0)
    assert out.attention[0].shape == (256,)
    if mode == "sample":
        (out.logits.sum() - out.entropy.sum()).backward()
        for net in (model.coarse_net, model.attention_net, model.feature_net):
            assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())  # type: ignore[union-attr]


def test_nested_explore_pass_trains_both_attentions_from_the_candidates(nested_slide: Path) -> None:
    """Gated pooling, training with candidates: GATED_REGIONS * M regions hold them, the
    train_patches best of them get the gradient pass, and the distillation of a = a1 a2 over the
    candidates reaches the coarse and the fine attention networks (the classifier loss alone reaches
    neither: the gated pooling takes no attention weight)."""
    cfg = Config(**{**NESTED, "pooling": "gated", "candidates": 40, "train_patches": 12})
    torch.manual_seed(0)
    model = build_model(cfg)
    with open_slide(nested_slide) as slide:
        view = prepare_view(slide, cfg)
        counting = CountingSlide(slide)
        out = forward_batch(model, [SlideBatchItem(nested_slide, view)], cfg=cfg, reader=OpenedSlide(counting),
                            mode="explore", generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    crops, cands = counting.reads
    assert crops[0] == GATED_REGIONS * 4 and cands[:2] == (40, 16)
    picks = out.nested[0]  # type: ignore[index]
    assert len(set(picks.regions.tolist())) == crops[0] and bool(view.mask.reshape(-1)[picks.regions].all())
    assert len(out.indices[0]) == 12 and len(set(out.indices[0].tolist())) == 12  # distinct cells
    assert out.features is not None and out.features[0].shape == (12, 8)
    torch.testing.assert_close(out.sampled_attention[0].detach(),
                               picks.region_attention[picks.patch_region] * picks.cell_attention)
    assert out.distill is not None and out.distill.shape == (1,)
    out.distill.sum().backward()
    for net in (model.coarse_net, model.attention_net):
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())  # type: ignore[union-attr]
    assert all(p.grad is None for p in model.feature_net.parameters())  # the scores are taken without gradient


def test_explore_cells_give_a_rare_look_its_colour_groups_share() -> None:
    """Two regions of 4 x 4 cells under uniform fine attention, one red cell among grey ones: with rho 0.5 the
    first candidate is the red cell with probability 0.5 / 32 + 0.5 / 2 (two colour groups, equal mass), and
    the k candidates are distinct cells of the regions."""
    from wsiats.nested_pass import explore_cells

    side = 4 + 2 * HALO
    crops = torch.full((2, 3, side, side), 128, dtype=torch.uint8)
    crops[1, :, HALO + 2, HALO + 1] = torch.tensor([200, 30, 30], dtype=torch.uint8)  # cell 2 * 4 + 1 of region 1
    a2 = torch.full((2, 16), 1 / 16)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    hits = 0
    for _ in range(draws):
        region, cell = explore_cells(a2, crops, 1, 0.5, generator=gen)
        hits += int(region[0]) == 1 and int(cell[0]) == 9
    p = 0.5 / 32 + 0.5 / 2
    assert abs(hits / draws - p) < 4 * (p * (1 - p) / draws) ** 0.5
    region, cell = explore_cells(a2, crops, 20, 0.5, generator=gen)
    assert len(set(zip(region.tolist(), cell.tolist()))) == 20 and set(region.tolist()) <= {0, 1}


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_nested_gated_inference_pools_n_patches_of_m_regions(nested_slide: Path, mode: str) -> None:
    cfg = Config(**{**NESTED, "pooling": "gated", "zoom": 0.0})
    model = build_model(cfg).eval()
    with open_slide(nested_slide) as slide, torch.no_grad():
        view = prepare_view(slide, cfg)
        counting = CountingSlide(slide)
        out = forward_batch(model, [SlideBatchItem(nested_slide, view)], cfg=cfg, reader=OpenedSlide(counting),
                            mode=mode, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    assert counting.reads == [(16, 8 + 2 * HALO, 4.0), (8, 16, 1.0)]  # no zoom: 4M crops, then N patches
    assert out.distill is None and len(set(out.indices[0].tolist())) == 8
    assert float(out.weights[0].sum()) == pytest.approx(1.0)  # the gated head's weights
    a = out.sampled_attention[0]
    picks = out.nested[0]  # type: ignore[index]
    torch.testing.assert_close(a, picks.region_attention[picks.patch_region] * picks.cell_attention)



@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_nested_zoom_takes_the_rest_inside_the_best_patchs_region(nested_slide: Path, mode: str) -> None:
    """zoom 0.625 of N = 8: 3 patches among the 4M regions read, embedded once, then 5 more cells of the region
    whose patch the MIL head scores highest (distinct from its first ones), pooled with the first 3."""
    cfg = Config(**{**NESTED, "pooling": "gated", "zoom": 0.625})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calls: list[int] = []
    embed = model.feature_net.forward
    model.feature_net.forward = lambda x: calls.append(len(x)) or embed(x)  # type: ignore[method-assign]
    assert model.mil is not None
    scores: list[Tensor] = []
    score = model.mil.score
    model.mil.score = lambda f: (lambda s: scores.append(s) or s)(score(f))  # type: ignore[method-assign]
    with open_slide(nested_slide) as slide, torch.no_grad():
        view = prepare_view(slide, cfg)
        counting = CountingSlide(slide)
        out = forward_batch(model, [SlideBatchItem(nested_slide, view)], cfg=cfg, reader=OpenedSlide(counting),
                            mode=mode, generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    assert counting.reads == [(16, 8 + 2 * HALO, 4.0), (3, 16, 1.0), (5, 16, 1.0)]
    assert calls == [3, 5]  # each patch embedded once
    picks = out.nested[0]  # type: ignore[index]
    owner = picks.patch_region
    assert len(owner) == 8 and len(set(owner[3:].tolist())) == 1
    assert owner[3] == owner[int(torch.argmax(scores[0]))] and len(set(out.indices[0].tolist())) == 8
    torch.testing.assert_close(out.sampled_attention[0], picks.region_attention[owner] * picks.cell_attention)


def test_gated_scores_follow_a1_under_uniform_fine_attention() -> None:
    """A region of the tissue's edge (2 allowed cells) does not outrank a full one (4) of the same a1 just because
    its a2 is spread over fewer cells; within a region the scores follow a2."""
    from wsiats.nested_pass import gated_scores

    a1 = torch.tensor([0.5, 0.3, 0.2])
    a2 = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    s = gated_scores(a1, a2)
    torch.testing.assert_close(s[0], torch.full((4,), 0.5))
    torch.testing.assert_close(s[1], torch.tensor([0.3, 0.3, 0.0, 0.0]))
    torch.testing.assert_close(s[2], 0.2 * 4 * a2[2])


def test_region_distillation_raises_a1_where_the_best_candidate_lies() -> None:
    """Three drawn regions, candidates in regions 0 and 2 only; the best score is in region 2: descent on the loss
    raises a1 there and lowers it at region 0; region 1 (no candidate) takes no part."""
    from wsiats.nested_pass import region_distillation

    logits = torch.zeros(3, requires_grad=True)
    a1 = torch.softmax(logits, 0)
    owner = torch.tensor([0, 0, 2, 2])
    scores = torch.tensor([0.1, -0.3, 2.0, 0.5])
    region_distillation(a1, owner, scores, top=1).backward()
    assert logits.grad is not None
    g = logits.grad
    assert float(g[2]) < 0 < float(g[0]) and abs(float(g[1])) < 1e-7


def test_spread_pick_takes_one_cell_a_region_first() -> None:
    """The three highest cells lie in region 0; the first stage takes the best cell of each of the 3 best regions
    instead, then (n > M) the best of what is left; drawn, the first M cells are in distinct regions too, and
    every pick is distinct and has a non-zero score."""
    from wsiats.nested_pass import spread_pick

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.5, 0.1, 0.0, 0.0], [0.0, 0.2, 0.3, 0.0]])
    regions, cells = spread_pick(scores, 3)
    assert list(zip(regions.tolist(), cells.tolist())) == [(0, 0), (1, 0), (2, 2)]
    regions, cells = spread_pick(scores, 5)
    assert list(zip(regions.tolist(), cells.tolist()))[3:] == [(0, 1), (0, 2)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        regions, cells = spread_pick(scores, 6, generator=gen)
        pairs = list(zip(regions.tolist(), cells.tolist()))
        assert sorted(regions[:3].tolist()) == [0, 1, 2] and len(set(pairs)) == 6
        assert all(float(scores[r, c]) > 0 for r, c in pairs)


def test_nested_zoom_fills_from_other_regions_when_the_best_is_short_of_cells(nested_slide: Path) -> None:
    """Regions of 2 x 2 cells, zoom 0.9 of N = 8: one patch, then the 3 other cells of its region and 4 more from
    the other regions read: still 8 distinct patches."""
    cfg = Config(**{**NESTED, "pooling": "gated", "coarse_downsample": 8.0, "zoom": 0.9})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with open_slide(nested_slide) as slide, torch.no_grad():
        view = prepare_view(slide, cfg)
        out = forward_batch(model, [SlideBatchItem(nested_slide, view)], cfg=cfg, reader=OpenedSlide(slide),
                            mode="topk")
    owner = out.nested[0].patch_region  # type: ignore[index]
    assert len(set(out.indices[0].tolist())) == 8 and int((owner == owner[0]).sum()) == 4


@pytest.mark.parametrize("downsample", [1.0, 2.0, 3.0])
def test_read_patch_groups_gives_the_pixels_of_read_patches(nested_slide: Path, downsample: float) -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 6, size=40)
    centers = rng.uniform(-20, 530, size=(6, 2))[groups] + rng.uniform(-30, 30, size=(40, 2))  # clustered: one read
    centers[groups == 5] = rng.uniform(-20, 530, size=(int((groups == 5).sum()), 2))  # spread: patch by patch
    with open_slide(nested_slide) as slide:
        want = slide.read_patches(centers, 24, downsample=downsample)
        got = slide.read_patch_groups(centers, groups, 24, downsample=downsample, workers=2)
    np.testing.assert_array_equal(got, want)


def test_predict_json_shows_both_levels(nested_slide: Path, tmp_path: Path) -> None:
    from wsiats.predict import Predictor, write_predictions

    cfg = Config(**NESTED)
    cfg.save(tmp_path / "config.yaml")
    save_weights(build_model(cfg), tmp_path / MODEL_FILE)
    predictor = Predictor(tmp_path, device="cpu", workers=1, mc=2)
    (pred,) = predictor.predict([nested_slide])
    assert pred.ok, pred.error
    write_predictions(tmp_path / "p.json", [pred], cfg.classes)
    rec = json.loads((tmp_path / "p.json").read_text())["slides"][0]
    assert len(rec["regions"]) == 8 and len(rec["patches"]) == 16  # 2 passes of 4 regions and 8 patches
    for patch in rec["patches"]:
        region = rec["regions"][patch["region"]]
        assert region["pass"] == patch["pass"]
        assert region["x"] <= patch["x"] + 8 < region["x"] + region["width"]
        assert patch["attention"] == pytest.approx(region["attention"] * patch["cell_attention"])
    assert [r["patches"] for r in rec["regions"]] == [2] * 8


@pytest.mark.parametrize("pooling", [["--pooling", "ats", "--candidates", "0", "--zoom", "0"],
                                     ["--candidates", "16", "--train-patches", "4"]], ids=["ats", "gated"])
def test_train_and_predict_nested_through_the_cli(tmp_path: Path, pooling: list[str]) -> None:
    """A tiny end-to-end run at both levels, with the paper's estimator and with gated pooling (training
    with candidates): synth -> train -> predict."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from wsiats.cli import cli

    def invoke(*args: object) -> str:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke("synth", tmp_path, "--n", "4", "--size", "1024", "--seed", "3", "-q")
    run = tmp_path / "run"
    invoke("train", tmp_path / "slides", "--labels", tmp_path / "labels.csv", "--out", run, "--epochs", "1",
           "--nested", *pooling, "--view-downsample", "16",
           "--coarse-downsample", "128", "--regions", "2", "--n-patches", "4", "--patch-size", "32",
           "--batch-size", "2", "--workers", "0", "-q")
    assert any(k.startswith("coarse_net.") for k in load_file(str(run / MODEL_FILE)))
    out = tmp_path / "pred.json"
    invoke("predict", tmp_path / "slides", "--model", run, "--out", out, "-q")
    slides = json.loads(out.read_text())["slides"]
    read = 2 if "ats" in pooling else 2 * GATED_REGIONS  # gated pooling reads 4M regions and picks among them
    assert len(slides) == 4 and all(s["error"] == "" and len(s["regions"]) == read and len(s["patches"]) == 4
                                    for s in slides)


@pytest.mark.parametrize("pooling", ["ats", "gated"])
def test_heatmap_of_a_nested_model_shows_regions_and_patches(nested_slide: Path, tmp_path: Path, pooling: str) -> None:
    from wsiats.heatmap import heatmap_slides

    cfg = Config(**{**NESTED, "pooling": pooling})
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    save_weights(build_model(cfg), run / MODEL_FILE)
    (result,) = heatmap_slides([nested_slide], run, tmp_path / "maps", top=3, device="cpu")
    assert not result.error, result.error
    doc = json.loads((tmp_path / "maps" / "slide.geojson").read_text())
    names = [f["properties"]["name"].split()[0] for f in doc["features"]]
    assert names[:3] == ["region"] * 3 and set(names[3:]) == {"patch"} and len(names) > 3
    for f in doc["features"][3:]:
        m = f["properties"]["measurements"]
        assert m["attention"] == pytest.approx(m["cell_attention"] * m["region_attention"])
