"""The forward pass of `wsiats.forward`: geometry, masks, inference modes, and unbiased gradients.

The central check is end to end: on a slide small enough that every patch can be embedded,
the mean over many sampled passes of the parameter gradients matches the gradient of the full
model sum_i a_i f(P_i), within Monte-Carlo error, while plain autograd of the same
without-replacement formula does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import _slides
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from wsiats import sampling
from wsiats.checkpoint import build_model
from wsiats.config import Config
from wsiats.forward import SlideBatchItem, forward_batch
from wsiats.models import ATSModel
from wsiats.reader import PatchReader, SlidePool
from wsiats.runtime import autocast_factory
from wsiats.slide import Slide, open_slide, patch_box
from wsiats.view import Augment, PreparedView, cell_centers, patch_boxes, prepare_view

#: The tiny slide: 256 x 256 px, view downsample 32 -> 8 x 8 = 64 cells, 32 px patches at level 0.
TINY_SIZE, TINY_VIEW_DS, TINY_PATCH = 256, 32.0, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> _slides.Generated:
    """A 256 x 256 lossless 2-level pyramid of tissue-like texture."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.tif"
    image = _slides.tissue_image(TINY_SIZE, TINY_SIZE, seed=5)
    levels = _slides.write_generic_pyramid(path, image, n_levels=2, tile=64, mpp=0.5)
    return _slides.Generated(path, levels, 0.5)


def _cfg(**kw: object) -> Config:
    base: dict[str, object] = dict(view_downsample=TINY_VIEW_DS, patch_size=TINY_PATCH, n_patches=3, tissue_mask=False)
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


# --- a patch reader that serves every patch from memory ---------------------------------------------------------


class _CachedReader:
    """A `PatchReader` of one slide for `forward_batch`: the patches at the view's cell centres, read once."""

    def __init__(self, slide: Slide, centers: np.ndarray, size: int) -> None:
        self.path, self.size = slide.path, size
        self.patches = slide.read_patches(centers, size)
        self._index = {(float(x), float(y)): i for i, (x, y) in enumerate(centers)}

    def patch_downsample(self, path: Path, cfg: Config) -> float:
        assert path == self.path and cfg.patch_mpp is None
        return cfg.patch_downsample

    def read(self, path: Path, centers: np.ndarray, size: int, *, downsample: float,
             workers: int | None = None) -> np.ndarray:
        assert path == self.path and size == self.size and downsample == 1.0
        return self.patches[[self._index[(float(x), float(y))] for x, y in centers]]

    def read_groups(self, path: Path, centers: np.ndarray, groups: np.ndarray, size: int, *, downsample: float,
                    workers: int | None = None) -> np.ndarray:
        return self.read(path, centers, size, downsample=downsample)


# --- the full model and the Monte-Carlo estimates of its gradient -------------------------------------------------


@dataclass
class _Full:
    """The model, its view and every patch, and the gradients of the full (all-cells) model."""

    model: ATSModel
    view: PreparedView
    item: SlideBatchItem
    reader: _CachedReader
    logits: Tensor  # [C] of the full model
    v: Tensor  # [C] dCE/dlogits at the full model: <v, logits> has the CE gradient there
    grads: dict[str, Tensor]  # per parameter name, the gradient of the full model's CE loss


def _group(name: str) -> str:
    return name.split(".")[0]  # attention_net, feature_net or classifier


def _full_logits(model: ATSModel, view: PreparedView, patches: np.ndarray, eps: float) -> Tensor:
    """g(sum_i a_i f(P_i)) over all K cells of the view: no sampling at all."""
    image = torch.from_numpy(view.image).permute(2, 0, 1)[None]
    mask = torch.from_numpy(view.mask).reshape(1, -1)
    a = sampling.smooth_attention(model.attention_net(image).float(), mask=mask, eps=eps)
    f = model.feature_net(torch.from_numpy(patches).permute(0, 3, 1, 2))
    return model.classifier(a @ f)[0]


@pytest.fixture(scope="module")
def full(tiny: _slides.Generated) -> _Full:
    cfg = _cfg()
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8)
    with open_slide(tiny.path) as slide:
        view = prepare_view(slide, cfg)
        h, w = view.image.shape[:2]
        assert (h, w) == (8, 8) and view.mask.all()
        cached = _CachedReader(slide, cell_centers(np.arange(h * w), (h, w), view.downsample), TINY_PATCH)
    with torch.no_grad():
        model.attention_net.net[-1].weight.mul_(3.0)  # attention visibly non-uniform (max/min a ~ 2)
        f = model.feature_net(torch.from_numpy(cached.patches).permute(0, 3, 1, 2))
        # Classifier rows +-u, u the main direction of feature variation orthogonal to the mean feature:
        # the score-function noise scales with <W^T v, f_i>, and this keeps it centred (test power, not bias).
        mean = f.mean(0) / f.mean(0).norm()
        u = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]
        u = u - (u @ mean) * mean
        u = u / u.norm() / (f @ u).std()
        model.classifier.weight.copy_(torch.stack([u, -u]))
        model.classifier.bias.zero_()
    logits = _full_logits(model, view, cached.patches, cfg.attention_eps)
    loss = F.cross_entropy(logits[None], torch.tensor([0]))
    (v,) = torch.autograd.grad(loss, logits, retain_graph=True)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    model.zero_grad()
    # every gradient is non-zero but the last attention bias's: softmax ignores a constant shift
    assert all(g.abs().max() > 0 for n, g in grads.items() if n != "attention_net.net.4.bias")
    assert grads["attention_net.net.4.bias"].abs().max() < 1e-6
    return _Full(model, view, SlideBatchItem(tiny.path, view), cached, logits.detach(), v.detach(), grads)


def _monte_carlo(full: _Full, cfg: Config, *, calls: int, batch: int,
                 seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mean and standard error over `calls` x `batch` sampled passes of the gradients of <v, logits>.

    Each call samples `batch` independent copies of the slide; the standard error comes from the
    spread of the per-call means. Keyed by parameter name, plus 'logits' for the logits themselves.
    """
    model, gen = full.model, torch.Generator().manual_seed(seed)
    per_call: dict[str, list[Tensor]] = {n: [] for n, _ in model.named_parameters()}
    per_call["logits"] = []
    for _ in range(calls):
        model.zero_grad()
        out = forward_batch(model, [full.item] * batch, cfg=cfg, reader=full.reader, generator=gen, workers=0)
        (out.logits @ full.v).sum().div(batch).backward()
        for n, p in model.named_parameters():
            per_call[n].append(p.grad.detach().clone())  # type: ignore[union-attr]
        per_call["logits"].append(out.logits.detach().mean(0))
    model.zero_grad()
    stacked = {n: torch.stack(v) for n, v in per_call.items()}
    mean = {n: s.mean(0) for n, s in stacked.items()}
    se = {n: s.std(0) / math.sqrt(calls) for n, s in stacked.items()}
    return mean, se


def _compare(mean: dict[str, Tensor], se: dict[str, Tensor], truth: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per network: relative error, and the fraction of elements with |mean - truth| > 4 SE + atol.

    atol = 1e-3 x the network's largest gradient: the last attention bias has a true gradient of
    exactly 0 (softmax is shift-invariant) and the classifier bias gradient is exactly v, so their
    'standard errors' are float32 rounding, not Monte-Carlo noise.
    """
    stats = {}
    for group in ("attention_net", "feature_net", "classifier"):
        names = [n for n in truth if _group(n) == group]
        m = torch.cat([mean[n].flatten() for n in names])
        s = torch.cat([se[n].flatten() for n in names])
        t = torch.cat([truth[n].flatten() for n in names])
        err, atol = (m - t).abs(), 1e-3 * t.abs().max()
        noisy = s > 1e-3 * atol  # leaves out the two exact-by-construction biases
        stats[group] = {
            "rel_error": float(err.norm() / t.norm()),
            "rel_se": float(s.norm() / t.norm()),
            "max_z": float((err[noisy] / s[noisy]).max()),
            "bad": float((err > 4 * s + atol).float().mean()),
        }
    return stats


@pytest.mark.parametrize("replace", [True, False], ids=["with-replacement", "without-replacement"])
def test_sampled_gradients_match_the_full_model(full: _Full, replace: bool) -> None:
    """E[grad <v, g(estimate)>] = grad of the full model's CE, v = dCE/dlogits at the full model.

    The estimate and its gradients are unbiased, so any linear function of it is too; CE of the
    estimate is not (Jensen), hence the linearisation at the full model's logits.
    """
    mean, se = _monte_carlo(full, _cfg(replace=replace), calls=60, batch=40, seed=11)
    stats = _compare(mean, se, full.grads)
    for group, s in stats.items():
        assert s["bad"] == 0.0, (group, stats)
    assert ((mean["logits"] - full.logits).abs() <= 4 * se["logits"] + 1e-5).all()  # the forward is unbiased
    # the estimate has power: the attention gradient is resolved to a few percent
    assert stats["attention_net"]["rel_se"] < 0.1 and stats["attention_net"]["rel_error"] < 0.15, stats


def test_naive_autograd_without_replacement_is_biased(full: _Full, monkeypatch: pytest.MonkeyPatch) -> None:
    """Differentiating the forward formula sum_k c_k f_k (what a plain torch port does) is biased."""
    monkeypatch.setattr(sampling, "expectation", lambda a, f, replace: sampling.estimate_topk(a, f))
    mean, se = _monte_carlo(full, _cfg(replace=False), calls=20, batch=40, seed=12)
    stats = _compare(mean, se, full.grads)
    assert stats["attention_net"]["bad"] > 0.5 and stats["attention_net"]["rel_error"] > 0.5, stats
    # its feature gradient c_k g is the unbiased one: only the attention gradient is wrong
    assert stats["feature_net"]["bad"] == 0.0 and stats["classifier"]["bad"] == 0.0, stats


class _ArrayReader:
    """A `PatchReader` over a level-0 image in memory (no file): crops of it, each read recorded."""

    def __init__(self, path: Path, image: np.ndarray) -> None:
        self.path, self.image = path, image
        self.reads: list[tuple[np.ndarray, np.ndarray]] = []  # (centres asked for, pixels served)

    def patch_downsample(self, path: Path, cfg: Config) -> float:
        return cfg.patch_downsample

    def read(self, path: Path, centers: np.ndarray, size: int, *, downsample: float,
             workers: int | None = None) -> np.ndarray:
        assert path == self.path and downsample == 1.0
        pixels = np.stack([_slides.crop(self.image, *patch_box((float(x), float(y)), size, downsample))
                           for x, y in centers])
        self.reads.append((np.array(centers), pixels))
        return pixels

    def read_groups(self, path: Path, centers: np.ndarray, groups: np.ndarray, size: int, *, downsample: float,
                    workers: int | None = None) -> np.ndarray:
        return self.read(path, centers, size, downsample=downsample)


@pytest.mark.parametrize("pooling, augment", [("ats", Augment()), ("ats", Augment(True, True, 0.05, 1.1)),
                                              ("gated", Augment(flip_h=True))])
def test_forward_batch_embeds_the_crops_its_reader_serves(pooling: str, augment: Augment) -> None:
    """The pass opens no file: a reader over an array in memory serves it, it asks for the centres of the
    cells it sampled, and what its feature network embeds is exactly those crops of the image (augmented as
    the view is). With gated pooling and zoom, the patches come in two reads (spread, then around the best)."""
    image = _slides.tissue_image(TINY_SIZE, TINY_SIZE, seed=9)
    d = int(TINY_VIEW_DS)
    small = np.ascontiguousarray(image[d // 2:: d, d // 2:: d])  # 8 x 8 view, a pixel a cell
    view = PreparedView(small, np.ones(small.shape[:2], dtype=bool), (TINY_VIEW_DS, TINY_VIEW_DS), fell_back=False)
    path = Path("nowhere") / "in-memory.tif"  # never opened
    cfg = _cfg(classes=["a", "b"], n_patches=4, pooling=pooling, candidates=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    embedded: list[Tensor] = []
    model.feature_net.register_forward_pre_hook(lambda net, args: embedded.append(args[0].detach().clone()))
    reader = _ArrayReader(path, image)
    typed: PatchReader = reader  # the protocol is all the pass needs
    with torch.no_grad():
        out = forward_batch(model, [SlideBatchItem(path, view, augment)], cfg=cfg, reader=typed,
                            generator=torch.Generator().manual_seed(3))
    assert len(reader.reads) == (2 if pooling == "gated" else 1)
    centers = np.concatenate([c for c, _ in reader.reads])
    pixels = np.concatenate([p for _, p in reader.reads])
    np.testing.assert_array_equal(centers, cell_centers(out.indices[0], (8, 8), view.downsample))
    np.testing.assert_array_equal(patch_boxes(centers, TINY_PATCH, 1.0), out.boxes[0])
    for tile, (x, y, w, h) in zip(pixels, out.boxes[0]):
        assert (w, h) == (TINY_PATCH, TINY_PATCH)
        np.testing.assert_array_equal(tile, _slides.crop(image, int(x), int(y), TINY_PATCH, TINY_PATCH))
    expected = augment.images(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    torch.testing.assert_close(embedded[-1], expected, rtol=0, atol=0)  # the pooled patches are the crops served
    assert len(out.boxes[0]) == 4


def test_cached_reader_reads_what_the_file_holds(full: _Full, tiny: _slides.Generated) -> None:
    """The in-memory reader used above is faithful: the same pass over the real file gives the same numbers."""
    cfg = _cfg(n_patches=5)
    pool = SlidePool()
    try:
        with torch.no_grad():
            a, b = (forward_batch(full.model, [full.item] * 2, cfg=cfg, reader=p,
                                  generator=torch.Generator().manual_seed(4)) for p in (full.reader, pool))
    finally:
        pool.close()
    assert [i.tolist() for i in a.indices] == [i.tolist() for i in b.indices]
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    for idx, boxes in zip(b.indices, b.boxes):
        for i, (x0, y0, w0, h0) in zip(idx, boxes):
            np.testing.assert_array_equal(full.reader.patches[i], _slides.crop(tiny.levels[0], x0, y0, w0, h0))


# --- geometry --------------------------------------------------------------------------------------------------


def test_cell_centers_and_boxes_known_values() -> None:
    centers = cell_centers(np.array([0, 13, 63]), (8, 8), (32.0, 32.0))
    np.testing.assert_array_equal(centers, [[16.0, 16.0], [176.0, 48.0], [240.0, 240.0]])  # 13 = row 1, col 5
    np.testing.assert_array_equal(patch_boxes(centers, 32, 1.0),
                                  [[0, 0, 32, 32], [160, 32, 32, 32], [224, 224, 32, 32]])
    np.testing.assert_array_equal(patch_boxes(centers, 16, 3.0),
                                  [[-8, -8, 48, 48], [152, 24, 48, 48], [216, 216, 48, 48]])
    assert patch_boxes(np.empty((0, 2)), 8, 1.0).shape == (0, 4)
    # non-square cells: x and y downsamples differ (a 301 x 517 px slide viewed at 8 x 13)
    np.testing.assert_allclose(cell_centers(np.array([12]), (13, 8), (301 / 8, 517 / 13)),
                               [[4.5 * 301 / 8, 1.5 * 517 / 13]])
    with pytest.raises(ValueError, match="outside the view"):
        cell_centers(np.array([64]), (8, 8), (32.0, 32.0))
    with pytest.raises(ValueError, match="outside the view"):
        cell_centers(np.array([-1]), (8, 8), (32.0, 32.0))


@settings(max_examples=300, deadline=None)
@given(
    W=st.integers(1, 20_000), H=st.integers(1, 20_000), ds=st.floats(2.0, 300.0),
    size=st.integers(1, 256), pds=st.sampled_from([0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]), data=st.data(),
)
def test_cell_box_roundtrip(W: int, H: int, ds: float, size: int, pds: float, data: st.DataObject) -> None:
    """View shape round(W / ds); each cell's box is centred on the cell and overlaps the image."""
    w, h = max(1, round(W / ds)), max(1, round(H / ds))  # what Slide.read_view produces
    dx, dy = W / w, H / h
    assume(dx > 1.5 and dy > 1.5)  # a box centre is within 0.75 px of the cell centre (below)
    # a cell at a border or anywhere: corners and edges are drawn often by hypothesis' integer strategy
    r = data.draw(st.sampled_from([0, h - 1]) | st.integers(0, h - 1))
    c = data.draw(st.sampled_from([0, w - 1]) | st.integers(0, w - 1))
    (cx, cy), = cell_centers(np.array([r * w + c]), (h, w), (dx, dy))
    assert cx == pytest.approx((c + 0.5) * dx) and cy == pytest.approx((r + 0.5) * dy)
    assert 0 < cx < W and 0 < cy < H
    (x0, y0, bw, bh), = patch_boxes(np.array([[cx, cy]]), size, pds)
    assert bw == bh == math.floor(size * pds + 0.5) >= 1
    # box centre = cell centre up to rounding: 0.5 px for the corner, 0.25 px for the rounded side
    bx, by = x0 + bw / 2, y0 + bh / 2
    assert abs(bx - cx) < 0.75 + 1e-9 and abs(by - cy) < 0.75 + 1e-9
    # the box overlaps the image, and the cell containing its centre is the original cell
    assert x0 < W and x0 + bw > 0 and y0 < H and y0 + bh > 0
    assert (math.floor(by / dy), math.floor(bx / dx)) == (r, c)
    # a box that fits is inside the image when its cell is far enough from the border
    if cx - size * pds / 2 >= 0.5 and cx + size * pds / 2 <= W - 0.5:
        assert 0 <= x0 and x0 + bw <= W


@pytest.mark.parametrize(("W", "H", "ds"), [(301, 517, 32.0), (517, 301, 13.7), (97, 130, 50.0)])
def test_view_cells_map_to_crops_of_the_image(tmp_path: Path, W: int, H: int, ds: float) -> None:
    """Odd sizes: read_view's shape, and every cell's lazily read patch = the crop held in memory, fill outside."""
    image = _slides.tissue_image(H, W, seed=W)
    path = tmp_path / "odd.tif"
    levels = _slides.write_generic_pyramid(path, image, n_levels=2, tile=64)
    cfg = Config(view_downsample=ds, patch_size=24, tissue_mask=False)
    with open_slide(path) as slide:
        view = prepare_view(slide, cfg)
        h, w = view.image.shape[:2]
        assert (h, w) == (max(1, round(H / ds)), max(1, round(W / ds)))
        assert view.downsample == (W / w, H / h)
        centers = cell_centers(np.arange(h * w), (h, w), view.downsample)
        for pds, level in ((1.0, 0), (2.0, 1)):
            got = slide.read_patches(centers, 24, downsample=pds)
            boxes = patch_boxes(centers, 24, pds)
            for patch, (x0, y0, bw, _) in zip(got, boxes):
                assert bw == 24 * pds
                # a stored level: a crop of it at floor(x0 / level downsample)
                sx, sy = W / levels[level].shape[1], H / levels[level].shape[0]
                want = _slides.crop(levels[level], math.floor(x0 / sx), math.floor(y0 / sy), 24, 24)
                np.testing.assert_array_equal(patch, want)
    # border cells read fill: the corner cell's box starts outside the image for 24 px patches of 32 px cells
    if ds == 32.0:
        x0, y0, _, _ = patch_boxes(centers[:1], 24, 2.0)[0]
        assert x0 < 0 and y0 < 0


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), flip_h=st.booleans(), flip_v=st.booleans(), data=st.data())
def test_unflip_inverts_the_flips(h: int, w: int, flip_h: bool, flip_v: bool, data: st.DataObject) -> None:
    aug = Augment(flip_h=flip_h, flip_v=flip_v)
    view = torch.arange(3 * h * w).reshape(3, h, w)  # every pixel distinct
    flipped = aug.images(view).reshape(3, -1)
    idx = np.array(data.draw(st.lists(st.integers(0, h * w - 1), min_size=1, max_size=10)))
    orig = aug.unflip(idx, (h, w))
    torch.testing.assert_close(flipped[:, idx], view.reshape(3, -1)[:, orig])
    np.testing.assert_array_equal(aug.unflip(orig, (h, w)), idx)  # a flip is its own inverse


class _PixelAttention(nn.Module):
    """Attention logits from each view pixel alone (darker: more), so flipping the view flips the map."""

    def forward(self, view: Tensor) -> Tensor:
        return -view.float().mean(1).flatten(1) / 16


class _Recorder(nn.Module):
    """Wraps a feature net and keeps the patches it was given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.out_dim, self.seen = net, net.out_dim, []  # type: ignore[assignment]

    def forward(self, patches: Tensor) -> Tensor:
        self.seen.append(patches.clone())
        return self.net(patches)


@pytest.mark.parametrize(("flip_h", "flip_v"), [(True, False), (False, True), (True, True)])
def test_flipped_view_reads_the_same_patches_flipped(tiny: _slides.Generated, flip_h: bool, flip_v: bool) -> None:
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8)
    model.attention_net = _PixelAttention()  # type: ignore[assignment]
    model.feature_net = _Recorder(model.feature_net)  # type: ignore[assignment]
    cfg = _cfg(n_patches=6)
    pool = SlidePool()
    try:
        view = prepare_view(pool.get(tiny.path), cfg)
        keys = np.sort(view.image.astype(np.float32).mean(2).ravel())
        assert keys[5] < keys[6]  # no tie at the top 6: the top-k set is well defined
        with torch.no_grad():
            plain = forward_batch(model, [SlideBatchItem(tiny.path, view)], cfg=cfg, reader=pool, mode="topk")
            aug = Augment(flip_h=flip_h, flip_v=flip_v)
            flipped = forward_batch(model, [SlideBatchItem(tiny.path, view, aug)], cfg=cfg, reader=pool, mode="topk")
    finally:
        pool.close()
    # the same cells of the original view, the same level-0 boxes
    np.testing.assert_array_equal(flipped.indices[0], plain.indices[0])
    np.testing.assert_array_equal(flipped.boxes[0], plain.boxes[0])
    # the attention map itself is over the flipped view
    att = plain.attention[0].reshape(8, 8)
    dims = [d for d, on in ((1, flip_h), (0, flip_v)) if on]
    torch.testing.assert_close(flipped.attention[0].reshape(8, 8), torch.flip(att, dims))
    # the patches: crops of the image at the boxes, and flipped in the flipped pass
    seen_plain, seen_flipped = model.feature_net.seen  # type: ignore[union-attr]
    for patch, (x0, y0, bw, bh) in zip(seen_plain, plain.boxes[0]):
        np.testing.assert_array_equal(patch.permute(1, 2, 0).numpy(), _slides.crop(tiny.levels[0], x0, y0, bw, bh))
    pdims = [d for d, on in ((-1, flip_h), (-2, flip_v)) if on]
    torch.testing.assert_close(seen_flipped, torch.flip(seen_plain, pdims), rtol=0, atol=0)


# --- masks ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_glass(tmp_path_factory: pytest.TempPathFactory) -> _slides.Generated:
    """256 x 512 px: glass on the left half (x < 256), textured H&E-pink tissue on the right."""
    rng = np.random.default_rng(7)
    image = np.full((256, 512, 3), 242, np.uint8)
    noise = rng.integers(-12, 13, size=(256, 256, 1))
    image[:, 256:] = np.clip(np.array([200, 110, 160]) + noise, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("half") / "half.tif"
    return _slides.Generated(path, _slides.write_generic_pyramid(path, image, n_levels=2, tile=64), None)


@pytest.mark.parametrize("replace", [True, False])
def test_masked_locations_are_never_sampled(half_glass: _slides.Generated, replace: bool) -> None:
    cfg = Config(view_downsample=16.0, patch_size=16, n_patches=8, replace=replace, tissue_mask=True)
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8)
    pool = SlidePool()
    try:
        view = prepare_view(pool.get(half_glass.path), cfg)
        assert view.image.shape[:2] == (16, 32) and not view.fell_back
        assert not view.mask[:, :15].any() and view.mask[:, 17:].all()  # glass left, tissue right
        gen = torch.Generator().manual_seed(0)
        items = [SlideBatchItem(half_glass.path, view, Augment.draw(gen)) for _ in range(16)]
        assert any(i.augment.flip_h for i in items) and any(not i.augment.flip_h for i in items)
        with torch.no_grad():
            for seed in range(12):
                out = forward_batch(model, items, cfg=cfg, reader=pool, generator=torch.Generator().manual_seed(seed))
                for item, idx, boxes, att in zip(items, out.indices, out.boxes, out.attention):
                    assert view.mask.ravel()[idx].all(), (item.augment, idx)
                    assert (boxes[:, 0] + boxes[:, 2] / 2 > 15 * 16).all()  # box centres on the tissue side
                    assert float(att.sum()) == pytest.approx(1.0)
                    shown = view.mask[:, ::-1] if item.augment.flip_h else view.mask
                    shown = shown[::-1] if item.augment.flip_v else shown
                    assert (att.reshape(16, 32)[torch.from_numpy(~shown.copy())] == 0).all()
    finally:
        pool.close()


def test_fewer_allowed_cells_than_patches(half_glass: _slides.Generated) -> None:
    """n is capped at the number of allowed cells: without replacement each is taken once."""
    cfg = Config(view_downsample=16.0, patch_size=16, n_patches=8, tissue_mask=False)
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8)
    pool = SlidePool()
    try:
        view = prepare_view(pool.get(half_glass.path), cfg)
        view.mask[:] = False
        view.mask[3, 20:25] = True  # five allowed cells
        with torch.no_grad():
            out = forward_batch(model, [SlideBatchItem(half_glass.path, view)], cfg=cfg, reader=pool,
                                generator=torch.Generator().manual_seed(0))
    finally:
        pool.close()
    assert sorted(out.indices[0].tolist()) == [3 * 32 + c for c in range(20, 25)]
    assert out.weights[0].sum().item() == pytest.approx(1.0)


def test_blank_slide_falls_back_to_the_whole_view(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    _slides.write_generic_pyramid(path, np.full((128, 192, 3), 246, np.uint8), n_levels=2, tile=64)
    warning = r"blank\.tif: no tissue found in the view \(the view is blank, every pixel about RGB 246, 246, 246\); sampling"
    with open_slide(path) as slide, pytest.warns(UserWarning, match=warning):
        view = prepare_view(slide, Config(view_downsample=16.0))
    assert view.fell_back and view.mask.shape == (8, 12) and view.mask.all()
    with open_slide(path) as slide:  # with the mask off there is nothing to fall back from
        assert not prepare_view(slide, Config(view_downsample=16.0, tissue_mask=False)).fell_back


# --- inference modes --------------------------------------------------------------------------------------------


def test_topk_is_deterministic_and_takes_the_highest_attention(full: _Full, tiny: _slides.Generated) -> None:
    cfg = _cfg(n_patches=5)
    with torch.no_grad():
        runs = [forward_batch(full.model, [full.item], cfg=cfg, reader=full.reader, mode="topk",
                              generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        runs.append(forward_batch(full.model, [full.item], cfg=cfg, reader=full.reader, mode="topk"))
    att = runs[0].attention[0]
    want = torch.argsort(att, descending=True)[:5].numpy()
    for r in runs:
        np.testing.assert_array_equal(r.indices[0], want)
        torch.testing.assert_close(r.logits, runs[0].logits, rtol=0, atol=0)
    torch.testing.assert_close(runs[0].sampled_attention[0], att[want])
    assert (np.diff(runs[0].sampled_attention[0].numpy()) <= 0).all()
    # the top-k weights are the without-replacement coefficients, summing to one
    assert runs[0].weights[0].sum().item() == pytest.approx(1.0)


def test_sample_mode_is_reproducible_with_a_seed(full: _Full) -> None:
    def run(seed: int, replace: bool) -> tuple[list[list[int]], Tensor]:
        with torch.no_grad():
            out = forward_batch(full.model, [full.item] * 3, cfg=_cfg(n_patches=4, replace=replace), reader=full.reader,
                                generator=torch.Generator().manual_seed(seed))
        return [i.tolist() for i in out.indices], out.logits

    for replace in (True, False):
        (ia, la), (ib, lb) = run(5, replace), run(5, replace)
        assert ia == ib
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        assert any(run(s, replace)[0] != ia for s in (6, 7, 8))
        if not replace:
            assert all(len(set(i)) == 4 for i in ia)
    with pytest.raises(ValueError, match="mode must be 'sample', 'topk' or 'explore', got 'best'"):
        forward_batch(full.model, [full.item], cfg=_cfg(), reader=full.reader, mode="best")


# --- CUDA -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
class TestCuda:
    """Forward and backward on the GPU with autocast and pinned host memory."""

    @pytest.mark.parametrize("replace", [True, False])
    def test_forward_backward_with_amp(self, tiny: _slides.Generated, replace: bool) -> None:
        device = torch.device("cuda")
        torch.manual_seed(0)
        model = ATSModel(n_classes=2, feature_dim=8).to(device)
        cfg = _cfg(n_patches=4, replace=replace)
        pool = SlidePool()
        try:
            view = prepare_view(pool.get(tiny.path), cfg)
            items = [SlideBatchItem(tiny.path, view, Augment(flip_h=True, brightness=0.05)),
                     SlideBatchItem(tiny.path, view)]
            out = forward_batch(model, items, cfg=cfg, reader=pool, generator=torch.Generator(device).manual_seed(0),
                                device=device, autocast=autocast_factory(device, True))
        finally:
            pool.close()
        assert out.logits.device.type == "cuda" and out.logits.dtype == torch.float32
        assert torch.isfinite(out.logits).all()
        F.cross_entropy(out.logits, torch.tensor([0, 1], device=device)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert model.attention_net.net[0].weight.grad.abs().sum() > 0  # type: ignore[union-attr]
        assert all(len(i) == 4 for i in out.indices)

    def test_matches_cpu_in_float32(self, full: _Full) -> None:
        """Without AMP, the GPU pass (pinned-memory transfer included) gives the CPU's numbers."""
        device = torch.device("cuda")
        cfg = _cfg(n_patches=4)
        with torch.no_grad():
            cpu = forward_batch(full.model, [full.item], cfg=cfg, reader=full.reader, mode="topk")
            full.model.to(device)
            try:
                gpu = forward_batch(full.model, [full.item], cfg=cfg, reader=full.reader, mode="topk", device=device)
            finally:
                full.model.to("cpu")
        np.testing.assert_array_equal(gpu.indices[0], cpu.indices[0])
        torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-4, atol=1e-4)


def test_inference_attention_runs_on_the_tissue_tiles_and_equals_the_whole_views(tmp_path: Path) -> None:
    """Without gradient the attention network runs only on the view's tiles that hold tissue (`OnTissue`), and
    the pass's attention is the whole view's (`attention_map`) to float rounding."""
    from wsiats.forward import attention_map
    from wsiats.models import AttentionNet
    from wsiats.reader import OpenedSlide

    path = tmp_path / "s.tif"
    _slides.write_generic_pyramid(path, _slides.tissue_image(1024, 1024, seed=2), n_levels=2, tile=128)
    cfg = _cfg(view_downsample=8.0, n_patches=4, pooling="ats", candidates=0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tiles: list[int] = []
    unpadded = model.attention_net.unpadded
    model.attention_net.unpadded = lambda x: tiles.append(len(x)) or unpadded(x)  # type: ignore[method-assign]
    with open_slide(path) as slide:
        view = prepare_view(slide, cfg)
        view.mask = np.zeros(view.image.shape[:2], dtype=bool)
        view.mask[40:70, 50:90] = True  # a blob of tissue: 7% of the 128^2 view
        with torch.no_grad():
            out = forward_batch(model, [SlideBatchItem(path, view)], cfg=cfg, reader=OpenedSlide(slide), mode="topk")
    assert tiles  # the blob's inner tiles took the unpadded path
    whole = attention_map(model, view, cfg)
    assert isinstance(model.attention_net, AttentionNet)
    np.testing.assert_allclose(out.attention[0].reshape(whole.shape).numpy(), whole, rtol=1e-5, atol=1e-9)
    assert bool(view.mask.reshape(-1)[out.indices[0]].all())
