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

import bench_learning  # noqa: E402
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
