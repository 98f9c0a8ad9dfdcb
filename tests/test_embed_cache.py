"""The embedding cache of a frozen feature network (`wsiats.embed_cache`) and its use in the forward pass."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import _slides
from wsiats.config import Config
from wsiats.embed_cache import EmbeddingCache, embed_patches, patch_keys
from wsiats.models import ATSModel
from wsiats.forward import SlideBatchItem, forward_batch
from wsiats.reader import SlidePool
from wsiats.view import Augment, prepare_view

CPU = torch.device("cpu")


class _Counting(nn.Module):
    """A feature net that counts the patches it embeds (and can be slow, like a ViT on a CPU)."""

    def __init__(self, net: nn.Module, delay_s: float = 0.0) -> None:
        super().__init__()
        self.net, self.out_dim, self.delay_s, self.embedded = net, net.out_dim, delay_s, 0  # type: ignore[assignment]

    def forward(self, patches: Tensor) -> Tensor:
        self.embedded += len(patches)
        if self.delay_s:
            time.sleep(self.delay_s * len(patches))
        return self.net(patches)


def _model(*, cache_mb: float = 16, freeze: bool = True, delay_s: float = 0.0) -> ATSModel:
    torch.manual_seed(0)
    model = ATSModel(n_classes=2, feature_dim=8, freeze_features=freeze, feature_cache_mb=cache_mb)
    model.feature_net = _Counting(model.feature_net, delay_s)  # type: ignore[assignment]
    return model


def _keys(cells: list[int], **kw: object) -> list[tuple[object, ...]]:
    args: dict[str, object] = dict(slide="a.tif", view_downsample=(32.0, 32.0), patch_size=16, patch_downsample=1.0,
                                   augment=Augment())
    args.update(kw)
    return patch_keys(args.pop("slide"), np.array(cells), **args)  # type: ignore[arg-type]


def test_keys_tell_apart_slide_cell_patch_settings_and_augmentation() -> None:
    base = _keys([3])[0]
    assert _keys([3])[0] == base and hash(_keys([3])[0]) == hash(base)
    for other in (_keys([4]), _keys([3], slide="b.tif"), _keys([3], patch_size=32), _keys([3], patch_downsample=2.0),
                  _keys([3], view_downsample=(16.0, 16.0)), _keys([3], augment=Augment(flip_h=True)),
                  _keys([3], augment=Augment(brightness=0.05))):
        assert other[0] != base


def test_second_pass_is_served_from_the_cache() -> None:
    model = _model()
    patches = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    keys = _keys([0, 1, 2, 3, 4])
    first = embed_patches(model, patches, keys, device=CPU)
    assert model.feature_net.embedded == 5  # type: ignore[union-attr]
    again = embed_patches(model, patches, keys, device=CPU)
    assert model.feature_net.embedded == 5  # type: ignore[union-attr]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # partly new: only the new cells are embedded, in their places
    mixed = embed_patches(model, patches[[4, 0]].flip(-1), _keys([4, 9]), device=CPU)
    assert model.feature_net.embedded == 6  # type: ignore[union-attr]
    torch.testing.assert_close(mixed[0], first[4], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mixed[1], model.feature_net(patches[[0]].flip(-1))[0])
    stats = model.embed_cache.take_stats()  # type: ignore[union-attr]
    assert (stats.hits, stats.misses, stats.entries) == (6, 6, 6) and stats.hit_rate == 0.5
    assert model.embed_cache.take_stats().hits == 0  # type: ignore[union-attr]  # reset


def test_frozen_features_run_without_gradient_in_eval_mode() -> None:
    model = _model()
    model.train()
    assert not model.feature_net.training and model.attention_net.training
    feats = embed_patches(model, torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), _keys([0, 1]), device=CPU)
    assert not feats.requires_grad and feats.dtype == torch.float32


def test_a_trainable_feature_net_is_never_cached() -> None:
    model = _model(freeze=False)
    assert model.embed_cache is None
    patches = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for _ in range(2):
        feats = embed_patches(model, patches, _keys([0, 1]), device=CPU)
    assert model.feature_net.embedded == 4 and feats.requires_grad  # type: ignore[union-attr]


def test_memory_is_bounded_least_recently_used_out() -> None:
    dim = 256  # 1 KiB of float32 + the entry overhead a key
    cache = EmbeddingCache(max_mb=10 * (dim * 4 + 400) / 2**20)
    cache.store(_keys(list(range(8))), torch.randn(8, dim))
    cache.lookup(_keys([0]))  # 0 is now the most recently used
    cache.store(_keys([8, 9, 10]), torch.randn(3, dim))
    assert len(cache) == 10 and cache.nbytes <= cache.max_bytes
    found = cache.lookup(_keys(list(range(11))))
    assert [f is not None for f in found] == [True, False] + [True] * 9
    assert EmbeddingCache(max_mb=0).max_bytes == 0
    with pytest.raises(ValueError, match="max_mb"):
        EmbeddingCache(max_mb=-1)


def test_stored_rows_do_not_keep_the_batch_alive() -> None:
    cache = EmbeddingCache(max_mb=1)
    batch = torch.randn(4, 8)
    cache.store(_keys([0, 1, 2, 3]), batch)
    (row,) = cache.lookup(_keys([2]))
    assert row is not None and row.base is None and row.nbytes == 8 * 4


def test_speedup_is_estimated_from_the_time_per_embedded_patch() -> None:
    model = _model(delay_s=0.01)
    patches = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    keys = _keys([0, 1, 2, 3])
    for _ in range(4):
        embed_patches(model, patches, keys, device=CPU)
    stats = model.embed_cache.take_stats()  # type: ignore[union-attr]
    assert stats.hit_rate == 0.75
    assert stats.seconds_per_patch >= 0.01
    assert stats.speedup > 2.0  # 16 patches' worth of feature passes for the price of 4 (+ look-ups)
    assert math.isnan(EmbeddingCache(1).take_stats().speedup)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> _slides.Generated:
    path = tmp_path_factory.mktemp("tiny") / "tiny.tif"
    image = _slides.tissue_image(256, 256, seed=5)
    return _slides.Generated(path, _slides.write_generic_pyramid(path, image, n_levels=2, tile=64, mpp=0.5), 0.5)


def test_forward_batch_with_the_cache_equals_the_plain_pass(tiny: _slides.Generated) -> None:
    cfg = Config(view_downsample=32.0, patch_size=32, n_patches=4, tissue_mask=False)
    cached, plain = _model(), _model(cache_mb=0)
    plain.load_state_dict(cached.state_dict())
    pool = SlidePool()
    try:
        view = prepare_view(pool.get(tiny.path), cfg)
        outs = {}
        for name, model in (("cached", cached), ("plain", plain)):
            for k, aug in enumerate((Augment(), Augment(), Augment(flip_h=True))):
                gen = torch.Generator().manual_seed(1)
                outs[name, k] = forward_batch(model, [SlideBatchItem(tiny.path, view, aug)], cfg=cfg, reader=pool,
                                              generator=gen)
    finally:
        pool.close()
    for k in range(3):
        torch.testing.assert_close(outs["cached", k].logits, outs["plain", k].logits)
    # pass 2 repeats pass 1's cells (same generator, same weights): all hits; the flipped pass is new
    assert cached.feature_net.embedded == 8 and plain.feature_net.embedded == 12  # type: ignore[union-attr]
    # the attention still gets gradients through the estimator
    outs["cached", 1].logits.sum().backward()
    assert cached.attention_net.net[0].weight.grad is not None


def test_training_reports_hit_rate_and_speedup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the CLI: the epoch lines, the log and metrics.csv carry the hit rate and the speed-up."""
    from click.testing import CliRunner

    from wsiats.cli import cli
    from wsiats.synth import make_cohort

    labels = make_cohort(tmp_path / "cohort", n=4, size=1024, seed=2, test_fraction=0)
    # a 2 x 2 view and 4 patches a slide: epoch 2 meets exactly the cells epoch 1 embedded
    args = ["train", labels.parent / "slides", "--labels", labels, "--out", tmp_path / "run", "--epochs", "2",
            "--batch-size", "2", "--n-patches", "4", "--patch-size", "32", "--view-downsample", "512",
            "--no-tissue-mask", "--workers", "0", "--val-fraction", "0", "--freeze-features", "--no-augment", "-q"]
    with caplog.at_level(logging.INFO, logger="wsiats.train"):
        result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["feature_cache_hit_rate"]) for r in rows] == [0.0, 1.0]
    assert float(rows[1]["feature_cache_speedup"]) > 1.0
    lines = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert len(lines) == 2
    assert lines[1].startswith("epoch 2: feature cache hit rate 1.000 (16 of 16 patches), feature passes ")
    assert lines[1].endswith("x faster (estimated), 16 embeddings in 0.0 MB")
    result = CliRunner().invoke(cli, [str(a) for a in args[:-1] + ["--out", tmp_path / "run2"]])
    epoch_lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert "feature cache 0% hits (" in epoch_lines[0] and "feature cache 100% hits (" in epoch_lines[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_embeddings_on_cuda_in_bfloat16() -> None:
    """On CUDA: pinned patches, bfloat16 autocast, features back on the GPU as float32, cache rows on the CPU."""
    from wsiats.runtime import autocast_factory

    cuda = torch.device("cuda")
    model = _model().to(cuda)
    patches = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    auto = autocast_factory(cuda, True)
    first = embed_patches(model, patches, _keys([0, 1, 2, 3]), device=cuda, autocast=auto)
    again = embed_patches(model, patches, _keys([0, 1, 2, 3]), device=cuda, autocast=auto)
    assert first.device.type == "cuda" and first.dtype == torch.float32
    torch.testing.assert_close(again, first)
    assert model.feature_net.embedded == 4  # type: ignore[union-attr]
