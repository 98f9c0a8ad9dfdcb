"""torchrun with two CPU processes (gloo): training runs, prediction shards and merges."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from click.testing import CliRunner
from conftest import TINY

from wsiats.cli import cli

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")



def torchrun(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "wsiats", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _rows(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]


def test_two_process_train_and_predict(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["synth", str(tmp_path / "c"), "--n", "6", "--size", "1024", "--seed", "5", "-q"])
    assert res.exit_code == 0, res.output
    slides, labels = tmp_path / "c" / "slides", tmp_path / "c" / "labels.csv"

    proc = torchrun("train", slides, "--labels", labels, "--out", tmp_path / "run", "--epochs", "2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["epoch"] for r in metrics] == ["1", "2"]  # rank 0 alone wrote the run
    assert (tmp_path / "run" / "model.safetensors").is_file()

    proc = torchrun("predict", slides, "--model", tmp_path / "run", "--out", tmp_path / "ddp.csv", "--mc", "2", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # one merged output, reported once
    res = runner.invoke(cli, ["predict", str(slides), "--model", str(tmp_path / "run"), "--out",
                              str(tmp_path / "single.csv"), "--mc", "2", "-q"])
    assert res.exit_code == 0, res.output
    merged, single = _rows(tmp_path / "ddp.csv"), _rows(tmp_path / "single.csv")
    assert len(merged) == 6 and merged == single
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
