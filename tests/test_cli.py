"""CLI contract: exit codes and the exact `Error:` lines, help for every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsiats import __version__
from wsiats.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "predict", "heatmap", "synth", "demo", "info"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_version() -> None:
    code, out = run("--version")
    assert code == 0 and __version__ in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_a_readme_section(command: str) -> None:
    code, out = run(command, "--help")
    assert code == 0
    assert "Example:" in out and f"wsiats {command}" in out
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^##+ .*`?wsiats {command}", readme, re.MULTILINE), f"README lacks a section on wsiats {command}"


def test_train_bad_labels_one_line_exit_1(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id;label\na;b\n")
    code, out = run("train", str(slides), "--labels", str(labels), "--out", str(tmp_path / "run"))
    assert code == 1
    assert out.strip() == (
        f"Error: {labels}: columns are separated by ';'; wsiats reads comma-separated files (slide_id,label)"
    )
    assert not (tmp_path / "run").exists()


def test_train_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    code, out = run("train", str(tmp_path), "--labels", "x.csv", "--out", "r", "--lr", "-1")
    assert code == 2
    assert out.strip() == "Error: lr (flag --lr) must be a positive number, got -1.0"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoks: 3\n")
    code, out = run("train", str(tmp_path), "--labels", "x.csv", "--out", "r", "--config", str(cfg))
    assert code == 2 and out.startswith(f"Error: {cfg}: unknown key(s) epoks; valid keys:")
    code, out = run("train", str(tmp_path), "--labels", "x.csv", "--out", "r", "--epochs", "two")
    assert code == 2 and "'two' is not a valid integer" in out


def test_print_config_shows_defaults(tmp_path: Path) -> None:
    code, out = run("train", "x", "--labels", "x.csv", "--out", "r", "--print-config", "--epochs", "3")
    assert code == 0
    assert "epochs: 3\n" in out and "lr: 0.001\n" in out and "entropy_weight: 0.0001\n" in out


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "not a wsiats run folder (no config.yaml, no model.safetensors)"),
        ({"config.yaml": "version: 0\n"}, "config version 0 is not supported"),
    ],
)
def test_predict_bad_model_dir(tmp_path: Path, files: dict[str, str], message: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, text in files.items():
        (run_dir / name).write_text(text)
    slide = tmp_path / "a.tif"
    slide.write_bytes(b"x")
    code, out = run("predict", str(slide), "--model", str(run_dir), "--out", str(tmp_path / "p.csv"))
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("Error: ") and message in out
    assert not (tmp_path / "p.csv").exists()


def test_predict_out_must_be_csv_or_json(tmp_path: Path) -> None:
    code, out = run("predict", "a.tif", "--model", str(tmp_path), "--out", str(tmp_path / "p.txt"))
    assert code == 2 and out.strip() == f"Error: {tmp_path / 'p.txt'}: --out must end in .csv or .json"


@pytest.mark.parametrize("given, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_makes_openmp_threads_sleep_unless_told_otherwise(given: str | None, seen: str) -> None:
    """Set before torch loads (libgomp reads it once); the user's own setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import sys, os, wsiats.cli; print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", seen]
