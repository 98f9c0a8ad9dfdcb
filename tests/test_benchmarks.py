"""Smoke runs of the benchmark scripts: they finish on tiny inputs and write the promised JSON keys."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_cohort  # noqa: E402
import bench_learning  # noqa: E402
import bench_megapixel_mnist  # noqa: E402
import bench_predict  # noqa: E402

PREDICT_KEYS = (
    "predict_s", "dense_read_s", "dense_mil_s", "floor_s", "predict_over_dense_read", "predict_over_floor",
    "rss_large_mb", "rss_small_mb", "rss_ratio_large_over_small",
)
METHOD_KEYS = ("test_error", "test_error_sem", "time_per_sample_s", "peak_mem_mb")
METHODS = ("ats_5", "ats_10", "u_5", "u_10", "dense_mil", "view_cnn")


def _run(main: Any, tmp: Path) -> dict[str, Any]:
    out = tmp / "result.json"
    with pytest.MonkeyPatch.context() as mp:
        # the scripts' child processes sleep rather than spin when idle (fast on a busy machine); restored after
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        assert main(["--smoke", "--out", str(out), "--cache", str(tmp / "cache"), "--omp-wait-policy", "inherit"]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    return json.loads(text)


@pytest.fixture(scope="module")
def predict_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(bench_predict.main, tmp_path_factory.mktemp("bench_predict"))


@pytest.fixture(scope="module")
def learning_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(bench_learning.main, tmp_path_factory.mktemp("bench_learning"))


def test_predict_keys_and_consistent_ratios(predict_report: dict[str, Any]) -> None:
    r = predict_report
    assert r["smoke"] is True
    for key in PREDICT_KEYS:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["predict_over_floor"] == pytest.approx(r["predict_s"] / r["floor_s"])
    assert r["predict_over_dense_read"] == pytest.approx(r["predict_s"] / r["dense_read_s"])
    assert r["rss_ratio_large_over_small"] == pytest.approx(r["rss_large_mb"] / r["rss_small_mb"])
    # dense MIL reads every tile and then embeds it: never cheaper than the read alone
    assert r["dense_mil_s"] > r["dense_read_s"]
    assert isinstance(r["dense_read_extrapolated"], bool) and r["dense_read_sampled_tiles"] > 0
    assert r["n_patches"] == 10 and r["patch_size"] == 64
    assert set(r["targets"]) == {"predict_over_dense_read", "predict_over_floor", "rss_ratio_large_over_small"}
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())


def test_predict_describes_slides_and_machine(predict_report: dict[str, Any]) -> None:
    r = predict_report
    assert r["slides"]["large"]["width"] > r["slides"]["small"]["width"]
    assert r["dense"]["tissue_tiles"] > r["n_patches"]
    machine = r["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"]
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    # the floor and the Predictor agree on what they computed: same model, same slide
    assert len(r["timing"]["large"]["floor_probs"]) == len(r["timing"]["large"]["predict_probs"]) == 2


def test_learning_keys_per_method(learning_report: dict[str, Any]) -> None:
    r = learning_report
    assert set(r["methods"]) == set(METHODS)
    for name in METHODS:
        m = r["methods"][name]
        for key in METHOD_KEYS:
            assert key in m, (name, key)
        assert 0.0 <= m["test_error"] <= 1.0
        assert m["test_error_sem"] is not None and m["test_error_sem"] >= 0.0  # two seeds in the smoke run
        assert m["time_per_sample_s"] > 0 and math.isfinite(m["peak_mem_mb"])
        assert len(m["per_seed"]) == 2


def test_learning_ratios_and_targets(learning_report: dict[str, Any]) -> None:
    r = learning_report
    dense, ats = r["methods"]["dense_mil"], r["methods"][r["ratios_against"]]
    assert r["ratios_against"] == "ats_10"
    assert r["time_ratio_dense_over_ats"] == pytest.approx(dense["time_per_sample_s"] / ats["time_per_sample_s"])
    if ats["peak_mem_mb"] > 0:  # in the one-process smoke run a step can reuse freed pages: a rise of 0
        assert r["memory_ratio_dense_over_ats"] == pytest.approx(dense["peak_mem_mb"] / ats["peak_mem_mb"])
    else:
        assert r["memory_ratio_dense_over_ats"] is None
    # dense MIL trains on every tissue tile, ATS on ten: its step holds far more pixels
    assert dense["input_mb"] > ats["step"]["input_mb"]
    assert dense["step"]["tiles"] > 10
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert len(r["machine"]["load_average_start"]) == 3


def test_needles_smoke_writes_every_row(tmp_path: Path) -> None:
    import bench_needles

    out = tmp_path / "needles.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        assert bench_needles.main(["--smoke", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert set(doc["rows"]) == set(bench_needles.ROWS)
    for row in ("new_default", "current_default", "nested", "u_n"):
        (run,) = doc["rows"][row]["seeds"]
        assert 0.0 <= run["test_accuracy"] <= 1.0 and 0.0 <= run["tumour_patch_fraction"] <= 1.0
        assert run["train_s"] > 0 and run["train_cpu_s"] > 0 and run["curve"]
    assert doc["rows"]["current_default"]["seeds"][0]["config"]["pooling"] == "ats"
    assert doc["rows"]["nested"]["seeds"][0]["config"]["nested"] is True
    nested_default = doc["rows"]["nested_default"]["seeds"][0]["config"]
    assert nested_default["nested"] is True and nested_default["pooling"] == "gated"
    dense = doc["rows"]["dense_mil"]
    assert dense["per_slide_step"]["dense_mil"]["tiles"] > 0 and dense["time_ratio"] > 0
    frac = doc["cohort"]["informative_fraction_of_tissue"]
    assert 0 < frac["min"] <= frac["mean"] <= frac["max"] < 0.1
    assert (tmp_path / "needles.png").is_file()


@pytest.fixture(scope="module")
def mnist_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    if not (bench_megapixel_mnist.MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the MNIST test set is not beside the repository ({bench_megapixel_mnist.MNIST})")
    tmp = tmp_path_factory.mktemp("bench_megapixel_mnist")
    return _run(bench_megapixel_mnist.main, tmp), tmp


def test_megapixel_mnist_rows_through_the_cli(mnist_report: tuple[dict[str, Any], Path]) -> None:
    r, tmp = mnist_report
    assert r["protocol"] == "smoke" and r["reduced"] is True
    assert r["rows"]["official"]["measured"] is False  # quoted from the issue, never measured
    for row in ("ats_10", "u_10"):
        run = r["rows"][row]["seeds"][0]
        assert 0.0 <= run["test_error"] <= 1.0 and run["n_test"] == r["data"]["n_test"]
        assert run["epochs"] == len(run["curve"]) == 1 and run["seconds_per_epoch"] > 0
        assert run["test_patches_on"]["patches"] == 10 * run["n_test"]  # N = 10 patches per test image
        assert "--no-tissue-mask" in run["command"] and run["command"][3] == "train"
    cmd = r["rows"]["u_10"]["seeds"][0]["command"]
    assert cmd[cmd.index("--attention") + 1] == "uniform" and cmd[cmd.index("--pooling") + 1] == "ats"
    assert len(r["machine"]["loadavg_start"]) == 3
    assert (tmp / "result.png").stat().st_size > 0


def test_megapixel_mnist_images(mnist_report: tuple[dict[str, Any], Path]) -> None:
    r, _ = mnist_report
    data = Path(r["data"]["folder"])
    truth = json.loads((data / "truth.json").read_text())
    with open(data / "labels.csv") as fh:
        rows = [line.split(",") for line in fh.read().splitlines()[1:]]
    assert {s for _, _, s in rows} == {"train", "val", "test"} and len(rows) == len(truth["slides"])
    assert {lab for _, lab, s in rows if s == "train"} == {str(c) for c in range(10)}  # every class trains
    digits = bench_megapixel_mnist.DIGIT
    for sid, label, _ in rows:
        boxes = truth["slides"][sid]["digits"]
        assert sum(b["target"] for b in boxes) == 3 and len(boxes) == 5
        assert all(b["class"] == int(label) for b in boxes if b["target"])
        assert not any(b["class"] == int(label) for b in boxes if not b["target"])
        for i, a in enumerate(boxes):  # no two digits overlap
            assert all(abs(a["x"] - b["x"]) >= digits or abs(a["y"] - b["y"]) >= digits for b in boxes[i + 1:])
    # the digits of the training, validation and test images come from disjoint pools
    used = {s: {b["mnist_index"] for rec in truth["slides"].values() if rec["split"] == s for b in rec["digits"]}
            for s in ("train", "val", "test")}
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]


def test_megapixel_mnist_slide_is_a_pyramid(mnist_report: tuple[dict[str, Any], Path]) -> None:
    import tifffile

    from wsiats.slide import open_slide

    r, _ = mnist_report
    data = Path(r["data"]["folder"])
    path = data / "slides" / "train_00000.tif"
    level0 = tifffile.imread(path)
    images, _ = bench_megapixel_mnist.load_mnist()
    for b in json.loads((data / "truth.json").read_text())["slides"]["train_00000"]["digits"]:  # drawn losslessly
        box = level0[b["y"]: b["y"] + b["height"], b["x"]: b["x"] + b["width"]]
        assert (box == images[b["mnist_index"]][:, :, None]).all()
    with open_slide(path) as slide:
        assert slide.dimensions == (r["data"]["size"],) * 2
        assert slide.level_downsamples == (1.0, 4.0)  # the view (downsample 1500/180) is read from level 1
        view = slide.read_view(downsample=1500 / 180)
        assert view.image.shape == (r["data"]["view_side"], r["data"]["view_side"], 3)


def test_backbones_smoke_report(tmp_path: Path) -> None:
    import bench_backbones

    r = _run(bench_backbones.main, tmp_path)
    assert r["smoke"] is True and set(r["table"]) == {"small-cnn", "vit_tiny"}
    dense = r["dense"]
    assert dense["tissue_tiles"] > dense["sampled_tiles"] > 0 and dense["extrapolated"] is True
    assert dense["read_s"] == pytest.approx(dense["read_per_tile_ms"] / 1e3 * dense["tissue_tiles"])
    for key, row in r["table"].items():
        b = dense["backbones"][key]
        assert b["dense_s"] == pytest.approx(dense["read_s"] + b["embed_s"])
        assert row["dense_over_ats"] == pytest.approx(row["dense_s"] / row["ats_predict_s"])
        assert row["predict_over_decode_once"] == pytest.approx(row["ats_predict_s"] / r["dense_read_decode_once_s"])
        assert r["ats"][key]["n_patches"] == 10
    assert dense["backbones"]["vit_tiny"]["input_size"] == [32, 32]  # the ViT's own input size
    assert r["decode_once"]["file_tiles"] > 0 and r["decode_once"]["extrapolated"] is False
    assert r["cohort"]["slides"] == 2 and all(b["dense_extrapolated"] for b in r["cohort"]["backbones"].values())
    assert r["peer"] == {"skipped": "smoke mode"}
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert len(r["machine"]["load_average_start"]) == 3 and r["machine"]["loadavg_end"]


def test_bench_cohort_smoke_writes_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 12k-cohort benchmark runs its rows (learned, uniform, plain defaults, the one-level estimator and nested)
    and predicts the test split."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out = tmp_path / "cohort.json"
    assert bench_cohort.main(["--smoke", "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads(out.read_text())
    assert set(r["methods"]) == set(bench_cohort.METHODS)
    assert r["methods"]["nested"]["config"]["nested"] is True and r["methods"]["ats_estimator"]["config"]["nested"] is False
    assert r["methods"]["nested"]["config"]["pooling"] == r["methods"]["ats_estimator"]["config"]["pooling"] == "ats"
    uniform = r["methods"]["uniform"]["config"]
    assert (uniform["attention"], uniform["pooling"], uniform["candidates"]) == ("uniform", "ats", 0)  # the paper's U-N
    assert r["methods"]["defaults"]["config"]["pooling"] == "gated"  # the defaults row is wsiats's defaults
    assert r["methods"]["nested_defaults"]["config"]["nested"] is True
    assert r["methods"]["nested_defaults"]["config"]["pooling"] == "gated"
    for m in r["methods"].values():
        assert 0.0 <= m["patch_hit_fraction"] <= 1.0 and 0.0 <= m["test_accuracy"] <= 1.0
        assert m["train_s"] > 0


def test_nested_smoke_report(tmp_path: Path) -> None:
    import bench_nested

    r = _run(bench_nested.main, tmp_path)
    assert r["smoke"] is True and r["fresh_process_per_measurement"] is False
    assert list(r["slides"]) == ["small", "large"]
    for row in r["slides"].values():
        assert row["decode_once"]["file_tiles"] > 0 and row["decode_once"]["seconds"] > 0
        assert row["one_level"]["n_patches"] == row["nested"]["n_patches"] == 32
        assert (row["one_level"]["regions"], row["nested"]["regions"]) == (0, 8)
        for method in ("one_level", "nested"):
            assert row[f"{method}_over_decode_once"] == pytest.approx(row[method]["predict_s"] / row["decode_once"]["seconds"])
    assert set(r["targets"]) == {"nested_over_decode_once_2gpx", "nested_time_growth", "nested_rss_growth"}
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert len(r["machine"]["load_average_start"]) == 3 and r["machine"]["loadavg_end"]
    acc = r["accuracy"]
    assert acc["nested_minus_one_level"] == pytest.approx(acc["nested"]["test_error"] - acc["one_level"]["test_error"])
    assert isinstance(acc["target"]["met"], bool) and [s["seed"] for s in acc["nested"]["per_seed"]] == [0]


def test_mnist_bags_smoke_trains_with_each_instance_loss(tmp_path: Path) -> None:
    if not (bench_megapixel_mnist.MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the MNIST test set is not beside the repository ({bench_megapixel_mnist.MNIST})")
    import bench_mnist_bags

    for loss in bench_mnist_bags.LOSSES:
        out = tmp_path / f"bags_{loss}.json"
        assert bench_mnist_bags.main(["--smoke", "--loss", loss, "--out", str(out)]) == 0
        doc = json.loads(out.read_text())
        assert doc["settings"]["loss"] == loss and doc["curve"][-1]["step"] == 2
        last = doc["curve"][-1]
        assert 0.0 <= last["bag_accuracy"] <= 1.0 and 0.0 <= last["digit_patch_accuracy"] <= 1.0 and last["loss"] > 0
