"""`wsiats.predict`: output records and how slides are read during a prediction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from wsiats.predict import Prediction, write_predictions


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
