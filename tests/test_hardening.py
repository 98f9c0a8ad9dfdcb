"""Issue "Hardening": no data lost, no garbage predicted, no traceback, no download from an untrusted model.

Each test drives the CLI (click's CliRunner) or the library with one of the inputs an adversarial run
found, and checks the exit status and the exact `Error: ...` / `Warning: ...` line.
"""

from __future__ import annotations

import csv
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import Result

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TINY, invoke  # noqa: E402
from test_reliability import _good, assert_clean  # noqa: E402


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run


# --- 1. demo and synth never overwrite a folder they did not make ---------------------------------------------------


def test_synth_and_demo_refuse_a_folder_they_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "cohort").mkdir(parents=True)
    (mine / "cohort" / "labels.csv").write_text("slide_id,label\nmy_case,tumour\n")
    (mine / "NOTES.txt").write_text("keep me\n")
    for args in (["synth", mine / "cohort", "--n", "2", "--size", "512"], ["demo", "--out", mine, "--n", "8"]):
        result = invoke(*args, "-q")
        assert_clean(result, 1)
        folder = args[1] if args[0] == "synth" else mine
        assert result.output == (f"Error: {folder}: folder is not empty and was not made by `wsiats {args[0]}`; "
                                 "choose a new folder, or pass --overwrite to write into it anyway\n")
    assert (mine / "cohort" / "labels.csv").read_text() == "slide_id,label\nmy_case,tumour\n"
    assert sorted(p.name for p in mine.rglob("*")) == ["NOTES.txt", "cohort", "labels.csv"]


def test_synth_writes_again_into_its_own_folder_and_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert_clean(invoke("synth", out, "--n", "2", "--size", "512", "-q"), 0)
    assert (out / "wsiats-synth.txt").is_file()
    assert_clean(invoke("synth", out, "--n", "2", "--size", "512", "--seed", "1", "-q"), 0)  # its own folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    assert_clean(invoke("synth", other, "--n", "2", "--size", "512", "--overwrite", "-q"), 0)
    assert (other / "x.txt").read_text() == "x" and (other / "labels.csv").is_file()


def test_demo_run_again_keeps_files_the_user_added(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--n", "8", "--size", "1024", "--epochs", "1", "-q"]
    assert_clean(invoke(*args), 0)
    (out / "run" / "NOTES.txt").write_text("my notes\n")
    assert_clean(invoke(*args), 0)
    assert (out / "run" / "NOTES.txt").read_text() == "my notes\n"


# --- 2. labels attached to the wrong slide --------------------------------------------------------------------------


def test_two_files_with_one_slide_id_are_an_error_naming_both(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    twin = slides / "synth_0000.ome.tif"
    shutil.copy(_good(cohort, 1), twin)
    result = invoke("train", slides, "--labels", cohort / "labels.csv", "--out", tmp_path / "run", *TINY)
    assert_clean(result, 1)
    assert result.output == (f"Error: {twin} and {slides / 'synth_0000.tif'} have the same slide_id 'synth_0000', "
                             "so its label would apply to either; rename or remove one\n")
    result = invoke("predict", slides, "--model", run_dir, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 1)
    assert result.output == (f"Error: {twin} and {slides / 'synth_0000.tif'} have the same slide id 'synth_0000'; "
                             "rename one, or give them to separate commands\n")
    assert not (tmp_path / "p.csv").exists()


def test_a_repeated_labels_column_is_an_error(cohort: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,label\nsynth_0000,negative,positive\n")
    result = invoke("train", cohort / "slides", "--labels", labels, "--out", tmp_path / "run", *TINY)
    assert_clean(result, 1)
    assert result.output == f"Error: {labels}: column(s) label appear more than once in the header\n"


def test_labels_that_differ_only_in_case_or_number_format_are_warned_about(tmp_path: Path) -> None:
    from wsiats.data import read_labels

    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,1\nb,1.0\nc,Negative\nd,negative\ne,2\n")
    with pytest.warns(UserWarning) as seen:
        read_labels(labels)
    assert sorted(str(w.message) for w in seen) == [
        f"{labels}: labels '1' and '1.0' differ only in case or number format but are separate classes; "
        "write them the same way if they mean one class",
        f"{labels}: labels 'Negative' and 'negative' differ only in case or number format but are separate classes; "
        "write them the same way if they mean one class",
    ]


# --- 5. NaN: never saved, never loaded, never written as JSON -------------------------------------------------------


def test_a_huge_learning_rate_stops_training_with_one_line_and_saves_no_nan_weights(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--epochs", "2",
                    "--lr", "1e30", "--warmup-epochs", "0", *TINY)
    assert_clean(result, 1)
    assert result.output == ("Error: training stopped in epoch 1: the training loss is nan (the run diverged); "
                             "no epoch was saved; try a lower --lr\n")
    assert not (run / "model.safetensors").exists() and not (run / "last_state.pt").exists()


def test_a_nan_loss_in_a_later_epoch_keeps_the_last_good_checkpoint(cohort: Path, tmp_path: Path) -> None:
    import torch

    from wsiats.models import ATSModel
    from wsiats.train import TrainHooks

    class WeightsGoBadInEpoch2(TrainHooks):  # every loss of epoch 2 is then NaN
        def on_step(self, epoch: int, step: int, model: ATSModel) -> None:
            if (epoch, step) == (1, 1):
                with torch.no_grad():
                    model.classifier.weight.fill_(float("nan"))

    run = tmp_path / "run"
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--epochs", "3",
                    "--val-fraction", "0", *TINY, obj=WeightsGoBadInEpoch2())
    assert_clean(result, 1)
    assert result.output.split("\n", 1)[1] == (f"Error: training stopped in epoch 2: the training loss is nan (the run diverged); "
                             f"epoch 1 in {run / 'last.safetensors'} is the last one saved; try a lower --lr\n")
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == ["1"]
    assert_clean(invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.csv", "-q"), 0)


def test_non_finite_weights_are_refused_naming_the_file(run_dir: Path, cohort: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    run = _copy_run(run_dir, tmp_path)
    state = load_file(str(run / "model.safetensors"))
    state["classifier.weight"][0, 0] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.json", "-q")
    assert_clean(result, 1)
    assert result.output == (f"Error: {run / 'model.safetensors'}: weights hold NaN or infinite values "
                             "(classifier.weight); the training run diverged, retrain it with a lower --lr\n")


def _no_nan(text: str) -> object:
    import json

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_json_outputs_hold_null_never_nan(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    from wsiats.predict import Prediction, write_predictions

    out = tmp_path / "p.json"
    pred = Prediction("a", Path("a.tif"), probs=[0.5, 0.5], spread=float("nan"), passes=[[0.5, 0.5]],
                      patches=[{"x": 0, "attention": float("nan"), "weight": float("inf")}])
    write_predictions(out, [pred], ["negative", "positive"])
    doc = _no_nan(out.read_text())
    assert doc["slides"][0]["spread"] is None and doc["slides"][0]["patches"][0]["attention"] is None  # type: ignore[index]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nsynth_0000,negative\n")  # one class: AUC is undefined
    result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "q.csv", "--labels", labels,
                    "--json", "-q")
    assert_clean(result, 0)
    assert _no_nan(result.stdout)["metrics"]["auc"] is None  # type: ignore[index]


# --- 4. training on slides it cannot read ---------------------------------------------------------------------------


def _train_rows(cohort: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(cohort / "labels.csv", newline="")))


def test_when_every_view_fails_nothing_is_trained_or_saved(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--epochs", "1", *TINY,
            "--view-downsample", "0.5"]
    result = invoke(*args)
    assert_clean(result, 1)
    first = _good(cohort, 0)
    assert result.output.startswith("Error: 6 unreadable slide(s) in the cohort: ")
    assert f"{first}: view downsample 0.5 is finer than level 0; a view must be >= 1" in result.output
    assert result.output.endswith(". Fix or remove them, or pass --skip-bad\n")
    for extra, n_train in ((["--val-fraction", "0"], 6), ([], 4)):  # without and with a validation split
        result = invoke(*args, "--skip-bad", *extra)
        assert_clean(result, 1)
        assert result.output == f"Error: none of the {n_train} training slide(s) can be read: nothing to train on\n"
        assert not (run / "model.safetensors").exists() and not (run / "last_state.pt").exists()


def test_skipped_views_are_left_out_of_the_counts(cohort: Path, tmp_path: Path) -> None:
    from wsiats.config import resolve
    from wsiats.train import train

    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    train_ids = [r["slide_id"] for r in _train_rows(cohort) if r["split"] == "train"]
    broken = slides / f"{train_ids[0]}.tif"
    _corrupt_level0(broken)  # opens, but its view (read from level 0 at downsample 2) cannot be read
    cfg = resolve(overrides={"epochs": 1, "batch_size": 2, "n_patches": 4, "patch_size": 32, "view_downsample": 2.0,
                             "workers": 0, "val_fraction": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left out once, before training: no warning every epoch
        result = train(slides, cohort / "labels.csv", tmp_path / "run", cfg, skip_bad=True, progress=False)
    assert result.skipped == [str(broken)]
    assert (result.n_train, result.n_val, result.n_test) == (len(train_ids) - 1, 0, 8 - len(train_ids))


def _corrupt_level0(path: Path) -> None:
    """Every level-0 tile garbage; the reduced level (from which the view is read) intact."""
    with tifffile.TiffFile(path) as tif:
        n = len(tif.pages[0].dataoffsets)
    for index in range(n):
        _corrupt_tile(path, index)


def _corrupt_tile(path: Path, index: int) -> None:
    import _slides

    _slides.corrupt_tile(path, page=0, index=index)


def test_skip_bad_trains_past_tiles_that_cannot_be_read_and_counts_them(cohort: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(cohort / "slides", slides)
    train_id = next(r["slide_id"] for r in _train_rows(cohort) if r["split"] == "train"
                    and int(r["slide_id"][-4:]) % 3 != 2)  # a plain TIFF (every third one is an OME-TIFF)
    broken = slides / f"{train_id}.tif"
    _corrupt_level0(broken)
    run = tmp_path / "run"
    args = ["train", slides, "--labels", cohort / "labels.csv", "--out", run, "--epochs", "2", "--val-fraction", "0",
            *TINY]
    result = invoke(*args)
    assert_clean(result, 1)
    assert result.output.startswith(f"Error: {broken}: cannot read level 0 region ")
    assert result.output.endswith("; pass --skip-bad to train on without the steps that read it\n")
    result = invoke(*args, "--skip-bad")
    assert_clean(result, 0)
    lines = [line for line in result.output.splitlines() if not line.startswith("epoch ")][:2]  # -q keeps epoch lines
    assert lines[0].startswith(f"Warning: left out of the steps that read it (--skip-bad): {broken}: cannot read ")
    assert lines[1] == f"2 read(s) of tiles failed and were left out (--skip-bad): {broken} (2x)"  # once an epoch
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == ["1", "2"]


# --- 6. blank slides and dangling links are reported -----------------------------------------------------------------


@pytest.mark.parametrize(("value", "rgb"), [(255, "255, 255, 255"), (0, "0, 0, 0")])
def test_a_blank_slide_is_warned_about_in_predict_and_heatmap(run_dir: Path, tmp_path: Path, value: int,
                                                               rgb: str) -> None:
    import _slides

    path = tmp_path / "blank.tif"
    _slides.write_generic_pyramid(path, np.full((512, 512, 3), value, np.uint8), n_levels=2, tile=128)
    warning = (f"Warning: {path}: no tissue found in the view (the view is blank, every pixel about RGB {rgb}); "
               "sampling from the whole slide\n")
    result = invoke("predict", path, "--model", run_dir, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 0)
    assert result.stderr == warning
    result = invoke("heatmap", path, "--model", run_dir, "--out", tmp_path / "maps", "-q")
    assert_clean(result, 0)
    assert result.stderr == warning


def test_a_dangling_symlink_among_predicted_slides_is_a_failed_slide(cohort: Path, run_dir: Path,
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(_good(cohort, 0), folder / "a.tif")
    (folder / "gone.tif").symlink_to(tmp_path / "deleted.tif")
    out = tmp_path / "p.csv"
    result = invoke("predict", folder, "--model", run_dir, "--out", out, "-q")
    assert_clean(result, 1)
    assert result.output.splitlines() == [f"wrote {out}: 1 slide(s) predicted, 1 failed",
                                          f"failed: {folder / 'gone.tif'}: no such file"]


# --- 12. loading a run never downloads -----------------------------------------------------------------------------


def _with_feature_net(run_dir: Path, tmp_path: Path, name: str) -> Path:
    import yaml

    run = _copy_run(run_dir, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["feature_net"] = name
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_a_run_naming_a_hub_repository_is_refused_without_allow_hub(cohort: Path, run_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    called: list[dict[str, object]] = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: called.append({"name": name, **kw}) or 1 / 0)
    run = _with_feature_net(run_dir, tmp_path, "hf-hub:attacker/x")
    for command, out in (("predict", tmp_path / "p.csv"), ("heatmap", tmp_path / "maps")):
        result = invoke(command, _good(cohort, 0), "--model", run, "--out", out, "-q")
        assert_clean(result, 1)
        assert result.output == (f"Error: {run / 'config.yaml'}: feature_net 'hf-hub:attacker/x' would be fetched "
                                 "from the Hugging Face hub; pass --allow-hub if you trust this model folder and "
                                 "that repository\n")
    assert called == []
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.csv", "--allow-hub", "-q")
    assert_clean(result, 1)
    assert called == [{"name": "hf-hub:attacker/x", "pretrained": False, "num_classes": 0}]  # the run's own weights


def test_dependency_floors_that_keep_hub_checkpoints_from_being_unpickled() -> None:
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"torch>=2.6"' in text and '"timm>=1.0.9"' in text


# --- 9. every model-config value that sizes memory is bounded ------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--feature-dim", "100000"], "feature_dim (flag --feature-dim) must be at most 2048, got 100000"),
    (["--n-patches", "1000000"], "n_patches (flag --n-patches) must be at most 10000, got 1000000"),
    (["--patch-size", "5000"], "patch_size (flag --patch-size) must be at most 4096, got 5000"),
    (["--batch-size", "5000"], "batch_size (flag --batch-size) must be at most 1024, got 5000"),
    (["--workers", "1000"], "workers (flag --workers) must be at most 64, got 1000"),
    (["--n-patches", "1000", "--patch-size", "1024", "--batch-size", "8"],
     "n_patches (flag --n-patches) times batch_size times patch_size^2 is 8388608000 patch pixels a step, over the "
     "limit of 268435456, got 1000"),
])
def test_memory_sizing_options_are_bounded(tmp_path: Path, flags: list[str], message: str) -> None:
    result = invoke("train", tmp_path, "--labels", "x.csv", "--out", tmp_path / "r", *flags)
    assert_clean(result, 2)
    assert result.output == f"Error: {message}\n"


def test_a_run_config_with_a_huge_feature_dim_is_refused_before_building(cohort: Path, run_dir: Path,
                                                                         tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("feature_dim: 32", "feature_dim: 100000"))
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 1)
    assert result.output == f"Error: {config}: feature_dim (flag --feature-dim) must be at most 2048, got 100000\n"


# --- 10. one line instead of a traceback ----------------------------------------------------------------------------


def test_a_symlink_loop_is_a_failed_slide(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop.tif"
    loop.symlink_to(tmp_path / "loop.tif")
    result = invoke("predict", loop, _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 1)
    assert result.output.splitlines() == [f"wrote {tmp_path / 'p.csv'}: 1 slide(s) predicted, 1 failed",
                                          f"failed: {loop}: no such file"]
    result = invoke("heatmap", loop, "--model", run_dir, "--out", tmp_path / "maps", "-q")
    assert_clean(result, 1)
    assert result.output.splitlines()[-1] == f"failed: {loop}: no such file"


def test_a_huge_labels_field_is_a_one_line_error(cohort: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nsynth_0000," + "x" * 200_000 + "\n")
    result = invoke("train", cohort / "slides", "--labels", labels, "--out", tmp_path / "run", *TINY)
    assert_clean(result, 1)
    assert result.output == (f"Error: {labels}: not a readable CSV file (field larger than field limit (131072))\n")


def test_integer_yaml_keys_are_one_line_errors(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("1: 2\nepoks: 3\n")
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "r",
                    "--config", config)
    assert_clean(result, 2)
    assert result.output.startswith(f"Error: {config}: unknown key(s) 1, epoks; valid keys: ")
    config.write_text("mc: 2\n1: 2\n")
    result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "p.csv", "--config", config)
    assert_clean(result, 2)
    assert result.output.startswith(f"Error: {config}: unknown key(s) 1; valid keys: model, out, ")
    run = _copy_run(run_dir, tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "1: 2\n2: x\n")
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 1)
    assert result.output == f"Error: {run / 'config.yaml'}: unknown key(s) 1, 2\n"


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_out_of_range_seeds_are_usage_errors(cohort: Path, run_dir: Path, tmp_path: Path, seed: str) -> None:
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "r",
                    "--seed", seed)
    assert_clean(result, 2)
    assert result.output == f"Error: seed (flag --seed) must be an integer from 0 to {2**63 - 1}, got {seed}\n"
    result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "p.csv", "--seed", seed)
    assert_clean(result, 2)
    assert f"Error: Invalid value for '--seed': {seed} is not in the range 0<=x<={2**63 - 1}." in result.output


def _malformed_states() -> dict[str, object]:
    import torch

    return {
        "a tensor": torch.zeros(3),
        "no keys": {},
        "wrong optimizer": {"model": {}, "optimizer": {"state": 1}},
        "string epoch": {"optimizer": None, "epoch": "x"},
        "bad history": None,  # filled in from the run's real state below
    }


@pytest.mark.parametrize("case", list(_malformed_states()))
def test_a_malformed_weights_only_training_state_is_a_one_line_error(cohort: Path, run_dir: Path, tmp_path: Path,
                                                                    case: str) -> None:
    import torch

    run = _copy_run(run_dir, tmp_path)
    state = _malformed_states()[case]
    if state is None:
        state = torch.load(run / "last_state.pt", weights_only=True)
        state["history"] = torch.zeros(1, 3)  # type: ignore[index]
    torch.save(state, run / "last_state.pt")
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--resume", "-q")
    assert_clean(result, 1)
    assert result.output.startswith(f"Error: {run / 'last_state.pt'}: not a training state of this run (")
    assert result.output.endswith("); train again into a new --out\n") and result.output.count("\n") == 1


def test_a_full_disk_while_saving_weights_is_a_one_line_error(cohort: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    from wsiats import checkpoint

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    run = tmp_path / "run"
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--epochs", "1", *TINY)
    assert_clean(result, 1)
    assert result.output == (f'Error: {run / "model.safetensors"}: cannot write model weights (Error while '
                             'serializing: IoError(Os {{ code: 28, kind: StorageFull, message: "No space left on '
                             'device" }}))\n').replace("{{", "{").replace("}}", "}")
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT is not; "),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer; "),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     "RANK=5 and LOCAL_RANK=0 do not fit WORLD_SIZE=2; "),
])
def test_a_broken_torchrun_environment_is_a_usage_error(cohort: Path, run_dir: Path, tmp_path: Path,
                                                        env: dict[str, str], message: str) -> None:
    hint = "torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (unset WORLD_SIZE to run one process)"
    for args in (["train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "r", *TINY],
                 ["predict", _good(cohort, 0), "--model", run_dir, "--out", tmp_path / "p.csv", "-q"]):
        result = invoke(*args, env=env)
        assert_clean(result, 2)
        assert result.output == f"Error: {message}{hint}\n"


# --- 11. messages that mislead; outputs checked before the work -----------------------------------------------------


def test_unreadable_config_and_weights_say_so(cohort: Path, run_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import io

    run = _copy_run(run_dir, tmp_path)
    real_open = builtins.open
    locked: set[str] = set()

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if str(file) in locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # what Path.read_text opens with
    from wsiats.checkpoint import load_model
    from wsiats.errors import CheckpointError

    for name, what in (("config.yaml", "the config"), ("model.safetensors", "the model weights")):
        locked.clear()
        locked.add(str(run / name))
        with pytest.raises(CheckpointError) as caught:
            load_model(run)
        assert str(caught.value) == f"{run / name}: cannot read {what} (Permission denied)"


def test_outputs_are_checked_before_any_slide_is_predicted(cohort: Path, run_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiats.predict import Predictor

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("predicted before checking the output")

    monkeypatch.setattr(Predictor, "predict", never)
    folder = tmp_path / "p.csv"
    folder.mkdir()
    too_long = "file name too long; choose a shorter one"
    cases = [(folder, folder, "is a folder; give a file name"),
             (Path("/sys/pred.csv"), Path("/sys/pred.csv"), "Permission denied"),  # read-only, even for root
             (tmp_path / ("p" * 300 + ".csv"), tmp_path / ("p" * 300 + ".csv"), too_long),
             (tmp_path / ("p" * 245 + ".csv"), tmp_path / ("p" * 245 + ".csv.config.yaml"), too_long)]
    cases = [case for case in cases if case[0].parent.is_dir()]  # /sys: Linux only
    for out, named, why in cases:
        result = invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", out, "-q")
        assert_clean(result, 1)
        assert result.output == f"Error: {named}: {why}\n"
    long = tmp_path / ("q" * 239 + ".csv")  # 243 characters: <name>.config.yaml is 255
    monkeypatch.undo()
    assert_clean(invoke("predict", _good(cohort, 0), "--model", run_dir, "--out", long, "-q"), 0)
    assert long.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_write_error_names_the_output_not_its_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from wsiats._io import atomic_open

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "p.csv"
    with pytest.raises(OSError) as caught, atomic_open(out, "w") as fh:
        fh.write("x")
    assert caught.value.filename == str(out) and caught.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_duplicate_class_names_are_refused(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("- positive", "- negative"))
    result = invoke("predict", _good(cohort, 0), "--model", run, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 1)
    assert result.output == (f"Error: {config}: classes must be at most 10000 distinct names, "
                             "got ['negative', 'negative']\n")


def test_heatmaps_written_into_the_slide_folder_are_not_slides(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(_good(cohort, 0), folder / "a.tif")
    assert_clean(invoke("heatmap", folder, "--model", run_dir, "--out", folder, "-q"), 0)
    assert (folder / "a.attention.tif").is_file()
    result = invoke("predict", folder, "--model", run_dir, "--out", tmp_path / "p.csv", "-q")
    assert_clean(result, 0)
    assert result.output == f"wrote {tmp_path / 'p.csv'}: 1 slide(s) predicted, 0 failed\n"


def test_info_shows_the_good_slides_when_one_is_bad(cohort: Path, tmp_path: Path) -> None:
    import json

    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"")
    result = invoke("info", _good(cohort, 0), bad, _good(cohort, 1), "--json")
    assert_clean(result, 1)
    assert [r["path"] for r in json.loads(result.stdout)] == [str(_good(cohort, 0)), str(_good(cohort, 1))]
    assert result.stderr == f"failed: {bad}: file is empty (0 bytes)\n"
    result = invoke("info", _good(cohort, 0), bad)
    assert_clean(result, 1)
    assert str(_good(cohort, 0)) in result.stdout and "backend tifffile" in result.stdout


# --- 13. the view cache checks what it stores against the slide -----------------------------------------------------


def test_a_poisoned_view_cache_file_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import _slides

    from wsiats.config import Config
    from wsiats.data import Item, ViewDataset

    items = []
    for k in range(2):
        path = tmp_path / f"s{k}.tif"
        _slides.write_generic_pyramid(path, _slides.tissue_image(256, 320, seed=k), n_levels=2, tile=64, mpp=0.5)
        items.append(Item(f"s{k}", path, k))
    cache = tmp_path / "cache"
    cfg = Config(view_downsample=4.0, view_cache=str(cache))
    truth = [ViewDataset(items, cfg)[k][1] for k in range(2)]
    (mine,), (other,) = sorted(cache.glob("s0-*.npz")), sorted(cache.glob("s1-*.npz"))
    stored = dict(np.load(mine))

    def load() -> str:
        caplog.clear()
        with caplog.at_level("WARNING", logger="wsiats.data"):
            view = ViewDataset(items, cfg)[0][1]
        assert np.array_equal(view.image, truth[0].image) and view.downsample == truth[0].downsample
        return caplog.text

    def tampered(**changes: object) -> str:
        np.savez(mine, **{**stored, **changes})
        return load()

    mine.write_bytes(other.read_bytes())  # another slide's view under this slide's name
    assert "stored for another slide or setting: the hash of the slide file's header differs" in load()
    assert load() == ""  # the file was written again from the slide, and is used
    assert "the view downsample differs" in tampered(requested_downsample=np.float64(2.0))
    assert "the slide's size differs" in tampered(dimensions=np.asarray([640, 512]))
    small = {"image": stored["image"][::2, ::2], "mask": stored["mask"][::2, ::2]}
    assert "a view of 40 x 32 px does not fit the slide" in tampered(**small)
    assert "does not fit the slide" in tampered(downsample=np.asarray([8.0, 8.0]))
