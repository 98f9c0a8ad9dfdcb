"""Bad inputs and failures through the CLI: one-line errors, exit codes, batches that go on, atomic outputs.

Every case runs `wsiats.cli:cli` with click's CliRunner and checks the exit status (2 for usage
errors, 1 otherwise), the exact `Error: ...` or `failed: ...` line (it names the input and the
cause), that no traceback reached the output, and that no partial or temporary file was left.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import Result
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import _slides  # noqa: E402

from conftest import TINY, invoke  # noqa: E402

#: The reader's answer for files that are neither a TIFF tifffile can use nor anything OpenSlide knows.
NOT_A_SLIDE = "not a whole-slide image format tifffile or OpenSlide can read"


def assert_clean(result: Result, code: int) -> None:
    """Exit status `code`, and no Python exception or traceback escaped to the user."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def produced(folder: Path) -> list[str]:
    """Names of the result files in `folder`, without the `*.config.yaml` records of the options a command ran with."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".config.yaml"))


def leftovers(folder: Path) -> list[str]:
    """Temporary files of `wsiats._io.atomic_path` (".<name>.<random>.tmp<suffix>") under `folder`."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


# --- shared data: the session's cohort and 1-epoch run (conftest.py), a folder of broken slides -------------


def _good(cohort: Path, i: int) -> Path:
    return cohort / "slides" / f"synth_{i:04d}.tif"


def _png_renamed(path: Path, cohort: Path) -> None:
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path, format="PNG")


def _truncated(path: Path, cohort: Path) -> None:
    _slides.truncate(_good(cohort, 0), path, keep=0.5)  # a real generated pyramid, cut in half


def _absurd(path: Path, cohort: Path) -> None:
    shutil.copy(_good(cohort, 0), path)
    _slides.patch_tag(path, 256, 4_000_000)  # ImageWidth of level 0: 4 million px


def _five_channels(path: Path, cohort: Path) -> None:
    tifffile.imwrite(path, np.zeros((64, 64, 5), np.uint8), photometric="minisblack", planarconfig="contig",
                     tile=(16, 16))


def _pixarlog(path: Path, cohort: Path) -> None:
    # A codec the reader lacks: the tiles are deflate, but every page's Compression tag says PixarLog (32909),
    # a real libtiff codec that tifffile and imagecodecs do not implement. The file opens (tiles are decoded
    # lazily) and fails on the first pixel read, as a slide in an exotic compression would.
    _slides.write_generic_pyramid(path, _slides.tissue_image(512, 512, seed=1), n_levels=2, tile=128)
    for page in (0, 1):
        _slides.patch_tag(path, 259, 32909, page=page)


def _bad_tile(path: Path, cohort: Path) -> None:
    # Single-level JPEG pyramid: the view is read from level 0, so the garbage tile in its middle is always hit.
    _slides.write_generic_pyramid(path, _slides.tissue_image(1024, 1024, seed=2), n_levels=1, tile=128,
                                  compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        n = len(tif.pages[0].dataoffsets)
    _slides.corrupt_tile(path, index=n // 2 + 4)


def _zeroed_tiles(path: Path, cohort: Path) -> None:
    # The second half of every JPEG tile zeroed (a copy cut short on a preallocated file): libjpeg decodes
    # such tiles without an error, so the slide used to be predicted as if nothing were wrong.
    _slides.write_generic_pyramid(path, _slides.tissue_image(1024, 1024, seed=2), n_levels=1, tile=128,
                                  compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        spans = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset + count // 2: offset + count] = bytes(count - count // 2)
    path.write_bytes(bytes(data))


#: name -> (how to make it, the cause its error must state)
BAD_SLIDES: dict[str, tuple[Callable[[Path, Path], None] | None, str]] = {
    "missing.tif": (None, "no such file"),
    "empty.tif": (lambda p, c: p.write_bytes(b""), "file is empty (0 bytes)"),
    "random.tif": (lambda p, c: p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()),
                   NOT_A_SLIDE),
    "truncated.tif": (_truncated, "file is truncated: level 0 needs"),
    "absurd.tif": (_absurd, "level 0 claims 4000000 x 1024 px (limit 1000000 a side): the header is corrupt"),
    "png_renamed.tif": (_png_renamed, NOT_A_SLIDE),
    "text.tif": (lambda p, c: p.write_text("slide_id,label\na,b\n"), NOT_A_SLIDE),
    "gray16.tif": (lambda p, c: _slides.write_uint16(p), "has 1 channel(s) of uint16; wsiats needs 8-bit RGB"),
    "rgb16.tif": (lambda p, c: _slides.write_rgb16(p), "has 3 channel(s) of uint16; wsiats needs 8-bit RGB"),
    "five_channels.tif": (_five_channels, "has 5 channel(s) of uint8; wsiats needs 8-bit RGB"),
    "pixarlog.tif": (_pixarlog, "cannot read level 1 region x=0 y=0 256x256 px: ValueError: <COMPRESSION.PIXARLOG: "
                                "32909> not supported (the pixels use a compression this tifffile/imagecodecs build "
                                "cannot decode; try --backend openslide)"),
    "bad_tile.tif": (_bad_tile, "cannot read level 0 region x=0 y=0 1024x1024 px: "),
    "zeroed_tiles.tif": (_zeroed_tiles, "cannot read level 0 region x=0 y=0 1024x1024 px: ValueError: JPEG tile 0 "
                                        "is damaged (no end-of-image marker): the file is corrupt"),
}


@pytest.fixture(scope="module")
def bad(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    for name, (make, _) in BAD_SLIDES.items():
        if make is not None:
            make(folder / name, cohort)
    (folder / "folder.tif").mkdir()
    return folder


# --- slides ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BAD_SLIDES if n not in ("bad_tile.tif", "zeroed_tiles.tif")]
                         + ["folder.tif"])
def test_info_on_a_bad_slide(bad: Path, name: str) -> None:
    path = bad / name
    cause = BAD_SLIDES[name][1] if name in BAD_SLIDES else "folder holds no slides ("
    if name == "pixarlog.tif":  # info decodes one tile of the coarsest level, so a missing codec shows
        cause = cause.replace("256x256", "1x1")
    result = invoke("info", path)
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {path}: {cause}")


def test_info_reads_metadata_so_a_corrupt_tile_shows_only_when_read(bad: Path) -> None:
    """A corrupt tile in level 0 is found by predict and heatmap (below), not by info: it reads one tile."""
    result = invoke("info", bad / "bad_tile.tif", "--json")
    assert_clean(result, 0)
    assert '"level_dimensions": [\n    [\n      1024,\n      1024\n    ]\n  ]' in result.output


@pytest.mark.parametrize("name", list(BAD_SLIDES))
def test_predict_on_a_bad_slide(bad: Path, run_dir: Path, tmp_path: Path, name: str) -> None:
    path, out = bad / name, tmp_path / "pred.csv"
    result = invoke("predict", path, "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    lines = result.output.splitlines()
    assert lines[0] == f"wrote {out}: 0 slide(s) predicted, 1 failed"
    assert len(lines) == 2 and lines[1].startswith(f"failed: {path}: {BAD_SLIDES[name][1]}")
    (row,) = csv.DictReader(open(out, newline=""))
    assert row["path"] == str(path) and row["prediction"] == "" and row["error"] == lines[1][len("failed: "):]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("name", list(BAD_SLIDES))
def test_heatmap_on_a_bad_slide(bad: Path, run_dir: Path, tmp_path: Path, name: str) -> None:
    path, out = bad / name, tmp_path / "maps"
    result = invoke("heatmap", path, "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    lines = result.output.splitlines()
    assert lines[0] == f"wrote 0 heatmap(s) to {out}, 1 failed"
    assert len(lines) == 2 and lines[1].startswith(f"failed: {path}: {BAD_SLIDES[name][1]}")
    assert produced(out) == []


@pytest.mark.parametrize("command", ["predict", "heatmap"])
def test_a_folder_without_slides_is_refused_before_any_work(bad: Path, run_dir: Path, tmp_path: Path,
                                                            command: str) -> None:
    out = tmp_path / ("pred.csv" if command == "predict" else "maps")
    result = invoke(command, bad / "folder.tif", "--model", run_dir, "--out", out)
    assert_clean(result, 1)
    assert result.output.startswith(f"Error: {bad / 'folder.tif'}: folder holds no slides (")
    assert result.output.count("\n") == 1 and not out.exists()


# --- labels CSV (through train) -----------------------------------------------------------------------------------


def _labels_cases(cohort: Path) -> dict[str, tuple[str, str]]:
    slides = cohort / "slides"
    return {
        "missing_column": ("slide_id,diagnosis\nsynth_0000,negative\n",
                           "{csv}: missing column(s) label; found slide_id, diagnosis"),
        "unknown_id": ("slide_id,label\nsynth_0000,negative\ncase_999,positive\n",
                       f"{{csv}}: no slide file in {slides} for slide_id case_999"),
        "duplicate_id": ("slide_id,label\nsynth_0000,negative\nsynth_0001,positive\nsynth_0000,positive\n",
                         "{csv}:4: duplicate slide_id 'synth_0000' (first on line 2)"),
        "single_class": ("slide_id,label\nsynth_0000,negative\nsynth_0001,negative\n",
                         "{csv}: only one class ('negative'); training needs at least two"),
        "empty": ("", "{csv}: labels file is empty; expected a header slide_id,label"),
        "header_only": ("slide_id,label\n", "{csv}: no rows below the header"),
        "semicolons": ("slide_id;label\nsynth_0000;negative\n",
                       "{csv}: columns are separated by ';'; wsiats reads comma-separated files (slide_id,label)"),
        "tabs": ("slide_id\tlabel\nsynth_0000\tnegative\n",
                 "{csv}: columns are separated by '\\t'; wsiats reads comma-separated files (slide_id,label)"),
        "ragged": ("slide_id,label\nsynth_0000,negative,extra\n", "{csv}:2: expected 2 fields, found 3"),
        "path_in_id": ("slide_id,label\n../synth_0000,negative\nsynth_0001,positive\n",
                       "{csv}:2: slide_id '../synth_0000' must be a file name without folders"),
    }


@pytest.mark.parametrize("case", ["missing_column", "unknown_id", "duplicate_id", "single_class", "empty",
                                  "header_only", "semicolons", "tabs", "ragged", "path_in_id"])
def test_train_refuses_bad_labels(cohort: Path, tmp_path: Path, case: str) -> None:
    text, message = _labels_cases(cohort)[case]
    labels = tmp_path / "labels.csv"
    labels.write_text(text)
    result = invoke("train", cohort / "slides", "--labels", labels, "--out", tmp_path / "run", *TINY)
    assert_clean(result, 1)
    assert result.output == f"Error: {message.format(csv=labels)}\n"
    assert not (tmp_path / "run").exists()


def test_train_with_a_missing_labels_file(cohort: Path, tmp_path: Path) -> None:
    labels = tmp_path / "nope.csv"
    result = invoke("train", cohort / "slides", "--labels", labels, "--out", tmp_path / "run", *TINY)
    assert_clean(result, 1)
    assert result.output == f"Error: {labels}: labels file not found\n"


# --- configuration (through train): usage errors, exit 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("epoks: 3\n", [], "{cfg}: unknown key(s) epoks; valid keys: labels, out, resume, skip_bad, recursive, "
                           "backend, mpp, verbose, quiet, view_downsample, "),
        ("epochs: three\n", [], "{cfg}: epochs must be int, got 'three' (default 30)"),
        ("augment: 1\n", [], "{cfg}: augment must be bool, got 1 (default True)"),
        ("batch_size: 0\n", [], "batch_size (flag --batch-size) must be an integer >= 1, got 0"),
        ("- epochs\n", [], "{cfg}: expected a mapping of option: value, got list"),
        ("epochs: [1\n", [], "{cfg}: not a readable YAML file (ParserError)"),
        (None, ["--val-fraction", "1.5"], "val_fraction (flag --val-fraction) must be in [0, 1), got 1.5"),
        (None, ["--lr", "nan"], "lr (flag --lr) must be a positive number, got nan"),
        (None, ["--attention", "random"], "attention (flag --attention) must be 'learned' or 'uniform', got 'random'"),
        (None, ["--epochs", "two"], "Invalid value for '--epochs': 'two' is not a valid integer."),
        (None, ["--config", "{missing}"], "{missing}: config file not found"),
    ],
)
def test_train_refuses_bad_config_with_exit_2(cohort: Path, tmp_path: Path, yaml_text: str | None, flags: list[str],
                                             message: str) -> None:
    cfg, missing = tmp_path / "config.yaml", tmp_path / "missing.yaml"
    if yaml_text is not None:
        cfg.write_text(yaml_text)
        flags = ["--config", str(cfg)]
    flags = [f.format(missing=missing) for f in flags]
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "run", *flags)
    assert_clean(result, 2)
    assert message.format(cfg=cfg, missing=missing) in result.output
    assert result.output.splitlines()[-1].startswith("Error: ")
    assert not (tmp_path / "run").exists()


# --- model folder (through predict and heatmap) -------------------------------------------------------------------


def _break_run(run: Path, case: str) -> str:
    """Damage a copy of a run folder; return the message's text after 'Error: '."""
    weights, config = run / "model.safetensors", run / "config.yaml"
    if case == "no_weights":
        weights.unlink()
        return f"{weights}: model weights not found; did `wsiats train` finish an epoch?"
    if case == "no_config":
        config.unlink()
        return f"{run}: not a wsiats run folder (no config.yaml); pass the --out folder of `wsiats train`"
    if case == "garbage_weights":
        weights.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
        return f"{weights}: corrupt or not a safetensors file ("
    if case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return f"{weights}: corrupt or not a safetensors file ("
    if case == "other_shapes":
        config.write_text(config.read_text().replace("feature_dim: 32", "feature_dim: 16"))
        return f"{weights}: weights do not match config.yaml ("
    if case == "version":
        config.write_text(config.read_text().replace("version: 1", "version: 99"))
        return (f"{config}: config version 99 is not supported by this wsiats (expects 1); retrain, or use the "
                "wsiats release that wrote it")
    if case == "bad_yaml":
        config.write_text("classes: [a, b\n")
        return f"{config}: config is not valid YAML"
    if case == "unknown_key":
        config.write_text(config.read_text() + "dropout: 0.5\n")
        return f"{config}: unknown key(s) dropout"
    raise AssertionError(case)


MODEL_CASES = ["no_weights", "no_config", "garbage_weights", "truncated_weights", "other_shapes", "version",
               "bad_yaml", "unknown_key"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_predict_refuses_a_broken_model_folder(cohort: Path, run_dir: Path, tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    message = _break_run(run, case)
    out = tmp_path / "out" / "pred.csv"
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", out)
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {message}")
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("case", ["missing_folder", "garbage_weights", "version"])
def test_heatmap_refuses_a_broken_model_folder(cohort: Path, run_dir: Path, tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    if case == "missing_folder":
        message = f"{run}: model folder not found; pass the --out folder of `wsiats train`"
    else:
        shutil.copytree(run_dir, run)
        message = _break_run(run, case)
    out = tmp_path / "maps"
    result = invoke("heatmap", _good(cohort, 0), "--model", run, "--out", out)
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {message}")
    assert not out.exists() or produced(out) == []


# --- exit codes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "a.tif", "--out", "p.csv"], "Missing option '--model'"),
        (["predict", "a.tif", "--model", "m", "--out", "p.csv", "--mc", "0"], "Invalid value for '--mc'"),
        (["predict", "a.tif", "--model", "m", "--out", "p.csv", "--backend", "pil"], "Invalid value for '--backend'"),
        (["predict", "a.tif", "--model", "m", "--out", "p.txt"], "p.txt: --out must end in .csv or .json"),
        (["heatmap", "--model", "m", "--out", "o"], "Missing argument 'SLIDES...'"),
        (["info", "a.tif", "--mpp", "-1"], "Invalid value for '--mpp'"),
        (["train", "s", "--labels", "l.csv", "--out", "r", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["segment", "a.tif"], "No such command 'segment'"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert_clean(result, 2)
    assert message in result.output and "Error: " in result.output


def test_an_unwritable_output_is_a_one_line_error(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be\n")
    out = blocker / "pred.csv"
    result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {blocker}: ")
    result = invoke("heatmap", _good(cohort, 0), "--model", run_dir, "--out", blocker / "maps", "-q")
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith(f"Error: {blocker}")


# --- batches go on past a bad slide -------------------------------------------------------------------------------


def test_predict_batch_goes_on_past_a_bad_slide(cohort: Path, run_dir: Path, bad: Path, tmp_path: Path) -> None:
    slides = [_good(cohort, 0), bad / "truncated.tif", _good(cohort, 1), bad / "missing.tif", _good(cohort, 2)]
    for out in (tmp_path / "pred.csv", tmp_path / "pred.json"):
        result = invoke("predict", *slides, "--model", run_dir, "--out", out, "-q")
        assert_clean(result, 1)
        lines = result.output.splitlines()
        assert lines == [
            f"wrote {out}: 3 slide(s) predicted, 2 failed",
            f"failed: {bad / 'truncated.tif'}: file is truncated: level 0 needs {lines[1].split('needs ')[1]}",
            f"failed: {bad / 'missing.tif'}: no such file",
        ]
    rows = list(csv.DictReader(open(tmp_path / "pred.csv", newline="")))
    assert [r["path"] for r in rows] == [str(s) for s in slides]
    assert [bool(r["error"]) for r in rows] == [False, True, False, True, False]
    assert all(r["prediction"] in ("negative", "positive") for r in rows[::2])
    assert not leftovers(tmp_path)


def test_heatmap_batch_goes_on_past_a_bad_slide(cohort: Path, run_dir: Path, bad: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    result = invoke("heatmap", _good(cohort, 0), bad / "bad_tile.tif", _good(cohort, 1), "--model", run_dir,
                    "--out", out, "-q")
    assert_clean(result, 1)
    lines = result.output.splitlines()
    assert lines[0] == f"wrote 2 heatmap(s) to {out}, 1 failed"
    assert len(lines) == 2 and lines[1].startswith(f"failed: {bad / 'bad_tile.tif'}: cannot read level 0 region")
    assert produced(out) == sorted(
        f"synth_000{i}{ext}" for i in (0, 1) for ext in (".png", ".attention.tif", ".geojson"))


def _broken_cohort(cohort: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the cohort with one test-split slide emptied and one training slide replaced by noise."""
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    rows = list(csv.DictReader(open(cohort / "labels.csv", newline="")))
    test_id = next(r["slide_id"] for r in rows if r["split"] == "test")
    # a training slide of the larger class, so that both classes keep training slides
    labels = [r["label"] for r in rows if r["split"] == "train"]
    big = max(set(labels), key=labels.count)
    train_id = next(r["slide_id"] for r in rows if r["split"] == "train" and r["label"] == big)
    broken = sorted([slides / f"{test_id}.tif", slides / f"{train_id}.tif"])
    broken[0].write_bytes(b"")
    broken[1].write_bytes(np.random.default_rng(1).integers(0, 256, 3000, np.uint8).tobytes())
    return slides, broken


def test_train_lists_every_unreadable_slide_then_skip_bad_trains_on_the_rest(cohort: Path, tmp_path: Path) -> None:
    slides, broken = _broken_cohort(cohort, tmp_path)
    run = tmp_path / "run"
    args = ["train", slides, "--labels", cohort / "labels.csv", "--out", run, "--epochs", "1", *TINY]
    result = invoke(*args)
    assert_clean(result, 1)
    assert result.output.count("\n") == 1 and result.output.startswith("Error: 2 unreadable slide(s) in the cohort: ")
    for path in broken:
        assert str(path) in result.output
    assert "file is empty (0 bytes)" in result.output and NOT_A_SLIDE in result.output
    assert "pass --skip-bad" in result.output and not run.exists()

    result = invoke(*args, "--skip-bad")
    assert_clean(result, 0)
    lines = result.output.splitlines()
    assert lines[0].startswith("epoch 1/1: train loss ") and f"skipped 2 unreadable slide(s): {broken[0]}, {broken[1]}" in lines
    assert lines[-1] == f"model: {run / 'model.safetensors'}"  # -q hides bars only
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == ["1"]


def test_train_on_a_slide_that_fails_mid_read(cohort: Path, bad: Path, tmp_path: Path) -> None:
    """A corrupt tile is only found when it is read: the views are all read before training starts, so the
    slide stops training before it starts, or with --skip-bad is left out once and named."""
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    rows = list(csv.DictReader(open(cohort / "labels.csv", newline="")))
    train_id = next(r["slide_id"] for r in rows if r["split"] == "train")
    broken = slides / f"{train_id}.tif"
    shutil.copy(bad / "bad_tile.tif", broken)
    run = tmp_path / "run"
    args = ["train", slides, "--labels", cohort / "labels.csv", "--out", run, "--epochs", "2", *TINY]
    result = invoke(*args)
    assert_clean(result, 1)
    assert result.output.startswith(f"Error: 1 unreadable slide(s) in the cohort: {broken}: cannot read level 0 region")
    assert result.output.count("\n") == 1 and not run.exists()
    result = invoke(*args, "--skip-bad")
    assert_clean(result, 0)
    assert result.output.count(f"skipped 1 unreadable slide(s): {broken}\n") == 1  # once, not a warning every epoch
    assert "Warning" not in result.output
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == ["1", "2"]
    assert not leftovers(tmp_path)


# --- nothing lost: atomic outputs ---------------------------------------------------------------------------------


def test_no_temporary_files_after_success(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_clean(invoke("predict", _good(cohort, 3), "--model", run_dir, "--out", out / "p.json", "-q"), 0)
    assert_clean(invoke("heatmap", _good(cohort, 3), "--model", run_dir, "--out", out, "-q"), 0)
    assert produced(out) == [
        "p.json", "synth_0003.attention.tif", "synth_0003.geojson", "synth_0003.png"]


def test_a_failing_prediction_writer_leaves_the_old_file(cohort: Path, run_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiats.predict

    out = tmp_path / "pred.csv"
    out.write_text("the previous predictions\n")
    real_row, calls = wsiats.predict._row, []

    def row_then_disk_full(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:  # the first row is already in the temporary file
            raise OSError(28, "No space left on device", str(out))
        return real_row(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(wsiats.predict, "_row", row_then_disk_full)
    result = invoke("predict", _good(cohort, 0), _good(cohort, 1), "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    assert result.output == f"Error: {out}: No space left on device\n"
    assert out.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]


def test_a_failing_heatmap_writer_leaves_no_partial_files(cohort: Path, run_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiats.heatmap

    real_imwrite = tifffile.imwrite

    def half_then_disk_full(path: object, *args: object, **kwargs: object) -> None:
        Path(str(path)).write_bytes(b"II*\x00" + b"\x00" * 100)  # a half-written TIFF under the temporary name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wsiats.heatmap.tifffile, "imwrite", half_then_disk_full)
    out = tmp_path / "maps"
    result = invoke("heatmap", _good(cohort, 0), "--model", run_dir, "--out", out, "-q")
    monkeypatch.setattr(wsiats.heatmap.tifffile, "imwrite", real_imwrite)
    assert_clean(result, 1)
    lines = result.output.splitlines()
    assert lines == [f"wrote 0 heatmap(s) to {out}, 1 failed",  # the output named, not its temporary file
                     f"failed: {_good(cohort, 0)}: OSError: [Errno 28] No space left on device: "
                     f"'{out / 'synth_0000.attention.tif'}'"]
    assert produced(out) == []  # neither a partial TIFF nor the PNG of a slide reported as failed


def test_ctrl_c_during_predict(cohort: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiats.predict

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(wsiats.predict.Predictor, "predict_view", interrupt)
    out = tmp_path / "pred.csv"
    result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", out, "-q")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.output == "Interrupted: nothing half-written was left behind.\n"
    assert list(tmp_path.iterdir()) == []


# --- paths never escape the output folder -------------------------------------------------------------------------


def test_heatmap_names_from_odd_slide_names_stay_in_the_output_folder(cohort: Path, run_dir: Path,
                                                                      tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    names = ["..tif", "...tif", "a b;c'.tif", "-x.tif"]
    for name in names:
        shutil.copy(_good(cohort, 0), slides / name)
    out = tmp_path / "maps"
    result = invoke("heatmap", *[slides / n for n in names], "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "slides"]
    assert sorted(p.name for p in slides.iterdir()) == sorted(names)
    written = [out / name for name in produced(out)]
    assert len(written) == 3 * len(names)
    assert all(p.resolve().parent == out.resolve() and p.is_file() for p in written)


def test_heatmap_refuses_a_second_slide_with_the_same_id(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    """Two files named alike in different folders would write the same heatmap files: the second one fails."""
    first, second = tmp_path / "a" / "case.tif", tmp_path / "b" / "case.svs"
    for p, i in ((first, 0), (second, 1)):
        p.parent.mkdir()
        shutil.copy(_good(cohort, i), p)
    out = tmp_path / "maps"
    result = invoke("heatmap", first, second, "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    assert result.output.splitlines() == [
        f"wrote 1 heatmap(s) to {out}, 1 failed",
        f"failed: {second}: slide id 'case' is also the id of {first}; its heatmap files would overwrite that slide's",
    ]
    png = np.asarray(Image.open(out / "case.png"))
    assert_clean(invoke("heatmap", first, "--model", run_dir, "--out", tmp_path / "ref", "-q"), 0)
    assert np.array_equal(png, np.asarray(Image.open(tmp_path / "ref" / "case.png")))


# --- determinism --------------------------------------------------------------------------------------------------


def _rows_without_seconds(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    for r in rows:
        del r["seconds"]
    return rows


def test_predictions_are_reproducible(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    slides = [_good(cohort, i) for i in range(3)]
    out = {}
    for name, extra in [("a", ["--seed", "7"]), ("b", ["--seed", "7"]), ("c", ["--seed", "8"]),
                        ("top0", ["--topk", "--seed", "0"]), ("top9", ["--topk", "--seed", "9"])]:
        out[name] = tmp_path / f"{name}.json"
        assert_clean(invoke("predict", *slides, "--model", run_dir, "--out", tmp_path / f"{name}.csv", "--mc", "2",
                            *extra, "-q"), 0)
        assert_clean(invoke("predict", *slides, "--model", run_dir, "--out", out[name], "--mc", "2", *extra, "-q"), 0)
    assert _rows_without_seconds(tmp_path / "a.csv") == _rows_without_seconds(tmp_path / "b.csv")
    assert _rows_without_seconds(tmp_path / "top0.csv") == _rows_without_seconds(tmp_path / "top9.csv")

    import json

    def patches(name: str) -> list[list[dict[str, object]]]:
        return [s["patches"] for s in json.loads(out[name].read_text())["slides"]]

    assert patches("a") == patches("b") and patches("top0") == patches("top9")
    assert patches("a") != patches("c")  # the seed does drive the sampling: the checks above can fail


def test_heatmaps_are_byte_identical(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert_clean(invoke("heatmap", _good(cohort, 4), _good(cohort, 5), "--model", run_dir,
                            "--out", tmp_path / name, "-q"), 0)
    files = produced(tmp_path / "a")
    assert len(files) == 6 and files == produced(tmp_path / "b")
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_outputs_get_the_usual_permissions(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    """Temporary files are created 0600; what is renamed into place must be readable as umask allows."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert_clean(invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "p.csv", "-q"), 0)
    assert_clean(invoke("heatmap", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "maps", "-q"), 0)
    files = [*run_dir.iterdir(), tmp_path / "p.csv", *(tmp_path / "maps").iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
