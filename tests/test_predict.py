"""`wsiats.predict`: output records and how slides are read during a prediction."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import _slides
import numpy as np
import pytest

import wsiats._base
import wsiats.predict
import wsiats.reader
from wsiats.checkpoint import build_model, save_weights
from wsiats.config import Config
from wsiats.predict import Prediction, Predictor, write_predictions
from wsiats.run import MODEL_FILE


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved as a run folder: enough to follow how slides are read."""
    folder = tmp_path_factory.mktemp("run")
    cfg = Config(classes=["a", "b"], n_patches=6, patch_size=32, view_downsample=8.0, feature_dim=8)
    cfg.save(folder / "config.yaml")
    save_weights(build_model(cfg), folder / MODEL_FILE)
    return folder


def test_a_failed_slide_has_null_numbers_in_json_and_empty_cells_in_csv(tmp_path: Path) -> None:
    ok = Prediction("a", Path("a.tif"), probs=[0.25, 0.75], n_patches=3, seconds=0.5)
    bad = Prediction("b", Path("b.tif"), error="b.tif: no such file")
    write_predictions(tmp_path / "p.json", [ok, bad], ["neg", "pos"])
    doc = json.loads((tmp_path / "p.json").read_text())
    rec = doc["slides"][1]
    assert (rec["prediction"], rec["p_neg"], rec["p_pos"], rec["spread"]) == ("", None, None, None)
    assert (doc["slides"][0]["p_pos"], doc["slides"][0]["spread"]) == (0.75, 0.0)
    write_predictions(tmp_path / "p.csv", [ok, bad], ["neg", "pos"])
    row = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))[1]
    assert (row["p_neg"], row["p_pos"], row["spread"], row["error"]) == ("", "", "", "b.tif: no such file")


def test_each_slide_is_opened_once_and_read_from_that_handle(run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The view and the patches come from one open slide: replacing the file (mv) after the view is read
    does not mix two slides (the patches used to be read from a second open, of the new file)."""
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    _slides.write_generic_pyramid(a, _slides.tissue_image(256, 256, seed=1), n_levels=2, tile=64)
    _slides.write_generic_pyramid(b, np.zeros((256, 256, 3), np.uint8), n_levels=2, tile=64)
    predictor = Predictor(run, device="cpu", workers=1, topk=True)
    (clean,) = predictor.predict([a])
    assert clean.ok, clean.error

    opened: list[Path] = []
    real_open, real_prepare = wsiats.predict.open_slide, wsiats.predict.prepare_view

    def counting_open(path: Path, **kw: object) -> object:
        opened.append(Path(path))
        return real_open(path, **kw)

    def prepare_then_replace(slide: object, cfg: Config) -> object:
        view = real_prepare(slide, cfg)  # type: ignore[arg-type]
        os.replace(b, a)  # the file is swapped for a black slide between the view and the patch reads
        return view

    monkeypatch.setattr(wsiats.predict, "open_slide", counting_open)
    monkeypatch.setattr(wsiats.reader, "open_slide", counting_open)
    monkeypatch.setattr(wsiats.predict, "prepare_view", prepare_then_replace)
    (swapped,) = predictor.predict([a])
    assert opened == [a]
    assert swapped.ok and swapped.probs == clean.probs and swapped.patches == clean.patches


@pytest.mark.parametrize("mc", [1, 3])
def test_predict_opens_each_slide_file_once(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            mc: int) -> None:
    """However many passes: one Slide is made per slide predicted (counted where every backend starts, so no
    path that opens a file, in any module, goes uncounted)."""
    paths = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for k, path in enumerate(paths):
        _slides.write_generic_pyramid(path, _slides.tissue_image(256, 256, seed=k), n_levels=2, tile=64)
    predictor = Predictor(run, device="cpu", workers=1, mc=mc)
    opened: list[Path] = []
    real_init = wsiats._base.Slide.__init__

    def counting_init(self: wsiats._base.Slide, path: Path) -> None:
        opened.append(Path(path))
        real_init(self, path)

    monkeypatch.setattr(wsiats._base.Slide, "__init__", counting_init)
    preds = list(predictor.predict(paths))
    assert [p.ok for p in preds] == [True, True] and all(p.n_patches == 6 * mc for p in preds)
    assert sorted(opened) == paths  # the next slide's view is read ahead in a thread: in either order


def test_machine_settings_of_the_training_run_are_not_inherited(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with --no-amp --workers 7 --device cpu: predict runs as it is told (defaults here)."""
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = Config(classes=["a", "b"], n_patches=6, patch_size=32, view_downsample=8.0, feature_dim=8, amp=False,
                 workers=7, device="cpu", view_cache_mb=5)
    cfg.save(folder / "config.yaml")
    save_weights(build_model(cfg), folder / MODEL_FILE)
    asked: list[bool] = []
    real = wsiats.predict.autocast_factory
    monkeypatch.setattr(wsiats.predict, "autocast_factory", lambda device, amp: asked.append(amp) or real(device, amp))
    predictor = Predictor(folder)
    assert asked == [True] and predictor.amp
    assert (predictor.cfg.amp, predictor.cfg.workers, predictor.cfg.device, predictor.cfg.view_cache_mb) == (
        True, 2, "auto", 1024)
    assert (predictor.cfg.n_patches, predictor.cfg.feature_dim) == (6, 8)  # what defines the model is the run's
    Predictor(folder, amp=False)
    assert asked == [True, False]
