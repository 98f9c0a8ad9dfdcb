"""The training procedure for sparse evidence (forward_batch modes 'explore' and zoom) on a small slide."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import _slides
from wsiats import mil
from wsiats.config import Config
from wsiats.models import ATSModel
from wsiats.forward import SlideBatchItem, forward_batch, zoom_cells
from wsiats.loss import loss_fn
from wsiats.reader import SlidePool
from wsiats.view import prepare_view


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("explore") / "tissue.tif"
    _slides.write_generic_pyramid(path, _slides.tissue_image(512, 512, seed=2), n_levels=2, tile=64, mpp=0.5)
    return path


def _cfg(**kw: object) -> Config:
    base: dict[str, object] = dict(view_downsample=16.0, patch_size=16, n_patches=4, tissue_mask=False,
                                   candidates=40, train_patches=6)
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


def _setup(cfg: Config, path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8, pooling="gated")
    pool = SlidePool()
    view = prepare_view(pool.get(path), cfg)
    view.explore = mil.exploration_prior(view.image, view.mask)
    return model, pool, view


def test_explore_embeds_candidates_and_trains_on_the_highest_scores(slide_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg()
    model, pool, view = _setup(cfg, slide_path)
    try:
        out = forward_batch(model, [SlideBatchItem(slide_path, view)] * 2, cfg=cfg, reader=pool, mode="explore",
                            generator=torch.Generator().manual_seed(1))
        loss, _ = loss_fn(out, torch.tensor([0, 1]), cfg=cfg, weight=None)
        loss.backward()
    finally:
        pool.close()
    for idx, w in zip(out.indices, out.weights):
        assert len(idx) == 6 and len(set(idx.tolist())) == 6  # train_patches distinct cells
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    assert out.distill is not None and out.distill.shape == (2,) and torch.isfinite(out.distill).all()
    # the attention network learns from the distillation target, the MIL head and features from the loss
    for part in (model.attention_net, model.mil, model.feature_net, model.classifier):
        assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in part.parameters())


def test_loss_adds_the_instance_loss_of_each_slide_through_the_classifier(slide_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(instance_weight=0.5)
    model, pool, view = _setup(cfg, slide_path)
    try:
        out = forward_batch(model, [SlideBatchItem(slide_path, view)] * 2, cfg=cfg, reader=pool, mode="explore",
                            generator=torch.Generator().manual_seed(1))
    finally:
        pool.close()
    y = torch.tensor([0, 1])
    assert out.features is not None and [tuple(f.shape) for f in out.features] == [(6, 8), (6, 8)]
    without, ce = loss_fn(out, y, cfg=cfg, weight=None)
    with_inst, ce2 = loss_fn(out, y, cfg=cfg, weight=None, classifier=model.classifier)
    expected = sum(mil.instance_loss(model.classifier(f), t) for f, t in zip(out.features, (0, 1))) / 2
    assert torch.isclose(with_inst - without, 0.5 * expected) and torch.equal(ce, ce2) and expected > 0
    off = _cfg(instance_weight=0.0)
    assert torch.isclose(loss_fn(out, y, cfg=off, weight=None, classifier=model.classifier)[0], without)


def test_explore_keeps_the_candidates_with_the_highest_instance_scores(slide_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With select_random 0 the gradient pass gets exactly the top train_patches candidates by instance score."""
    cfg = _cfg(candidates=30, train_patches=5, select_random=0.0)
    model, pool, view = _setup(cfg, slide_path)
    seen: dict[str, torch.Tensor] = {}
    real = mil.select_informative

    def spy(scores: torch.Tensor, n: int) -> torch.Tensor:
        seen["scores"], seen["keep"] = scores, real(scores, n)
        return seen["keep"]

    monkeypatch.setattr(mil, "select_informative", spy)
    try:
        with torch.no_grad():
            out = forward_batch(model, [SlideBatchItem(slide_path, view)], cfg=cfg, reader=pool, mode="explore",
                                generator=torch.Generator().manual_seed(2))
            feats = model.feature_net(torch.from_numpy(pool.get(slide_path).read_patches(
                np.stack([(out.boxes[0][:, 0] + 8.0), (out.boxes[0][:, 1] + 8.0)], 1), 16)).permute(0, 3, 1, 2))
    finally:
        pool.close()
    assert len(seen["scores"]) == 30
    top = torch.sort(seen["scores"], descending=True).values[:5]
    torch.testing.assert_close(model.mil.score(feats), top, rtol=1e-4, atol=1e-4)


def test_explore_needs_gated_pooling(slide_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(pooling="ats", candidates=0)
    model = ATSModel(n_classes=2, feature_dim=8, pooling="ats")
    view = prepare_view(SlidePool().get(slide_path), cfg)
    with pytest.raises(ValueError, match="mode 'explore' needs a model with gated pooling"):
        forward_batch(model, [SlideBatchItem(slide_path, view)], cfg=cfg, reader=SlidePool(), mode="explore")


def test_zoom_draws_the_rest_around_the_most_telling_patch(slide_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(n_patches=8, zoom=0.5)
    model, pool, view = _setup(cfg, slide_path)
    w = view.image.shape[1]
    try:
        with torch.no_grad():
            out = forward_batch(model, [SlideBatchItem(slide_path, view)], cfg=cfg, reader=pool,
                                generator=torch.Generator().manual_seed(3))
            first = out.indices[0][:4]
            tiles = torch.from_numpy(pool.get(slide_path).read_patches(
                out.boxes[0][:4, :2] + 8.0, 16)).permute(0, 3, 1, 2)
            best = int(first[int(torch.argmax(model.mil.score(model.feature_net(tiles))))])
    finally:
        pool.close()
    idx = out.indices[0]
    assert len(idx) == 8 and len(set(idx.tolist())) == 8
    r0, c0 = divmod(best, w)
    radius = 1  # one patch (16 px) at view downsample 16
    for cell in idx[4:]:
        r, c = divmod(int(cell), w)
        assert abs(r - r0) <= radius and abs(c - c0) <= radius


def test_zoom_cells_excludes_taken_and_fills_from_elsewhere() -> None:
    att = torch.full((1, 25), 1 / 25)
    taken = torch.tensor([[12, 0]])
    g = torch.Generator().manual_seed(0)
    near = zoom_cells(att, taken, 12, (5, 5), 1, 8, generator=g)  # the 3x3 square holds 8 cells besides 12
    assert sorted(near[0].tolist()) == [6, 7, 8, 11, 13, 16, 17, 18]
    more = zoom_cells(att, taken, 12, (5, 5), 1, 12, generator=g)
    cells = more[0].tolist()
    assert len(set(cells)) == 12 and 12 not in cells and 0 not in cells
    assert set([6, 7, 8, 11, 13, 16, 17, 18]) <= set(cells)
    zero_outside = att.clone()
    zero_outside[0, [1, 2, 3, 4]] = 0.0
    few = zoom_cells(zero_outside, taken, 0, (5, 5), 1, 10, generator=g)  # square around cell 0: 1, 5, 6
    assert set(few[0].tolist()) >= {5, 6} and 1 not in few[0].tolist()


def test_zoom_cells_draw_follows_the_attention_inside_the_square() -> None:
    """The first cell zoom draws is distributed as the attention restricted to the square around `best`,
    taken cells excluded (frequencies over many draws); without a generator: the square's top cells."""
    att = torch.rand((1, 49), generator=torch.Generator().manual_seed(1)) + 0.05
    att[0, 24 - 7] = 0.0  # a zero-attention cell inside the square is never drawn
    att = att / att.sum()
    taken = torch.tensor([[24, 3]])  # the centre (taken) and a cell outside the square
    square = [r * 7 + c for r in range(2, 5) for c in range(2, 5) if r * 7 + c not in (24, 17)]
    p = att[0, square] / att[0, square].sum()
    g = torch.Generator().manual_seed(2)
    draws = 4000
    counts = np.bincount([int(zoom_cells(att, taken, 24, (7, 7), 1, 1, generator=g)[0, 0]) for _ in range(draws)],
                         minlength=49)
    assert counts[[i for i in range(49) if i not in square]].sum() == 0
    se = np.sqrt(p.numpy() * (1 - p.numpy()) / draws)
    assert np.all(np.abs(counts[square] / draws - p.numpy()) <= 5 * se)
    top = zoom_cells(att, taken, 24, (7, 7), 1, 3)[0].tolist()
    assert top == [square[i] for i in torch.topk(p, 3).indices.tolist()]


def test_old_runs_without_pooling_load_as_the_ats_estimator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from wsiats.run import RunFolder

    cfg = Config(classes=["a", "b"]).to_dict()
    for key in ("pooling", "candidates", "zoom"):
        cfg.pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    loaded = RunFolder(tmp_path).load_config()
    assert (loaded.pooling, loaded.candidates, loaded.zoom) == ("ats", 0, 0.0)


def test_explore_with_every_cell_a_candidate_is_ips_over_the_whole_view(slide_path) -> None:  # type: ignore[no-untyped-def]
    """The consistency claim of the training estimator: with M >= K candidates (every cell), the
    pooled representation is exactly gated attention pooling over the top-T patches of the whole
    view by instance score (the IPS objective), whatever the draw."""
    cfg = _cfg(candidates=65536, train_patches=7, n_patches=3, select_random=0.0)
    model, pool, view = _setup(cfg, slide_path)
    h, w = view.image.shape[:2]
    from wsiats.view import cell_centers

    try:
        with torch.no_grad():
            outs = [forward_batch(model, [SlideBatchItem(slide_path, view)], cfg=cfg, reader=pool, mode="explore",
                                  generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
            every = pool.get(slide_path).read_patches(cell_centers(np.arange(h * w), (h, w), view.downsample), 16)
            f = model.feature_net(torch.from_numpy(every).permute(0, 3, 1, 2))
            top = torch.topk(model.mil.score(f), 7).indices
            z, _ = model.mil(f[top])
            want = model.classifier(z[None])
    finally:
        pool.close()
    for out in outs:
        assert sorted(out.indices[0].tolist()) == sorted(top.tolist())
        torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-5)


def test_spread_cells_keeps_distinct_places_the_attention_points_to() -> None:
    """Far-apart cells first, but only where the attention is at least uniform; the tail is not taken for
    being far away: the rest come in draw order (here top-k order) from the places already found."""
    from wsiats.forward import spread_cells

    h, w = 10, 10
    att = torch.full((h, w), 0.1 / 96)  # background: below the uniform level 1/100
    att[0, 0:2] = att[9, 8:10] = 0.9 / 4  # two places of two cells each
    att = (att / att.sum()).reshape(1, -1)
    cells = spread_cells(att, 4, (h, w), 3)[0].tolist()  # deterministic (top-k)
    assert len(set(cells)) == 4
    assert set(cells) == {0, 1, 98, 99}  # both places, then their other cells: no background
    firsts = {divmod(c, w)[0] for c in cells[:2]}
    assert firsts == {0, 9}  # the first two are one of each place
    # near-uniform attention: every cell is at the uniform level, so the cells are spread as before
    flat = torch.full((1, h * w), 1.0 / (h * w))
    spread = spread_cells(flat, 4, (h, w), 3)[0].tolist()
    pts = [divmod(c, w) for c in spread]
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 3 for i, a in enumerate(pts) for b in pts[:i])


def test_explore_embeds_and_passes_identical_patches_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without a tissue mask, a slide that is mostly blank gives many identical candidates: they are
    embedded once, and the gradient pass holds distinct patches only (the blank one at most once)."""
    image = np.full((512, 512, 3), 0, np.uint8)
    image[192:320, 192:320] = _slides.tissue_image(128, 128, seed=4)
    path = tmp_path / "mostly_blank.tif"
    _slides.write_generic_pyramid(path, image, n_levels=2, tile=64, mpp=0.5)
    cfg = _cfg(candidates=200, train_patches=40)
    model, pool, view = _setup(cfg, path)
    embedded: list[int] = []
    hook = model.feature_net.register_forward_hook(lambda _m, args, _o: embedded.append(len(args[0])))
    try:
        out = forward_batch(model, [SlideBatchItem(path, view)], cfg=cfg, reader=pool, mode="explore",
                            generator=torch.Generator().manual_seed(5))
        slide = pool.get(path)
        boxes = out.boxes[0]
        tiles = slide.read_patches(boxes[:, :2] + 8.0, 16)
        every = slide.read_patches(np.stack(np.meshgrid(np.arange(8, 512, 16.0), np.arange(8, 512, 16.0)), -1)
                                   .reshape(-1, 2), 16)
    finally:
        hook.remove()
        pool.close()
    flat = tiles.reshape(len(tiles), -1)
    assert len({row.tobytes() for row in flat}) == len(flat)  # no two passed patches alike
    assert (flat.max(1) == 0).sum() <= 1
    # candidates were embedded after dropping duplicates: fewer than drawn, and the pass is all of them
    # when fewer distinct candidates than train_patches exist
    assert embedded[0] < 200 and embedded[1] == len(flat) == min(40, embedded[0])
    assert (every.reshape(len(every), -1).max(1) == 0).sum() > 600  # the slide is mostly blank


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_zoomed_inference_embeds_each_patch_once(slide_path, mode) -> None:  # type: ignore[no-untyped-def]
    """At inference the features of the first patches, embedded to choose where to zoom, are the ones
    pooled: the feature network sees each of the N patches once, and the logits are those of the N."""
    cfg = _cfg(n_patches=8, zoom=0.5)
    model, pool, view = _setup(cfg, slide_path)
    model.eval()
    calls: list[int] = []
    hook = model.feature_net.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    try:
        with torch.no_grad():
            out = forward_batch(model, [SlideBatchItem(slide_path, view)] * 2, cfg=cfg, reader=pool, mode=mode,
                                generator=torch.Generator().manual_seed(3))
            hook.remove()
            expected = []
            for b in out.boxes:
                tiles = torch.from_numpy(pool.get(slide_path).read_patches(b[:, :2] + 8.0, 16)).permute(0, 3, 1, 2)
                expected.append(model.classifier(model.mil(model.feature_net(tiles))[0]))
    finally:
        hook.remove()
        pool.close()
    assert calls == [4, 4, 8]  # the first 4 of each slide, then both slides' last 4 together
    torch.testing.assert_close(out.logits, torch.stack(expected), rtol=1e-4, atol=1e-5)
