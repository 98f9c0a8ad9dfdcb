from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsiats.config import Config
from wsiats.data import Item, ViewDataset, build_cohort, find_slides, read_labels, slide_id, split_items
from wsiats.errors import ConfigError, LabelsError, SlideNotFoundError


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.svs", "a"), ("case.01.ome.tif", "case.01"), ("x.OME.TIFF", "x"), ("y.ndpi", "y"), ("z.tiff", "z"),
     ("scan.qptiff", "scan")],
)
def test_slide_id_strips_slide_extensions(name: str, expected: str) -> None:
    assert slide_id(name) == expected


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "labels.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "labels file is empty"),
        ("slide_id,diagnosis\na,x\n", "missing column(s) label"),
        ("slide_id;label\na;x\n", "separated by ';'"),
        ("slide_id\tlabel\na\tx\n", "separated by '\\t'"),
        ("slide_id,label\na,x\na,y\n", "duplicate slide_id 'a' (first on line 2)"),
        ("slide_id,label\n", "no rows below the header"),
        ("slide_id,label\n../evil,x\n", "must be a file name without folders"),
        ("slide_id,label,split\na,x,training\n", "split 'training' must be one of"),
        ("slide_id,label\na\n", "expected 2 fields, found 1"),
    ],
)
def test_bad_labels_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(LabelsError) as info:
        read_labels(_write(tmp_path, text))
    assert message in str(info.value)
    assert str(tmp_path / "labels.csv") in str(info.value)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="labels file not found"):
        read_labels(tmp_path / "none.csv")


def _cohort(tmp: Path, ids: list[str]) -> Path:
    d = tmp / "slides"
    d.mkdir()
    for i in ids:
        (d / f"{i}.tif").write_bytes(b"x")
    return d


def test_cohort_matches_ids_and_rejects_unknown_and_single_class(tmp_path: Path) -> None:
    d = _cohort(tmp_path, ["a", "b", "c"])
    items, classes = build_cohort(d, _write(tmp_path, "slide_id,label\na,pos\nb,neg\nc,pos\n"))
    assert classes == ["neg", "pos"] and [it.label for it in items] == [1, 0, 1]
    with pytest.raises(LabelsError, match="no slide file in .* for slide_id zz"):
        build_cohort(d, _write(tmp_path, "slide_id,label\na,pos\nzz,neg\n"))
    with pytest.raises(LabelsError, match="only one class"):
        build_cohort(d, _write(tmp_path, "slide_id,label\na,pos\nb,pos\n"))


def test_split_column_decides_and_stratified_val_otherwise(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(20)]
    d = _cohort(tmp_path, ids)
    text = "slide_id,label\n" + "".join(f"{s},{'ab'[i % 2]}\n" for i, s in enumerate(ids))
    items, _ = build_cohort(d, _write(tmp_path, text))
    train, val, test = split_items(items, val_fraction=0.2, seed=0)
    assert len(val) == 4 and not test and {it.label for it in val} == {0, 1}
    assert split_items(items, val_fraction=0.2, seed=0) == (train, val, test)
    text = "slide_id,label,split\n" + "".join(f"{s},{'ab'[i % 2]},{'test' if i < 4 else 'train'}\n" for i, s in enumerate(ids))
    items, _ = build_cohort(d, _write(tmp_path, text))
    train, val, test = split_items(items, val_fraction=0.0, seed=0)
    assert [it.slide_id for it in test] == ids[:4] and len(train) == 16 and not val


def test_find_slides_expands_folders_and_globs(tmp_path: Path) -> None:
    d = _cohort(tmp_path, ["a", "b"])
    (d / "notes.txt").write_text("x")
    assert [p.name for p in find_slides([d])] == ["a.tif", "b.tif"]
    assert [p.name for p in find_slides([str(d / "a*"), d / "a.tif"])] == ["a.tif"]
    with pytest.raises(SlideNotFoundError, match="no file matches"):
        find_slides([str(d / "q*.svs")])


def test_find_slides_takes_dicom_series_folders_as_slides(tmp_path: Path) -> None:
    """IDC/TCIA downloads keep one DICOM series per folder: a folder of them lists each as one slide."""
    d = _cohort(tmp_path, ["b", "d"])
    for name in ("a_series", "c_series"):
        (d / name).mkdir()
        for i in range(2):
            (d / name / f"{i}.dcm").write_bytes(b"")
    (d / "not_a_series").mkdir()
    (d / "not_a_series" / "readme.txt").write_text("x")
    (d / "empty").mkdir()
    assert [p.name for p in find_slides([d])] == ["a_series", "b.tif", "c_series", "d.tif"]
    assert find_slides([d / "a_series"]) == [d / "a_series"]
    with pytest.raises(SlideNotFoundError, match="DICOM series folders"):
        find_slides([d / "not_a_series"])


def _dicom_export(folder: Path, shared: Path, *, others: tuple[str, ...] = ()) -> Path:
    """A real DICOM export's loose instances (level 0 and its thumbnail, one series) beside other files."""
    import shutil

    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm", *others):
        shutil.copy(shared / ("dicom-boxes" if name.startswith("boxes_") else "") / name, folder / name)
    return folder


def test_loose_dicom_instances_are_one_slide_per_series(tmp_path: Path, shared_slides: Path) -> None:
    """boxes_1.dcm is the thumbnail instance of boxes_0's series: not a second slide (issue 14 item 14)."""
    d = _dicom_export(tmp_path / "export", shared_slides, others=("small.svs", "sm_image.dcm"))
    assert [p.name for p in find_slides([d])] == ["boxes_0.dcm", "sm_image.dcm", "small.svs"]
    assert [p.name for p in find_slides([str(d / "*.dcm")])] == ["boxes_0.dcm", "sm_image.dcm"]
    # one series named twice (by two of its files) is one slide
    assert [p.name for p in find_slides([d / "boxes_0.dcm", d / "boxes_1.dcm"])] == ["boxes_0.dcm"]
    labels = _write(tmp_path, "slide_id,label\nboxes_0,a\nsmall,b\nsm_image,b\n")
    items, _ = build_cohort(d, labels)
    assert [it.path.name for it in items] == ["boxes_0.dcm", "small.svs", "sm_image.dcm"]
    with pytest.raises(LabelsError, match="no slide file .* for slide_id boxes_1"):
        build_cohort(d, _write(tmp_path, "slide_id,label\nboxes_1,a\nsmall,b\n"))


def test_one_dicom_folder_rule_for_open_slide_and_find_slides(tmp_path: Path, shared_slides: Path) -> None:
    """A folder is one DICOM slide only when all its files are instances of one series (issue 14 item 15)."""
    from wsiats.slide import is_dicom_folder, open_slide

    series = _dicom_export(tmp_path / "series", shared_slides)
    mixed = _dicom_export(tmp_path / "mixed", shared_slides, others=("small.svs", "CMU-1-Small-Region.svs"))
    two = _dicom_export(tmp_path / "two", shared_slides, others=("sm_image.dcm",))
    assert [is_dicom_folder(p) for p in (series, mixed, two)] == [True, False, False]
    assert find_slides([series]) == [series]
    with open_slide(series) as s:
        assert s.level_dimensions == ((16, 16),) and s.associated_names == ("thumbnail",)
    assert [p.name for p in find_slides([mixed])] == ["CMU-1-Small-Region.svs", "boxes_0.dcm", "small.svs"]
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(mixed)  # was one 16 x 16 DICOM slide
    assert str(err.value) == (f"{mixed}: is a directory, not a slide file (only a folder whose files are all DICOM "
                              ".dcm instances of one series is read as one slide)")
    assert [p.name for p in find_slides([two])] == ["boxes_0.dcm", "sm_image.dcm"]
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(two)
    assert str(err.value) == f"{two}: is a directory holding 2 DICOM series, not one slide; name one of its .dcm files"
    for name, dims in (("boxes_0.dcm", (16, 16)), ("sm_image.dcm", (50, 50))):
        with open_slide(two / name) as s:
            assert s.dimensions == dims


def test_slide_rules_live_in_one_place(tmp_path: Path) -> None:
    import wsiats.data
    import wsiats.slide

    assert wsiats.data.SLIDE_SUFFIXES is wsiats.slide.SLIDE_SUFFIXES
    assert not hasattr(wsiats.data, "_is_dicom_folder")
    d = _cohort(tmp_path, ["a"])
    (d / "scan.qptiff").write_bytes((d / "a.tif").read_bytes())  # PerkinElmer/Akoya: was skipped silently
    assert [p.name for p in find_slides([d])] == ["a.tif", "scan.qptiff"]


_ids = st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(rows=st.lists(st.tuples(_ids, st.sampled_from(["pos", "neg", "x y"])), min_size=1, max_size=8, unique_by=lambda r: r[0]))
def test_labels_round_trip_property(tmp_path: Path, rows: list[tuple[str, str]]) -> None:
    text = "slide_id,label\n" + "".join(f"{a},{b}\n" for a, b in rows)
    parsed = read_labels(_write(tmp_path, text))
    assert [(r["slide_id"], r["label"]) for r in parsed] == rows


# --- the view cache of training ---------------------------------------------------------------------------------


def _view_items(tmp: Path, n: int) -> list[Item]:
    import _slides

    d = tmp / "views"
    d.mkdir()
    items = []
    for k in range(n):
        path = d / f"s{k}.tif"
        _slides.write_generic_pyramid(path, _slides.tissue_image(256, 320, seed=k), n_levels=2, tile=64, mpp=0.5)
        items.append(Item(f"s{k}", path, k % 2))
    return items


def test_view_cache_stays_within_its_memory_budget(tmp_path: Path) -> None:
    items = _view_items(tmp_path, 3)
    cfg = Config(view_downsample=4.0, view_cache_mb=0)
    ds = ViewDataset(items, cfg)
    one = ds[0][1]
    size = one.image.nbytes + one.mask.nbytes  # 80 x 64 px: 20,480 bytes
    assert not ds._cache  # a budget of 0 keeps nothing
    ds.budget = 2 * size
    for i in (0, 1, 0, 2):
        ds[i]
    assert list(ds._cache) == [0, 2] and ds._bytes == 2 * size  # 1 was least recently used
    again = ViewDataset(items, Config(view_downsample=4.0))[1][1]
    assert np.array_equal(ds[1][1].image, again.image) and np.array_equal(ds[1][1].mask, again.mask)


def test_view_cache_files_are_reused_and_never_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import os

    import wsiats.view

    items = _view_items(tmp_path, 2)
    cache = tmp_path / "cache"
    cfg = Config(view_downsample=4.0, view_cache=str(cache))
    first = ViewDataset(items, cfg)[0][1]
    files = sorted(cache.glob("s0-*.npz"))
    assert len(files) == 1 and not list(cache.glob(".*"))  # written atomically, no temporaries left

    def no_slides(*args: object, **kwargs: object) -> None:
        raise AssertionError("the slide's view was read although it is cached")

    monkeypatch.setattr(wsiats.view, "prepare_view", no_slides)  # opened to check the file against, not read
    cached = ViewDataset(items, cfg)[0][1]
    assert np.array_equal(cached.image, first.image) and np.array_equal(cached.mask, first.mask)
    assert cached.downsample == first.downsample and cached.fell_back == first.fell_back
    monkeypatch.undo()

    # another view setting, or a rewritten slide, gets its own file
    ViewDataset(items, Config(view_downsample=2.0, view_cache=str(cache)))[0]
    st = items[0].path.stat()
    os.utime(items[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ViewDataset(items, cfg)[0]
    assert len(list(cache.glob("s0-*.npz"))) == 3

    # a damaged file is reported and the slide read instead
    newest = max(cache.glob("s0-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not a zip")
    with caplog.at_level("WARNING", logger="wsiats.data"):
        view = ViewDataset(items, cfg)[0][1]
    assert np.array_equal(view.image, first.image) and "unusable view cache file" in caplog.text


def test_view_cache_file_of_a_block_mean_view_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A 460 px slide at downsample 8: `read_view` gives level 2's 2 x 2 block means with downsample 8.0, not
    460 / 58; its cache file must still count as fitting the slide (it was rejected, and the slide read, every time)."""
    import _slides

    import wsiats.view

    path = tmp_path / "odd.tif"
    _slides.write_generic_pyramid(path, _slides.tissue_image(460, 460, seed=5), n_levels=3, tile=64)
    items, cfg = [Item("odd", path, 1)], Config(view_downsample=8.0, view_cache=str(tmp_path / "cache"))
    first = ViewDataset(items, cfg)[0][1]
    assert first.downsample == (8.0, 8.0)

    def no_slides(*args: object, **kwargs: object) -> None:
        raise AssertionError("the slide's view was read although it is cached")

    monkeypatch.setattr(wsiats.view, "prepare_view", no_slides)
    with caplog.at_level("WARNING", logger="wsiats.data"):
        cached = ViewDataset(items, cfg)[0][1]
    assert np.array_equal(cached.image, first.image) and cached.downsample == (8.0, 8.0)
    assert "unusable" not in caplog.text


def test_view_cache_budget_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="view_cache_mb"):
        Config(view_cache_mb=-1)
