"""`wsiats info` end to end: JSON output, the table, and one-line errors with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from _slides import Generated

from wsiats.cli import cli


def test_info_json_keys(svs: tuple[Generated, dict[str, np.ndarray]]) -> None:
    path = svs[0].path
    result = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert {"path", "backend", "vendor", "level_count", "level_dimensions", "level_downsamples", "mpp",
            "objective_power", "associated_images"} <= set(rec)
    assert rec["level_dimensions"] == [[800, 600], [200, 150], [50, 37]] and rec["mpp"] == [0.25, 0.25]


def test_info_several_slides_and_table(svs: tuple[Generated, dict[str, np.ndarray]], generic_tiff: Generated) -> None:
    args = ["info", str(svs[0].path), str(generic_tiff.path), "--json", "--backend", "openslide"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    recs = json.loads(result.stdout)
    assert [r["backend"] for r in recs] == ["openslide", "openslide"]
    result = CliRunner().invoke(cli, ["info", str(generic_tiff.path), "--mpp", "0.3"])
    assert result.exit_code == 0 and "mpp 0.3000 x 0.3000" in result.output and "generic-tiff" in result.output


def test_info_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.svs"
    result = CliRunner().invoke(cli, ["info", str(missing)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {missing}: no such file"
    empty = tmp_path / "empty.tif"
    empty.touch()
    result = CliRunner().invoke(cli, ["info", str(empty)])
    assert result.exit_code == 1 and result.stderr.strip() == f"Error: {empty}: file is empty (0 bytes)"
    junk = tmp_path / "junk.ndpi"
    junk.write_bytes(b"not a slide at all" * 10)
    result = CliRunner().invoke(cli, ["info", str(junk)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {junk}: not a whole-slide image format tifffile or OpenSlide can read"


def test_decompression_bomb_is_refused_unless_the_limit_is_raised(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One 5000^2 deflate tile, 72 MiB decoded from a 0.1 MB file: over the 64 MiB default."""
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(path, np.full((5000, 5000, 3), 250, np.uint8), photometric="rgb", tile=(5008, 5008),
                     compression="zlib")
    assert path.stat().st_size < 200_000
    monkeypatch.delenv("WSIATS_MAX_TILE_MB", raising=False)  # restored after the test: --max-tile-mb sets it
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {path}: level 0 stores tiles of 5008 x 5008 px (72 MiB each, decoded), over "
                             "the 64 MiB limit of one decoded tile or strip (a decompression bomb?); --max-tile-mb "
                             "raises the limit\n")
    result = CliRunner().invoke(cli, ["--max-tile-mb", "80", "info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["level_dimensions"] == [[5000, 5000]]
