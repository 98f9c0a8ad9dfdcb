"""Tests of the synthetic cohort generator: files, truth, pyramid layout, the full-resolution-only
property of the texture, determinism, streaming memory and atomic output."""

from __future__ import annotations

import csv
import json
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsiats.errors import ConfigError
from wsiats.synth import MPP, Region, level_shapes, make_cohort, make_slide

SIZE = 1024
N = 4


def _levels(path: Path) -> list[np.ndarray]:
    """Every pyramid level as an array: SubIFDs for OME-TIFF, the main IFD chain otherwise."""
    with tifffile.TiffFile(path) as tf:
        if tf.is_ome:
            return [lvl.asarray() for lvl in tf.series[0].levels]
        return [page.asarray() for page in tf.pages]


def _rows(labels: Path) -> list[dict[str, str]]:
    with open(labels, newline="") as fh:
        return list(csv.DictReader(fh))


def _spread(rgb: np.ndarray) -> np.ndarray:
    """Max minus min channel: ~0 on white glass, > 60 on pink tissue and purple regions."""
    rgb = rgb.astype(np.int16)
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def _interior(r: dict[str, int] | Region, ds: int, frac: float = 0.25) -> tuple[slice, slice]:
    """Rows and columns (at downsample ds) of the central part of a region's bounding box."""
    if isinstance(r, Region):
        r = {"x": r.x, "y": r.y, "width": r.width, "height": r.height}
    x0, x1 = r["x"] + frac * r["width"], r["x"] + (1 - frac) * r["width"]
    y0, y1 = r["y"] + frac * r["height"], r["y"] + (1 - frac) * r["height"]
    return slice(int(y0) // ds, int(y1) // ds), slice(int(x0) // ds, int(x1) // ds)


def _direction_contrast(patch: np.ndarray) -> tuple[float, float]:
    """Mean |horizontal neighbour difference| and mean |vertical neighbour difference| (grey levels)."""
    g = patch.astype(np.float64).mean(axis=-1)
    return float(np.abs(np.diff(g, axis=1)).mean()), float(np.abs(np.diff(g, axis=0)).mean())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    calls: list[tuple[int, int]] = []
    labels = make_cohort(out, n=N, size=SIZE, seed=11, ome_every=2, progress=lambda d, t: calls.append((d, t)))
    assert labels == out / "labels.csv"
    assert calls == [(i + 1, N) for i in range(N)]
    return out


@pytest.fixture(scope="module")
def truth(cohort: Path) -> dict:
    return json.loads((cohort / "truth.json").read_text())


def test_cohort_files_labels_and_splits(cohort: Path) -> None:
    rows = _rows(cohort / "labels.csv")
    with open(cohort / "labels.csv", newline="") as fh:
        assert fh.readline().strip() == "slide_id,label,split"
    assert [r["slide_id"] for r in rows] == [f"synth_{i:04d}" for i in range(N)]
    assert sorted(p.name for p in (cohort / "slides").iterdir()) == [f"synth_{i:04d}.tif" for i in range(N)]
    labels = [r["label"] for r in rows]
    assert labels.count("positive") == labels.count("negative") == N // 2
    for name in ("positive", "negative"):
        splits = [r["split"] for r in rows if r["label"] == name]
        assert splits.count("test") >= 1 and splits.count("train") >= 1
    assert {r["split"] for r in rows} == {"train", "test"}


def test_no_temporary_files_left(cohort: Path) -> None:
    leftovers = [p for p in cohort.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []


def test_truth_matches_labels_and_regions_lie_in_tissue(cohort: Path, truth: dict) -> None:
    assert truth["mpp"] == MPP == 0.25
    rows = {r["slide_id"]: r for r in _rows(cohort / "labels.csv")}
    assert set(truth["slides"]) == set(rows)
    for slide_id, info in truth["slides"].items():
        assert info["label"] == rows[slide_id]["label"]
        assert (info["width"], info["height"]) == (SIZE, SIZE)
        assert len(info["regions"]) == 3
        kind = "positive" if info["label"] == "positive" else "lookalike"
        level1 = _levels(cohort / "slides" / f"{slide_id}.tif")[1]
        boxes = []
        for r in info["regions"]:
            assert set(r) == {"x", "y", "width", "height", "kind"}
            assert r["kind"] == kind
            assert 0 <= r["x"] and r["x"] + r["width"] <= SIZE and 0 <= r["y"] and r["y"] + r["height"] <= SIZE
            assert 40 <= r["width"] <= 400 and 40 <= r["height"] <= 400
            # the whole bounding box (one level-1 pixel in from its border) is tissue or region, never glass
            box = level1[r["y"] // 4 + 1:(r["y"] + r["height"]) // 4 - 1, r["x"] // 4 + 1:(r["x"] + r["width"]) // 4 - 1]
            assert _spread(box).min() > 30, slide_id
            boxes.append((r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]))
        for i, a in enumerate(boxes):  # regions do not overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        # white glass exists, and tissue covers a fair part of the slide
        tissue = (_spread(level1) > 30).mean()
        assert 0.1 < tissue < 0.9, (slide_id, tissue)


def test_pyramid_layout_and_resolution(cohort: Path) -> None:
    for i in range(N):
        path = cohort / "slides" / f"synth_{i:04d}.tif"
        with tifffile.TiffFile(path) as tf:
            first = tf.pages.first
            assert first.tilewidth == first.tilelength == 256
            assert first.compression == tifffile.COMPRESSION.JPEG
            assert first.tags["YCbCrSubSampling"].value == (1, 1)  # no chroma subsampling of the texture
            assert first.tags["XResolution"].value == first.tags["YResolution"].value == (40000, 1)
            assert first.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            if i % 2 == 1:  # ome_every=2: slides 1 and 3
                assert tf.is_ome
                assert len(tf.pages) == 1  # reduced levels are SubIFDs, not main-chain pages
                shapes = [lvl.shape for lvl in tf.series[0].levels]
                pixels = ET.fromstring(tf.ome_metadata).find(".//{*}Pixels")
                assert pixels is not None
                assert float(pixels.get("PhysicalSizeX", 0)) == float(pixels.get("PhysicalSizeY", 0)) == MPP
            else:
                assert not tf.is_ome
                shapes = [p.shape for p in tf.pages]
                assert [int(p.subfiletype) for p in tf.pages] == [0, 1]
                assert tf.pages[1].tags["XResolution"].value == (10000, 1)  # 4x coarser
        assert shapes == [(SIZE, SIZE, 3), (SIZE // 4, SIZE // 4, 3)]


def test_level_shapes() -> None:
    assert level_shapes(1024, 1024) == [(1024, 1024, 1), (256, 256, 4)]
    assert level_shapes(4096, 4096) == [(4096, 4096, 1), (1024, 1024, 4), (256, 256, 16)]
    assert level_shapes(46000, 40000)[-1] == (179, 156, 256)
    assert [ds for *_, ds in level_shapes(12000, 9000)] == [1, 4, 16, 64]


def test_reduced_level_is_the_area_average_of_level0(cohort: Path) -> None:
    l0, l1 = (a.astype(np.float64) for a in _levels(cohort / "slides" / "synth_0000.tif"))
    avg = l0.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(1, 3))
    diff = np.abs(avg - l1)
    assert diff.mean() < 1.5  # JPEG noise only (ringing at the sharp tissue edges aside)
    assert np.percentile(diff, 95) < 5


@pytest.mark.parametrize("ds", [4, 16, 64])
def test_each_level_is_rendered_as_the_area_average_before_jpeg(ds: int) -> None:
    from wsiats.synth import _SlideModel

    model = _SlideModel(2048, 2048, positive=True, seed=4, n_regions=3, region_size=(200, 400))
    x, y, n = 512, 512, 1024  # a box holding tissue, glass and regions, away from the slide edges
    full = model.render(x, y, n, n, 1).astype(np.float64)
    avg = full.reshape(n // ds, ds, n // ds, ds, 3).mean(axis=(1, 3))
    low = model.render(x // ds, y // ds, n // ds, n // ds, ds).astype(np.float64)
    diff = np.abs(avg - low)
    if ds == 4:  # the box is a fair test: glass, tissue and a textured region all lie in it
        spread = _spread(low)
        assert (spread < 20).any() and (spread > 60).any()
        assert (np.abs(low - [145, 95, 170]).max(axis=-1) < 1).sum() > 1000
    if ds <= 16:  # exact up to rounding and the mean of the level-0 noise
        assert diff.max() <= 4.5, diff.max()
    assert diff.mean() < 1.0
    # a window of the level-0 render equals the same crop of a larger render
    assert np.array_equal(model.render(x + 37, y + 5, 100, 60, 1), full[5:65, 37:137].astype(np.uint8))


def test_texture_tells_the_classes_apart_only_at_full_resolution(cohort: Path, truth: dict) -> None:
    means: dict[str, list[np.ndarray]] = {"positive": [], "lookalike": []}
    for slide_id, info in truth["slides"].items():
        l0, l1 = _levels(cohort / "slides" / f"{slide_id}.tif")
        for r in info["regions"]:
            means[r["kind"]].append(l1[_interior(r, 4)].reshape(-1, 3).mean(axis=0))
            patch = l0[r["y"] + r["height"] // 2 - 32:, r["x"] + r["width"] // 2 - 32:][:64, :64]
            h, v = _direction_contrast(patch)
            if r["kind"] == "positive":  # checkerboard: strong contrast in both directions
                assert min(h, v) > 30 and min(h, v) / max(h, v) > 0.8, (h, v)
            else:  # stripes: strong across, none along
                assert max(h, v) > 30 and min(h, v) / max(h, v) < 0.25, (h, v)
    pos, neg = np.mean(means["positive"], axis=0), np.mean(means["lookalike"], axis=0)
    assert np.abs(pos - neg).max() < 3, (pos, neg)  # same colour at downsample 4


def test_same_seed_other_label_differs_only_at_full_resolution(tmp_path: Path) -> None:
    pos = make_slide(tmp_path / "p.tif", size=SIZE, label="positive", seed=3)
    neg = make_slide(tmp_path / "n.tif", size=SIZE, label="negative", seed=3)
    assert [(r.x, r.y, r.width, r.height) for r in pos] == [(r.x, r.y, r.width, r.height) for r in neg]
    assert {r.kind for r in pos} == {"positive"} and {r.kind for r in neg} == {"lookalike"}
    p0, p1 = (a.astype(np.int16) for a in _levels(tmp_path / "p.tif"))
    n0, n1 = (a.astype(np.int16) for a in _levels(tmp_path / "n.tif"))
    assert np.abs(p1 - n1).max() <= 2  # the downsample-4 levels are the same image (up to JPEG)
    r = pos[0]
    rows, cols = _interior(r, 1)
    assert np.abs(p0[rows, cols] - n0[rows, cols]).mean() > 30  # level 0 differs inside regions
    outside = np.ones(p0.shape[:2], bool)
    for r in pos:
        outside[max(0, r.y - 16):r.y + r.height + 16, max(0, r.x - 16):r.x + r.width + 16] = False
    assert np.abs(p0 - n0)[outside].max() <= 2  # ... and only there


def test_deterministic_in_the_seed(cohort: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_cohort(again, n=N, size=SIZE, seed=11, ome_every=2)
    for name in ("labels.csv", "truth.json", *(f"slides/synth_{i:04d}.tif" for i in range(N))):
        assert (again / name).read_bytes() == (cohort / name).read_bytes(), name
    other = tmp_path / "other"
    make_cohort(other, n=N, size=SIZE, seed=12, ome_every=2)
    assert (other / "truth.json").read_bytes() != (cohort / "truth.json").read_bytes()
    for i in range(N):
        name = f"slides/synth_{i:04d}.tif"
        assert not np.array_equal(_levels(other / name)[1], _levels(cohort / name)[1]), name


def test_non_square_slide_and_region_size(tmp_path: Path) -> None:
    regions = make_slide(tmp_path / "r.tif", size=(1280, 768), label="negative", seed=1, n_regions=2,
                         region_size=(60, 100), tile=128, quality=80)
    assert len(regions) == 2
    for r in regions:
        assert r.kind == "lookalike" and 56 <= r.width <= 104 and 56 <= r.height <= 104
        assert r.x + r.width <= 1280 and r.y + r.height <= 768
    with tifffile.TiffFile(tmp_path / "r.tif") as tf:
        assert tf.pages.first.tilewidth == 128
        assert [p.shape for p in tf.pages] == [(768, 1280, 3), (192, 320, 3)]


def test_small_cohort_rules(tmp_path: Path) -> None:
    labels = make_cohort(tmp_path / "c5", n=5, size=256, seed=0, ome_every=0, test_fraction=0.25)
    rows = _rows(labels)
    assert sorted(r["label"] for r in rows) == ["negative"] * 3 + ["positive"] * 2
    for name in ("positive", "negative"):
        assert [r["split"] for r in rows if r["label"] == name].count("test") == 1
    for p in (tmp_path / "c5" / "slides").iterdir():
        with tifffile.TiffFile(p) as tf:
            assert not tf.is_ome
    rows = _rows(make_cohort(tmp_path / "c2", n=2, size=256, seed=0, test_fraction=0.0))
    assert sorted(r["label"] for r in rows) == ["negative", "positive"]
    assert {r["split"] for r in rows} == {"train"}


def test_bad_arguments_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="label 'maybe'"):
        make_slide(tmp_path / "x.tif", size=512, label="maybe", seed=0)
    with pytest.raises(ConfigError, match="at least 256"):
        make_slide(tmp_path / "x.tif", size=100, label="positive", seed=0)
    with pytest.raises(ConfigError, match="multiple of 16"):
        make_slide(tmp_path / "x.tif", size=512, label="positive", seed=0, tile=100)
    with pytest.raises(ConfigError, match="n=1"):
        make_cohort(tmp_path / "c", n=1, size=512, seed=0)
    with pytest.raises(ConfigError, match="seed=-1"):
        make_cohort(tmp_path / "c", n=4, size=512, seed=-1)
    with pytest.raises(ConfigError, match="test_fraction"):
        make_cohort(tmp_path / "c", n=4, size=512, seed=0, test_fraction=1.0)
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "c").exists()


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiats import synth

    calls = {"n": 0}
    render = synth._SlideModel.render

    def failing(self: synth._SlideModel, *args: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return render(self, *args)

    monkeypatch.setattr(synth._SlideModel, "render", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        make_slide(tmp_path / "s.tif", size=1024, label="positive", seed=0)
    assert list(tmp_path.iterdir()) == []


def _peak_bytes(path: Path, size: int) -> int:
    tracemalloc.start()
    try:
        make_slide(path, size=size, label="positive", seed=0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_the_slide(tmp_path: Path) -> None:
    small = _peak_bytes(tmp_path / "small.tif", 2048)
    big = _peak_bytes(tmp_path / "big.tif", 8192)
    full_level = 8192 * 8192 * 3
    assert big < full_level / 5, big  # never a whole level 0 (201 MB) in memory
    assert big < small + 8 * 2**20, (small, big)  # and no growth with the slide size
    assert _levels(tmp_path / "big.tif")[2].shape == (512, 512, 3)


def test_openslide_reads_the_generic_layout(cohort: Path) -> None:
    openslide = pytest.importorskip("openslide")
    path = cohort / "slides" / "synth_0000.tif"
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.level_dimensions == ((SIZE, SIZE), (SIZE // 4, SIZE // 4))
        assert float(slide.properties["openslide.mpp-x"]) == MPP
        got = np.asarray(slide.read_region((256, 512), 0, (300, 200)).convert("RGB"))
    finally:
        slide.close()
    assert np.array_equal(got, _levels(path)[0][512:712, 256:556])


def test_synth_cli_needles_kind(tmp_path: Path) -> None:
    """`wsiats synth --kind needles`: every slide has 2-6 regions, positives 1-2 informative and >= 1 decoy,
    negatives only decoys."""
    import json

    from click.testing import CliRunner

    from wsiats.cli import cli

    out = tmp_path / "needles"
    result = CliRunner().invoke(cli, ["synth", str(out), "--n", "6", "--size", "2048", "--seed", "2", "--kind",
                                      "needles", "-q"])
    assert result.exit_code == 0, result.output
    truth = json.loads((out / "truth.json").read_text())
    assert truth["kind"] == "needles"
    for rec in truth["slides"].values():
        kinds = [r["kind"] for r in rec["regions"]]
        assert 2 <= len(kinds) <= 6 and "lookalike" in kinds
        informative = kinds.count("positive")
        assert (1 <= informative <= 2) if rec["label"] == "positive" else informative == 0
    bad = CliRunner().invoke(cli, ["synth", str(tmp_path / "x"), "--kind", "haystack"])
    assert bad.exit_code == 2 and "'haystack' is not one of 'regions', 'needles'" in bad.output
