"""What a new user ran into (issue "Field report"): warnings that reach the user once per slide, a model applied
to slides unlike its training data, progress in logs, inputs checked up front, one --config rule for every
command, folders and globs, labels that do not match the slides, model folder mistakes, help texts."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))

import _slides  # noqa: E402
from conftest import invoke as _invoke

from wsiats.checkpoint import build_model, save_weights  # noqa: E402
from wsiats.cli import cli  # noqa: E402
from wsiats.config import Config, load_yaml  # noqa: E402
from wsiats.run import RunFolder  # noqa: E402

TRAIN = ["--epochs", "1", "--batch-size", "2", "--n-patches", "4", "--patch-size", "16", "--view-downsample", "16",
         "--workers", "0", "--val-fraction", "0", "-q"]


def invoke(*args: object) -> Result:
    """conftest's `invoke`, and no traceback, no exception but an exit."""
    result = _invoke(*args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def warnings_of(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Warning: ")]


def _tissue(path: Path, *, seed: int, mpp: float | None = 0.25, size: int = 256) -> Path:
    _slides.write_generic_pyramid(path, _slides.tissue_image(size, size, seed=seed), n_levels=2, tile=64, mpp=mpp)
    return path


def _blank(path: Path) -> Path:
    _slides.write_generic_pyramid(path, np.full((256, 256, 3), 246, np.uint8), n_levels=2, tile=64)
    return path


def _72dpi(path: Path, *, seed: int) -> Path:
    tifffile.imwrite(path, _slides.tissue_image(256, 256, seed=seed), photometric="rgb", tile=(64, 64),
                     resolution=(72, 72), resolutionunit="INCH")
    return path


def _run(folder: Path, **kw: object) -> Path:
    """A run folder without training: a config and the untrained weights it defines (milliseconds)."""
    cfg = Config(classes=["negative", "positive"], n_patches=6, patch_size=16, view_downsample=16.0, workers=0, **kw)
    folder.mkdir(parents=True)
    save_weights(build_model(cfg), folder / "model.safetensors")
    cfg.save(folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("model") / "run", train_mpp=0.25)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """16 small slides: tissue at the training resolution, blank glass, 72-dpi files, tissue at 0.5 um/px."""
    d = tmp_path_factory.mktemp("mixed")
    kinds: dict[str, list[Path]] = {"tissue": [], "blank": [], "dpi72": [], "half": []}
    for i in range(4):
        kinds["tissue"].append(_tissue(d / f"t{i}.tif", seed=i))
        kinds["blank"].append(_blank(d / f"b{i}.tif"))
        kinds["dpi72"].append(_72dpi(d / f"d{i}.tif", seed=10 + i))
        kinds["half"].append(_tissue(d / f"h{i}.tif", seed=20 + i, mpp=0.5))
    return kinds


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six labelled slides (three a class) and their labels."""
    d = tmp_path_factory.mktemp("cohort")
    (d / "slides").mkdir()
    rows = ["slide_id,label"]
    for i in range(6):
        _tissue(d / "slides" / f"s{i}.tif", seed=30 + i)
        rows.append(f"s{i},{'ab'[i % 2]}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def _dpi72_warning(path: Path) -> str:
    return (f"Warning: {path}: the resolution tag says 72 dpi, a software default, not a scan resolution; mpp is "
            "unknown (pass --mpp to set it)")


def _blank_warning(path: Path) -> str:
    return (f"Warning: {path}: no tissue found in the view (the view is blank, every pixel about RGB 246, 246, 246); "
            "sampling from the whole slide")


def _half_warning(path: Path) -> str:
    return (f"Warning: {path}: resolution 0.5 um/px, 2.00x the training slides' 0.25 um/px: the view and patches "
            "show another magnification than the model learned (pass --mpp if the file's resolution is wrong)")


# --- 1: every warning about a slide reaches the user once, whatever the prefetch threads do ---------------------


def test_every_slide_warning_reaches_the_user_once_with_prefetch_threads(mixed: dict[str, list[Path]], run: Path,
                                                                         tmp_path: Path) -> None:
    """The views of the next slides are read in threads while the current one is in the networks: each slide's
    warnings travel with its result (process-wide warnings filters in those threads lost them, some runs)."""
    slides = [p for group in zip(*mixed.values()) for p in group]  # interleaved kinds, 16 slides
    expected = sorted([_dpi72_warning(p) for p in mixed["dpi72"]] + [_blank_warning(p) for p in mixed["blank"]]
                      + [_half_warning(p) for p in mixed["half"]])
    for attempt in range(3):
        out = tmp_path / f"pred{attempt}.csv"
        result = invoke("predict", *slides, "--model", run, "--out", out, "--workers", "2", "-q")
        assert result.exit_code == 0, result.output
        assert sorted(warnings_of(result)) == expected  # each exactly once
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "pred0.csv", newline=""))}
    assert {k: (r["mpp"], r["mpp_source"], r["tissue_fallback"]) for k, r in rows.items() if k.endswith("0")} == {
        "t0": ("0.25", "tiff-resolution", "False"), "b0": ("0.25", "tiff-resolution", "True"),
        "d0": ("", "", "False"), "h0": ("0.5", "tiff-resolution", "False")}
    assert rows["b1"]["warnings"] == _blank_warning(mixed["blank"][1])[len("Warning: "):]
    assert rows["t1"]["warnings"] == ""
    js = tmp_path / "pred.json"
    assert invoke("predict", mixed["dpi72"][0], "--model", run, "--out", js, "-q").exit_code == 0
    (slide,) = json.loads(js.read_text())["slides"]
    assert slide["warnings"] == [_dpi72_warning(mixed["dpi72"][0])[len("Warning: "):]]
    assert (slide["mpp"], slide["mpp_source"], slide["tissue_fallback"]) == (None, "", False)  # JSON: an unknown number is null


def test_heatmap_warnings_name_the_slide_once(mixed: dict[str, list[Path]], run: Path, tmp_path: Path) -> None:
    slides = [mixed["blank"][0], mixed["dpi72"][0], mixed["tissue"][0]]
    result = invoke("heatmap", *slides, "--model", run, "--out", tmp_path / "maps", "-q")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [_blank_warning(slides[0]), _dpi72_warning(slides[1])]


# --- 3: a model applied to slides unlike its training data ----------------------------------------------------


def test_warns_when_fewer_patches_than_trained_can_be_sampled(run: Path, tmp_path: Path) -> None:
    tiny = _tissue(tmp_path / "tiny.tif", seed=3, size=32)  # a 2 x 2 view, two cells of it tissue, for 6 patches
    result = invoke("predict", tiny, "--model", run, "--out", tmp_path / "p.csv", "--mc", "3", "-q")
    assert result.exit_code == 0, result.output
    assert warnings_of(result)[-1] == (f"Warning: {tiny}: only 2 of 6 patches could be sampled (the view has 2 cell(s) "
                                       "to sample from); the model was trained with 6")
    assert len(warnings_of(result)) == len(set(warnings_of(result)))  # once, not once per pass


def test_train_records_the_cohort_resolution_and_old_runs_still_load(cohort: Path, tmp_path: Path) -> None:
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train_mpp"] == 0.25 and saved["n_patches"] == 4
    old = _run(tmp_path / "old")  # a run written before train_mpp existed: no such key
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace("train_mpp: null\n", ""))
    assert "train_mpp" not in (old / "config.yaml").read_text() and RunFolder(old).load_config().train_mpp is None
    result = invoke("predict", cohort / "slides" / "s0.tif", "--model", old, "--out", tmp_path / "p.csv", "-q")
    assert result.exit_code == 0 and warnings_of(result) == []


def test_no_resolution_warning_when_the_view_and_patches_are_set_in_microns(mixed: dict[str, list[Path]],
                                                                          tmp_path: Path) -> None:
    physical = _run(tmp_path / "physical", train_mpp=0.25, view_mpp=4.0, patch_mpp=0.25)
    result = invoke("predict", mixed["half"][0], "--model", physical, "--out", tmp_path / "p.csv", "-q")
    assert result.exit_code == 0 and warnings_of(result) == []
    patches_only = _run(tmp_path / "patches_only", train_mpp=0.25, patch_mpp=0.25)
    result = invoke("predict", mixed["half"][0], "--model", patches_only, "--out", tmp_path / "p.csv", "-q")
    assert warnings_of(result) == [_half_warning(mixed["half"][0]).replace("the view and patches show", "the view shows")]


def test_train_warns_once_per_slide_across_epochs_and_loader_processes(cohort: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for src in sorted((cohort / "slides").iterdir()):
        (slides / src.name).write_bytes(src.read_bytes())
    blank, dpi72 = _blank(slides / "s0.tif"), _72dpi(slides / "s1.tif", seed=50)
    result = invoke("train", slides, "--labels", cohort / "labels.csv", "--out", tmp_path / "run", *TRAIN,
                    "--epochs", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [_dpi72_warning(dpi72), _blank_warning(blank)]


# --- 4: progress that shows in a log -----------------------------------------------------------------------------


def test_progress_lines_off_a_terminal_and_q_hides_only_those(mixed: dict[str, list[Path]], run: Path,
                                                              tmp_path: Path) -> None:
    slides = mixed["tissue"][:3]
    result = invoke("predict", *slides, "--model", run, "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("predicting")]
    assert len(lines) == 3
    for i, (line, path) in enumerate(zip(lines, slides), start=1):
        assert re.fullmatch(rf"predicting {i}/3 {path.stem}: [0-9.e+-]+ s/slide, ETA \d:\d\d:\d\d", line), line
    quiet = invoke("predict", *slides, "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert quiet.output == f"wrote {tmp_path / 'p.csv'}: 3 slide(s) predicted, 0 failed\n"
    maps = invoke("heatmap", slides[0], "--model", run, "--out", tmp_path / "maps")
    assert re.match(rf"heatmaps 1/1 {slides[0].stem}: [0-9.e+-]+ s/slide, ETA 0:00:00\n", maps.output)


def test_train_q_keeps_epoch_lines_summary_and_model_path(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, *TRAIN,
                    "--epochs", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert re.fullmatch(r"epoch 1/2: train loss \d\.\d{3} acc \d\.\d{3}  entropy \d+\.\d\d  \d+\.\d{3} s/slide, "
                        r"ETA \d:\d\d:\d\d", lines[0]), lines[0]
    assert lines[1].startswith("epoch 2/2: ") and lines[1].endswith("ETA 0:00:00")
    assert "training summary" in lines and lines[-1] == f"model: {run / 'model.safetensors'}"


# --- 5: --labels is checked before any slide is read -----------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    (None, "{csv}: labels file not found"),
    ("slide_id,diagnosis\nt0,negative\n", "{csv}: missing column(s) label; found slide_id, diagnosis"),
    ("slide_id,label\nzz,negative\n", "{csv}: none of the slides to predict has a label (slide_id is the file name "
                                      "without its extension)"),
    ("slide_id,label\nt0,tumour\n", "{csv}: label(s) tumour are not classes of the model (negative, positive)"),
])
def test_predict_checks_labels_before_reading_slides(mixed: dict[str, list[Path]], run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, text: str | None,
                                                     message: str) -> None:
    import wsiats.predict

    labels = tmp_path / "labels.csv"
    if text is not None:
        labels.write_text(text)
    read = []
    monkeypatch.setattr(wsiats.predict.Predictor, "view", lambda self, path: read.append(path))
    out = tmp_path / "p.csv"
    result = invoke("predict", *mixed["tissue"], "--model", run, "--out", out, "--labels", labels)
    assert result.exit_code == 1
    assert result.output == f"Error: {message.format(csv=labels)}\n"
    assert not read and not out.exists()


def test_predict_labels_of_failed_slides_only(run: Path, tmp_path: Path) -> None:
    labels, missing = tmp_path / "labels.csv", tmp_path / "m0.tif"
    labels.write_text("slide_id,label\nm0,negative\n")
    result = invoke("predict", missing, "--model", run, "--out", tmp_path / "p.csv", "--labels", labels, "-q")
    assert result.exit_code == 1 and result.output.splitlines() == [
        f"wrote {tmp_path / 'p.csv'}: 0 slide(s) predicted, 1 failed", "0 labelled slides: every slide with a label failed",
        f"failed: {missing}: no such file"]


def test_predict_json_confusion_names_its_classes(mixed: dict[str, list[Path]], run: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nt0,negative\nt1,positive\n")
    result = invoke("predict", *mixed["tissue"][:2], "--model", run, "--out", tmp_path / "p.csv", "--labels", labels,
                    "--json", "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    assert metrics["classes"] == ["negative", "positive"] and len(metrics["confusion"]) == 2


# --- 6, 7, 8: config files ------------------------------------------------------------------------------------------


def test_yaml_numbers_as_people_write_them(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3e-3\nweight_decay: 1E-5\nview_downsample: 16\nmpp: 5e-1\n")  # PyYAML: 3e-3 is a string
    result = invoke("train", "--config", cfg, "--print-config")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert (printed["lr"], printed["weight_decay"], printed["view_downsample"], printed["mpp"]) == (0.003, 1e-5, 16.0,
                                                                                                   0.5)
    lib = tmp_path / "lib.yaml"
    lib.write_text("lr: 3e-3\nview_mpp: 1_000\n")
    assert load_yaml(lib) == {"lr": 0.003, "view_mpp": 1000.0}  # the library reads it the same way
    cfg.write_text("lr: fast\n")
    result = invoke("train", "--config", cfg, "--print-config")
    assert result.exit_code == 2 and result.output == f"Error: {cfg}: lr must be float, got 'fast' (default 0.001)\n"


def test_print_config_needs_no_other_argument_and_round_trips(tmp_path: Path) -> None:
    result = invoke("train", "--print-config")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["epochs"] == 30 and printed["backend"] == "auto" and printed["skip_bad"] is False
    assert not {"classes", "version", "train_mpp"} & set(printed)
    (tmp_path / "c.yaml").write_text(result.output.replace("epochs: 30", "epochs: 3"))
    again = invoke("train", "--config", tmp_path / "c.yaml", "--print-config")
    assert again.exit_code == 0 and again.output == result.output.replace("epochs: 30", "epochs: 3")
    missing = invoke("train", "--labels", "l.csv", "--out", "r")
    assert missing.exit_code == 2 and missing.output.splitlines()[-1] == "Error: Missing argument 'SLIDE_DIR'."
    missing = invoke("train", "slides", "--out", "r")
    assert missing.exit_code == 2 and missing.output.splitlines()[-1] == "Error: Missing option '--labels'."


def test_config_keys_are_the_long_flag_names_of_every_command(mixed: dict[str, list[Path]], run: Path,
                                                              tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("backend: tifffile\nmpp: 0.5\nskip_bad: true\nn-patches: 7\n")
    printed = yaml.safe_load(invoke("train", "--config", cfg, "--print-config").output)
    assert (printed["backend"], printed["mpp"], printed["skip_bad"], printed["n_patches"]) == ("tifffile", 0.5, True, 7)
    for key in ("classes", "version", "train_mpp"):  # what train records about a run, not options
        cfg.write_text(f"{key}: 1\n")
        result = invoke("train", "--config", cfg, "--print-config")
        assert result.exit_code == 2 and result.output.startswith(f"Error: {cfg}: unknown key(s) {key}; valid keys: ")
        assert key not in result.output.split("valid keys: ")[1].strip().split(", ")
    out = tmp_path / "p.json"
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(f"model: {run}\nout: {out}\njson: true\nn_patches: 3\nquiet: true\n")
    result = invoke("predict", mixed["tissue"][0], "--config", cfg)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"slides": 1, "failed": 0, "out": str(out)}
    assert json.loads(out.read_text())["slides"][0]["n_patches"] == 3
    record = yaml.safe_load((tmp_path / "p.json.config.yaml").read_text())
    assert {"model", "out", "json", "n_patches", "slides"} <= set(record) and "model_dir" not in record
    cfg.write_text(f"model_dir: {run}\n")
    result = invoke("predict", mixed["tissue"][0], "--out", out, "--config", cfg)
    assert result.exit_code == 2 and result.output.startswith(f"Error: {cfg}: unknown key(s) model_dir; valid keys: "
                                                              "model, out, labels, ")
    cfg.write_text("top: many\n")
    result = invoke("heatmap", mixed["tissue"][0], "--model", run, "--out", tmp_path / "m", "--config", cfg)
    assert result.exit_code == 2 and result.output == f"Error: {cfg}: top must be an integer, got 'many'\n"


# --- 9, 10: folders, globs and sub-folders, the same for every command ---------------------------------------------


@pytest.fixture()
def nested(tmp_path: Path) -> Path:
    root = tmp_path / "nested"
    for i, sub in enumerate(("a", "b/c")):
        (root / sub).mkdir(parents=True)
        _tissue(root / sub / f"n{i}.tif", seed=40 + i)
    return root


def test_info_takes_folders_and_globs_like_predict(shared_slides: Path, nested: Path) -> None:
    result = invoke("info", shared_slides / "*.svs", "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name for r in json.loads(result.stdout)] == ["CMU-1-Small-Region.svs", "small.svs"]
    result = invoke("info", nested, "--recursive", "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name for r in json.loads(result.stdout)] == ["n0.tif", "n1.tif"]
    result = invoke("info", nested / "a")
    assert result.exit_code == 0 and f"{nested / 'a' / 'n0.tif'}" in result.output
    missing = nested / "missing.tif"
    result = invoke("info", nested / "a", missing)  # a batch goes on past a slide it cannot open
    assert result.exit_code == 1 and f"{nested / 'a' / 'n0.tif'}\n" in result.output
    assert result.output.splitlines()[-1] == f"failed: {missing}: no such file"


def test_nested_folders_say_how_to_include_them(nested: Path, run: Path, tmp_path: Path) -> None:
    result = invoke("predict", nested, "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert result.exit_code == 1
    assert result.output == (f"Error: {nested}: folder holds no slides (.ome.tiff, .ome.tif, .qptiff, .svs, .tif, .tiff "
                             "..., or DICOM series folders); its sub-folders hold 2 slide(s): pass --recursive, or a "
                             f"glob such as '{nested}/**/*.tif'\n")
    for args in ([nested, "--recursive"], [f"{nested}/**/*.tif"]):
        result = invoke("predict", *args, "--model", run, "--out", tmp_path / "p.csv", "-q")
        assert result.exit_code == 0, result.output
        assert [r["slide_id"] for r in csv.DictReader(open(tmp_path / "p.csv"))] == ["n0", "n1"]


def test_train_on_nested_folders(nested: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nn0,a\nn1,b\n")
    result = invoke("train", nested, "--labels", labels, "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 1
    assert result.output == (f"Error: {labels}: no slide file in {nested} for slide_id n0, n1; its sub-folders hold 2 "
                             f"slide(s): pass --recursive, or a glob such as '{nested}/**/*.tif'\n")
    from wsiats.data import build_cohort

    items, classes = build_cohort(nested, labels, recursive=True)
    assert [it.path for it in items] == [nested / "a" / "n0.tif", nested / "b" / "c" / "n1.tif"]


# --- 11: labels and slides that do not match ------------------------------------------------------------------------


def test_labels_without_slides_and_slides_without_labels(cohort: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text((cohort / "labels.csv").read_text().replace("s5,b\n", "") + "gone1,a\ngone2,b\n")
    slides, run = cohort / "slides", tmp_path / "run"
    result = invoke("train", slides, "--labels", labels, "--out", run, *TRAIN)
    assert result.exit_code == 1
    assert result.output == (f"Error: {labels}: no slide file in {slides} for slide_id gone1, gone2; pass --skip-bad "
                             "to train on the 5 labelled slide(s) that have one\n")
    result = invoke("train", slides, "--labels", labels, "--out", run, *TRAIN, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert warnings_of(result) == [
        f"Warning: {labels}: 2 labelled slide(s) have no slide file in {slides} (gone1, gone2); training on the 5 "
        "that have one",
        f"Warning: {slides}: 1 slide file(s) have no label in {labels} and are left out (s5.tif)",
    ]
    assert "5/0/0" in result.output  # train/val/test


# --- 12: model folder mistakes -------------------------------------------------------------------------------------


def test_model_folder_mistakes(mixed: dict[str, list[Path]], run: Path, tmp_path: Path) -> None:
    slide, out = mixed["tissue"][0], tmp_path / "p.csv"
    result = invoke("predict", slide, "--model", run / "model.safetensors", "--out", out, "-q")
    assert result.exit_code == 0, result.output  # the weights file of a run folder is taken for the folder
    result = invoke("predict", slide, "--model", run / "config.yaml", "--out", out, "-q")
    assert result.exit_code == 1 and result.output == (
        f"Error: {run / 'config.yaml'}: is a file; pass the run folder written by `wsiats train` (the folder that "
        "holds config.yaml and model.safetensors)\n")
    result = invoke("predict", slide, "--model", run.parent, "--out", out, "-q")
    assert result.exit_code == 1
    assert result.output == (f"Error: {run.parent}: not a wsiats run folder (no config.yaml, no model.safetensors); "
                             f"did you mean {run}?\n")
    other = _run(tmp_path / "other", feature_dim=16)
    (other / "config.yaml").write_text((run / "config.yaml").read_text())  # weights of another run
    result = invoke("predict", slide, "--model", other, "--out", out, "-q")
    assert result.exit_code == 1
    assert re.fullmatch(  # the first tensor of another shape, and how many more (the layer names are the model's)
        rf"Error: {re.escape(str(other / 'model.safetensors'))}: weights do not match config.yaml \(feature_net\.\S+ is "
        r"\[16(, \d+)*\] in the file, \[32(, \d+)*\] in the model \(and \d+ more tensors of other shapes\)\); they come "
        r"from another run, or config.yaml was edited\n", result.output), result.output


# --- 13: -v/-q on every subcommand, help with the real defaults --------------------------------------------------


@pytest.mark.parametrize("command", ["info", "train", "predict", "heatmap", "synth", "demo"])
def test_every_subcommand_takes_v_and_q(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert re.search(r"^  -v, --verbose ", result.output, re.M) and re.search(r"^  -q, --quiet ", result.output, re.M)
    assert "[default: None]" not in result.output


def test_predict_v_logs(mixed: dict[str, list[Path]], run: Path, tmp_path: Path) -> None:
    result = invoke("predict", "-v", mixed["tissue"][0], "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert result.exit_code == 0, result.output


def test_train_help_lists_the_feature_nets_and_real_defaults() -> None:
    text = " ".join(CliRunner().invoke(cli, ["train", "--help"], terminal_width=500, max_content_width=500).output.split())
    assert ("Feature network: conch, h-optimus-0, h-optimus-1, prov-gigapath, resnet18, resnet50, small-cnn, uni, uni2-h, "
            "virchow, virchow2, timm:<model name> or hf-hub:<repo>. [default: small-cnn]") in text
    for flag in ("--no-replace", "--augment", "--class-weighting"):
        assert f"[default: {flag}]" in text
    assert "wsiats.models" not in text
