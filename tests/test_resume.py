"""Training that is killed or interrupted, then resumed, ends where an uninterrupted run ends.

On the CPU with the same seed, `--resume` after SIGKILL (or Ctrl-C) mid-epoch must give bit-identical
weights to a run that was never stopped: every random choice of an epoch is seeded by (seed, epoch),
and the resume state (weights, optimizer, scheduler, history) is one file renamed into place.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file

from wsiats.train import TrainHooks

ARGS = ["--epochs", "3", "--batch-size", "2", "--n-patches", "4", "--patch-size", "32", "--view-downsample", "16",
        "--workers", "0", "--seed", "1", "-q"]

#: Runs `wsiats train ...` with a hook on the training loop: once one optimiser step of the second epoch is done
#: (and nothing of that epoch saved), it writes the marker file named by argv[1] and sleeps, so the test can
#: SIGKILL it mid-epoch. The hook only watches: the run's numbers are untouched.
_SLEEPER = """
import sys, time, pathlib
from wsiats.cli import cli
from wsiats.train import TrainHooks
marker = pathlib.Path(sys.argv.pop(1))
class SleepInEpoch2(TrainHooks):
    def on_step(self, epoch, step, model):
        if (epoch, step) == (1, 2):
            marker.write_text("one step of epoch 2 done")
            time.sleep(120)
cli(sys.argv[1:], prog_name="wsiats", obj=SleepInEpoch2())
"""


def train_args(cohort: Path, run: Path) -> list[str]:
    return ["train", str(cohort / "slides"), "--labels", str(cohort / "labels.csv"), "--out", str(run)]


def epochs_of(run: Path) -> list[str]:
    return [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))]


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("last.safetensors", "model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not different, f"{name}: {len(different)} tensor(s) differ, e.g. {different[0]}"


def assert_same_metrics(a: Path, b: Path) -> None:
    def rows(run: Path) -> list[dict[str, str]]:
        out = list(csv.DictReader(open(run / "metrics.csv", newline="")))
        for r in out:
            del r["seconds_per_slide"]
        return out

    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    result = invoke("synth", out, "--n", "8", "--size", "1024", "--seed", "2", "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def baseline(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-epoch run in its own process, as a user would start it."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    proc = subprocess.run([sys.executable, "-m", "wsiats", *train_args(cohort, run), *ARGS], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert epochs_of(run) == ["1", "2", "3"]
    return run


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(cohort: Path, baseline: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPER, str(marker), *train_args(cohort, run), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read()}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert epochs_of(run) == ["1"]  # killed in epoch 2, after epoch 1 was saved
    at_kill = load_file(str(run / "last.safetensors"))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file: it was not writing

    resumed = subprocess.run([sys.executable, "-m", "wsiats", *train_args(cohort, run), "--resume", "-q"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert epochs_of(run) == ["1", "2", "3"]
    final = load_file(str(run / "last.safetensors"))
    assert any(not torch.equal(at_kill[k], final[k]) for k in final)  # epochs 2-3 did change the weights
    assert_same_weights(run, baseline)
    assert_same_metrics(run, baseline)


class _InterruptAt(TrainHooks):
    """Step `step` (1-based) of 0-based `epoch` raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, *, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def on_step(self, epoch: int, step: int, model: object) -> None:
        if (epoch, step) == self.at:
            raise KeyboardInterrupt


class _InterruptBetweenWeightsAndState(TrainHooks):
    """Ctrl-C once 0-based `epoch`'s weights are in place and before its training state is."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_weights_saved(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_ctrl_c_mid_epoch_says_what_was_saved_and_resume_matches(cohort: Path, baseline: Path,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke(*train_args(cohort, run), *ARGS, obj=_InterruptAt(epoch=1, step=2))
    assert result.exit_code == 130 and "Traceback" not in result.output
    first, last = result.output.splitlines()  # -q hides progress bars, not the epoch lines
    assert first.startswith("epoch 1/3: train loss ")
    assert last == (f"Interrupted: training interrupted during epoch 2; epoch 1 of 3 was saved in "
                    f"{run / 'last.safetensors'}; continue with --resume")
    assert epochs_of(run) == ["1"]
    result = invoke(*train_args(cohort, run), *ARGS)
    assert result.exit_code == 1
    assert result.output == f"Error: {run}: already holds a run; pass --resume to continue it or choose another --out\n"
    result = invoke(*train_args(cohort, run), "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert_same_weights(run, baseline)  # also: a run in this process equals one in a fresh process


def test_ctrl_c_in_the_first_epoch_lets_the_same_command_start_over(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*train_args(cohort, run), *ARGS, "--epochs", "1"]
    result = invoke(*args, obj=_InterruptAt(epoch=0, step=1))
    assert result.exit_code == 130
    assert result.output == ("Interrupted: training interrupted during epoch 1; no epoch was completed, so nothing "
                             "to resume; run the same command again\n")
    result = invoke(*train_args(cohort, run), "--resume")
    assert result.exit_code == 1
    assert result.output == f"Error: {run}: nothing to resume (no last_state.pt); start without --resume\n"
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert epochs_of(run) == ["1"]


def test_interrupted_between_saving_weights_and_state_still_resumes_exactly(
        cohort: Path, baseline: Path, tmp_path: Path) -> None:
    """Ctrl-C (or a kill) after epoch 2's weights were renamed into place but before its optimizer state was."""
    run = tmp_path / "run"
    result = invoke(*train_args(cohort, run), *ARGS, obj=_InterruptBetweenWeightsAndState(1))
    assert result.exit_code == 130 and "epoch 1 of 3 was saved" in result.output
    result = invoke(*train_args(cohort, run), "--resume", "-q")
    assert result.exit_code == 0, result.output
    assert epochs_of(run) == ["1", "2", "3"]
    assert_same_weights(run, baseline)
    assert_same_metrics(run, baseline)
