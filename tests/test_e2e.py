"""One real end-to-end run: synth -> train -> resume -> predict -> heatmap, through the CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import tifffile
from conftest import TINY, invoke
from safetensors.torch import load_file

from wsiats.data import find_slides
from wsiats.train import METRIC_COLUMNS


def call(*args: object) -> tuple[int, str]:
    """(exit status, output) of `wsiats ARGS`."""
    result = invoke(*args)
    return result.exit_code, result.output


def test_synth_says_what_it_wrote(tmp_path: Path) -> None:
    code, text = call("synth", tmp_path, "--n", "2", "--size", "512", "--seed", "3", "-q")
    assert code == 0, text
    assert text.strip() == (f"wrote 2 slides to {tmp_path / 'slides'}, labels to {tmp_path / 'labels.csv'}, "
                            f"regions to {tmp_path / 'truth.json'}")


@pytest.fixture(scope="module")
def run_dir(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own 1-epoch run (not the session's): it also writes a --view-cache."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    code, text = call("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", folder, "--epochs", "1",
                     *TINY, "--view-cache", folder.parent / "views")
    assert code == 0, text
    return folder


def test_train_writes_the_run(cohort: Path, run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "model.safetensors", "last.safetensors", "last_state.pt", "metrics.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert tuple(rows[0]) == METRIC_COLUMNS and [r["epoch"] for r in rows] == ["1"]
    assert 0 <= float(rows[0]["train_acc"]) <= 1 and float(rows[0]["seconds_per_slide"]) > 0
    weights = load_file(str(run_dir / "model.safetensors"))
    assert any(k.startswith("attention_net.") for k in weights) and "classifier.weight" in weights
    labels = list(csv.DictReader(open(cohort / "labels.csv")))
    trained = sorted(r["slide_id"] for r in labels if r.get("split") != "test")
    assert sorted(p.name.split("-")[0] for p in (run_dir.parent / "views").glob("*.npz")) == trained  # --view-cache


def test_train_names_a_view_cache_folder_it_cannot_create(cohort: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = call("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "run", *TINY,
                        "--view-cache", blocker / "views")
    assert code == 2
    assert text.strip() == f"Error: {blocker / 'views'}: cannot create the --view-cache folder (Not a directory)"
    assert not (tmp_path / "run").exists()


def test_train_refuses_to_overwrite_a_run(cohort: Path, run_dir: Path) -> None:
    code, text = call("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run_dir, *TINY)
    assert code == 1
    assert text.strip() == f"Error: {run_dir}: already holds a run; pass --resume to continue it or choose another --out"


def test_resume_continues_to_more_epochs(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(run_dir, run)
    train = ["train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--resume", "-q"]
    code, text = call(*train, "--epochs", "2", "--lr", "5e-3", "--workers", "0")  # --workers 0: as saved, not taken
    assert code == 0, text
    assert text.splitlines()[0] == (f"resuming {run} with --epochs 2 (was 1), --lr 0.005 (was 0.001); the rest as "
                                    f"saved in {run / 'config.yaml'}")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) == 5e-3  # warm-up over, the cosine at its start: the new --lr itself
    assert "epochs: 2\n" in (run / "config.yaml").read_text()
    code, text = call(*train)  # nothing left to do: the run has its 2 epochs
    assert code == 0, text
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 2
    before, after = load_file(str(run_dir / "last.safetensors")), load_file(str(run / "last.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before)


def test_resume_refuses_options_that_would_change_the_model(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(run_dir, run)
    code, text = call("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--resume", "-q",
                        "--epochs", "2", "--feature-dim", "16", "--n-patches", "4", "--seed", "7")
    assert code == 2
    assert text == ("Error: --feature-dim 16 (the run has 32), --seed 7 (the run has 0): would change the model of the "
                    "run being resumed; resume without them, or train a new run into another --out\n")
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1"]


def test_predict_csv_and_json(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    code, text = call("predict", cohort / "slides", "--model", run_dir, "--out", out, "--labels", cohort / "labels.csv", "--mc", "3", "-q")
    assert code == 0, text
    assert text.startswith(f"wrote {out}: 8 slide(s) predicted, 0 failed\n8 labelled slides: accuracy ")
    assert "confusion (rows: truth, columns: prediction)" in text
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["slide_id", "path", "prediction", "p_negative", "p_positive", "spread", "n_patches", "seconds",
                             "mpp", "mpp_source", "tissue_fallback", "warnings", "error"]
    assert {(r["mpp"], r["tissue_fallback"], r["warnings"]) for r in rows} == {("0.25", "False", "")}
    assert {r["mpp_source"] for r in rows} == {"ome", "tiff-resolution"}  # every third synth slide is an OME-TIFF
    assert len(rows) == 8 and all(r["error"] == "" for r in rows)
    for r in rows:
        assert math.isclose(float(r["p_negative"]) + float(r["p_positive"]), 1.0, abs_tol=1e-5)
        assert r["prediction"] in ("negative", "positive") and int(r["n_patches"]) == 12
    js = tmp_path / "pred.json"
    code, text = call("predict", cohort / "slides" / "synth_0000.tif", "--model", run_dir, "--out", js, "--topk", "--json", "-q")
    assert code == 0, text
    assert json.loads(text) == {"slides": 1, "failed": 0, "out": str(js)}
    doc = json.loads(js.read_text())
    slide = doc["slides"][0]
    assert doc["classes"] == ["negative", "positive"] and slide["slide_id"] == "synth_0000"
    assert len(slide["patches"]) == 4
    assert set(slide["patches"][0]) == {"pass", "x", "y", "width", "height", "attention", "weight"}
    assert math.isclose(sum(p["weight"] for p in slide["patches"]), 1.0, abs_tol=1e-6)
    atts = [p["attention"] for p in slide["patches"]]
    assert atts[0] == max(atts)  # top-k: the highest-attention cell first (then spread cells, then zoom around the best)


def test_heatmap_outputs(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "maps"
    code, text = call("heatmap", cohort / "slides" / "synth_0001.tif", "--model", run_dir, "--out", out, "--top", "5", "-q")
    assert code == 0, text
    assert text.strip() == f"wrote 1 heatmap(s) to {out}, 0 failed"
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap.config.yaml", "synth_0001.attention.tif", "synth_0001.geojson", "synth_0001.png"]
    Image.open(out / "synth_0001.png").verify()
    with tifffile.TiffFile(out / "synth_0001.attention.tif") as tif:
        att = tif.pages[0].asarray()
        meta = json.loads(tif.pages[0].description)
    assert att.dtype.name == "float32" and att.shape == (64, 64)
    assert meta["downsample_x"] == pytest.approx(16.0) and math.isclose(float(att.sum()), 1.0, rel_tol=1e-4)
    geo = json.loads((out / "synth_0001.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 5


def test_heatmap_title_holds_the_prediction_and_scale_global(cohort: Path, run_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG's title: slide id, the class and probability `wsiats predict` gives by default; --scale reaches it."""
    import wsiats.heatmap

    seen: list[tuple[str, str]] = []
    real = wsiats.heatmap.render_overlay

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["title"], kwargs["scale"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(wsiats.heatmap, "render_overlay", spy)
    slide = cohort / "slides" / "synth_0002.tif"
    code, text = call("heatmap", slide, "--model", run_dir, "--out", tmp_path / "maps", "--scale", "global", "-q")
    assert code == 0, text
    code, text = call("predict", slide, "--model", run_dir, "--out", tmp_path / "pred.csv", "-q")
    assert code == 0, text
    (row,) = list(csv.DictReader(open(tmp_path / "pred.csv")))
    p = float(row[f"p_{row['prediction']}"])
    assert seen == [(f"synth_0002: predicted {row['prediction']} (p = {p:.2f})", "global")]
    assert "scale: global" in (tmp_path / "maps" / "heatmap.config.yaml").read_text()


def test_predict_and_heatmap_on_real_scanner_files(shared_slides: Path, run_dir: Path, tmp_path: Path) -> None:
    """SVS, generic TIFF and DICOM (one file, and a series folder of a 16-px slide, smaller than any
    view or thumbnail): every slide gets a prediction and a heatmap."""
    slides = [shared_slides / n for n in ("CMU-1-Small-Region.svs", "small.svs", "boxes.tiff", "sm_image.dcm",
                                          "dicom-boxes")]
    code, text = call("predict", *slides, "--model", run_dir, "--out", tmp_path / "pred.csv", "-q")
    assert code == 0, text
    with open(tmp_path / "pred.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["CMU-1-Small-Region", "small", "boxes", "sm_image", "dicom-boxes"]
    assert all(r["error"] == "" and int(r["n_patches"]) >= 1 for r in rows)
    # the whole folder: also the fluorescence NDPI, the grey JPEG pyramid, the RGBA and the strip TIFF
    n = len(find_slides([shared_slides]))
    assert n >= 10
    code, text = call("heatmap", shared_slides, "--model", run_dir, "--out", tmp_path / "maps", "-q")
    assert code == 0, text
    *warned, last = text.strip().splitlines()
    assert last == f"wrote {n} heatmap(s) to {tmp_path / 'maps'}, 0 failed"
    assert warned and all(line.startswith("Warning: ") for line in warned)  # e.g. boxes.tiff's 72 dpi, once each
    assert len(warned) == len(set(warned))
    assert len(list((tmp_path / "maps").glob("*.png"))) == n
    assert (tmp_path / "maps" / "dicom-boxes.png").is_file()  # the DICOM series folder is one slide


_PEAK_RSS = """
import sys
from pathlib import Path
from wsiats.predict import Predictor
predictor = Predictor(sys.argv[1], device="cpu", workers=2)
pred = list(predictor.predict([Path(sys.argv[2])]))[0]
assert pred.ok, pred.error
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_predict_memory_does_not_grow_with_the_slide(run_dir: Path, sparse: Any, tmp_path: Path) -> None:
    """A 10-gigapixel slide costs predict what a 2-megapixel one does, plus its view (391^2 px here)."""
    import subprocess
    import sys

    import _slides
    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["view_downsample"] = 256.0  # the attention net is convolutional: any view size works
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    small = tmp_path / "small.tif"
    _slides.write_generic_pyramid(small, _slides.tissue_image(1536, 1536, seed=1), n_levels=3, tile=256, mpp=0.25)

    def peak_mb(slide: Path) -> float:
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(run), str(slide)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.split()[-1])

    large_mb, small_mb = peak_mb(sparse.path), peak_mb(small)
    assert large_mb - small_mb < 60, (large_mb, small_mb)  # level 0 alone would be 30 GB


def test_train_says_when_nothing_moved(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose loss and attention entropy stay put (here: a learning rate of 1e-12) is told so, once,
    with what to try; a run that learns is not (the stall check itself is unit-tested below)."""
    import wsiats.train

    monkeypatch.setattr(wsiats.train, "PLATEAU_EPOCHS", 2)
    code, text = call("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "run",
                        "--epochs", "2", "--lr", "1e-12", "--warmup-epochs", "0", *TINY)
    assert code == 0, text
    stalls = [line for line in text.splitlines() if "have not moved in 2 epochs" in line]
    assert len(stalls) == 1 and stalls[0].startswith("Warning: training loss (")
    assert stalls[0].endswith("try --epochs (a needle cohort can take 50+), --candidates 512, --lr 3e-3")


def test_stall_check() -> None:
    from wsiats.train import _stalled

    flat = [{"train_loss": 0.693 + 0.001 * i, "attention_entropy": 10.42} for i in range(5)]
    assert _stalled(flat)
    assert not _stalled([*flat[:4], {"train_loss": 0.65, "attention_entropy": 10.42}])
    assert not _stalled([*flat[:4], {"train_loss": 0.693, "attention_entropy": 10.2}])
