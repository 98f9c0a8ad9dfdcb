"""Adversarial inputs through the wsiats CLI: every attack must end in one clear line, never a traceback,
never lost data, never a garbage result. Bounded in time.

    python tests/attack_cli.py --quick          # ~30 attacks and a few dozen fuzzed inputs, about a minute
    python tests/attack_cli.py --budget 600     # everything, fuzzing until the time budget is spent

Each attack runs the CLI in this process with click's CliRunner (so a monkeypatched disk can fill up) and
checks the exit status, the exact `Error: ...` / `Warning: ...` line, and what is left on disk. The report
lists every attack with held / FAILED and how many inputs were tried; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _slides  # noqa: E402
from conftest import TINY  # noqa: E402 - the training options of every CLI test


class Broken(AssertionError):
    """An attack that was not held."""


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args: object, env: dict[str, str] | None = None) -> Outcome:
    """Run `wsiats ARGS` in this process; a Python exception that escapes is itself a broken attack."""
    from click.testing import CliRunner

    from wsiats.cli import cli as command

    result = CliRunner().invoke(command, [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text = "".join(traceback.format_exception(result.exception))
        raise Broken(f"traceback from wsiats {' '.join(map(str, args))}:\n{text}")
    if "Traceback" in result.output:
        raise Broken(f"traceback in the output of wsiats {' '.join(map(str, args))}")
    return Outcome(result.exit_code, result.stdout, result.stderr, result.exception)


def expect(outcome: Outcome, code: int, *lines: str, contains: str = "") -> None:
    if outcome.code != code:
        raise Broken(f"exit status {outcome.code}, expected {code}: {outcome.output[-500:]}")
    for line in lines:
        if line not in outcome.output.splitlines():
            raise Broken(f"missing line {line!r} in {outcome.output[-800:]!r}")
    if contains and contains not in outcome.output:
        raise Broken(f"missing {contains!r} in {outcome.output[-800:]!r}")


@dataclass
class Workspace:
    root: Path
    cohort: Path = field(init=False)
    run: Path = field(init=False)

    def good(self, i: int) -> Path:
        return self.cohort / "slides" / f"synth_{i:04d}.tif"

    def fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def copy_run(self, name: str) -> Path:
        run = self.root / name
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(self.run, run)
        return run

    def copy_slides(self, name: str) -> Path:
        slides = self.root / name
        shutil.rmtree(slides, ignore_errors=True)
        shutil.copytree(self.cohort / "slides", slides)
        return slides

    def train_ids(self) -> list[str]:
        return [r["slide_id"] for r in csv.DictReader(open(self.cohort / "labels.csv", newline=""))
                if r["split"] == "train"]


def setup(root: Path) -> Workspace:
    ws = Workspace(root)
    ws.cohort, ws.run = root / "cohort", root / "run"
    expect(cli("synth", ws.cohort, "--n", "8", "--size", "1024", "--seed", "5", "-q"), 0)
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.run, "--epochs", "1",
               *TINY), 0)
    return ws


# --- the attacks -----------------------------------------------------------------------------------------------------

Attack = Callable[[Workspace], None]
ATTACKS: list[tuple[str, bool, Attack]] = []  # (name, in --quick, attack)


def attack(name: str, *, quick: bool = True) -> Callable[[Attack], Attack]:
    def deco(fn: Attack) -> Attack:
        ATTACKS.append((name, quick, fn))
        return fn

    return deco


@attack("1 demo into a folder of the user's")
def _(ws: Workspace) -> None:
    mine = ws.fresh("mine")
    (mine / "run").mkdir()
    (mine / "run" / "config.yaml").write_text("epochs: 1\n")
    (mine / "run" / "NOTES.txt").write_text("notes\n")
    expect(cli("demo", "--out", mine, "--n", "8", "-q"), 1,
           f"Error: {mine}: folder is not empty and was not made by `wsiats demo`; choose a new folder, or pass "
           "--overwrite to write into it anyway")
    if (mine / "run" / "NOTES.txt").read_text() != "notes\n":
        raise Broken("the user's file was touched")


@attack("1 synth over an existing cohort")
def _(ws: Workspace) -> None:
    cohort = ws.fresh("theirs")
    (cohort / "labels.csv").write_text("slide_id,label\ncase,tumour\n")
    expect(cli("synth", cohort, "--n", "2", "--size", "512", "-q"), 1, contains="was not made by `wsiats synth`")
    if (cohort / "labels.csv").read_text() != "slide_id,label\ncase,tumour\n":
        raise Broken("labels overwritten")


@attack("1 demo run twice keeps a file the user added to its run", quick=False)
def _(ws: Workspace) -> None:
    out = ws.root / "demo"
    shutil.rmtree(out, ignore_errors=True)
    args = ["demo", "--out", out, "--n", "8", "--size", "1024", "--epochs", "1", "-q"]
    expect(cli(*args), 0)
    (out / "run" / "NOTES.txt").write_text("notes\n")
    expect(cli(*args), 0)
    if not (out / "run" / "NOTES.txt").is_file():
        raise Broken("NOTES.txt deleted by the second demo")


@attack("2 caseA.tif and caseA.ome.tif in train and predict")
def _(ws: Workspace) -> None:
    slides = ws.copy_slides("twins")
    shutil.copy(ws.good(1), slides / "synth_0000.ome.tif")
    expect(cli("train", slides, "--labels", ws.cohort / "labels.csv", "--out", ws.root / "twin_run", *TINY), 1,
           contains="have the same slide_id 'synth_0000'")
    expect(cli("predict", slides, "--model", ws.run, "--out", ws.root / "twins.csv", "-q"), 1,
           contains="have the same slide id 'synth_0000'")


@attack("2 labels header slide_id,label,label")
def _(ws: Workspace) -> None:
    labels = ws.root / "dup_header.csv"
    labels.write_text("slide_id,label,label\nsynth_0000,negative,positive\n")
    expect(cli("train", ws.cohort / "slides", "--labels", labels, "--out", ws.root / "r", *TINY), 1,
           f"Error: {labels}: column(s) label appear more than once in the header")


@attack("2 labels 1 and 1.0, Negative and negative")
def _(ws: Workspace) -> None:
    labels = ws.root / "similar.csv"
    labels.write_text("slide_id,label\nsynth_0000,1\nsynth_0001,1.0\nsynth_0002,Negative\nsynth_0003,negative\n")
    out = cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / "p.csv", "--labels", labels, "-q")
    for pair in ("'1' and '1.0'", "'Negative' and 'negative'"):
        if f"Warning: {labels}: labels {pair} differ only in case or number format" not in out.output:
            raise Broken(f"no warning naming {pair}")


@attack("4 every view unreadable (--view-downsample 0.5), with and without --skip-bad")
def _(ws: Workspace) -> None:
    run = ws.root / "noviews"
    args = ["train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", run, *TINY,
            "--view-downsample", "0.5"]
    expect(cli(*args), 1, contains="unreadable slide(s) in the cohort: ")
    expect(cli(*args, "--skip-bad"), 1, "Error: none of the 4 training slide(s) can be read: nothing to train on")
    if (run / "model.safetensors").exists():
        raise Broken("a model was saved")


@attack("4 tiles that cannot be read, with --skip-bad")
def _(ws: Workspace) -> None:
    slides = ws.copy_slides("badtiles")
    sid = next(s for s in ws.train_ids() if int(s[-4:]) % 3 != 2)
    import tifffile

    with tifffile.TiffFile(slides / f"{sid}.tif") as tif:
        n = len(tif.pages[0].dataoffsets)
    for index in range(n):
        _slides.corrupt_tile(slides / f"{sid}.tif", index=index)
    out = cli("train", slides, "--labels", ws.cohort / "labels.csv", "--out", ws.root / "tiles_run", "--epochs", "1",
              "--skip-bad", *TINY)
    expect(out, 0, contains="read(s) of tiles failed and were left out (--skip-bad)")


@attack("5 --lr 1e30")
def _(ws: Workspace) -> None:
    run = ws.root / "diverged"
    shutil.rmtree(run, ignore_errors=True)
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", run, "--epochs", "2",
               "--lr", "1e30", "--warmup-epochs", "0", *TINY), 1,
           contains="(the run diverged); no epoch was saved; try a lower --lr")
    if (run / "model.safetensors").exists():
        raise Broken("NaN weights saved")


@attack("5 NaN classifier weights")
def _(ws: Workspace) -> None:
    from safetensors.torch import load_file, save_file

    run = ws.copy_run("nan_run")
    state = load_file(str(run / "model.safetensors"))
    state["classifier.weight"][:] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    expect(cli("predict", ws.good(0), "--model", run, "--out", ws.root / "nan.json", "-q"), 1,
           contains="weights hold NaN or infinite values (classifier.weight)")


@attack("5 predict --json with an undefined AUC")
def _(ws: Workspace) -> None:
    labels = ws.root / "one_class.csv"
    labels.write_text("slide_id,label\nsynth_0000,negative\n")
    out = cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / "p.json", "--labels", labels, "--json",
              "-q")
    expect(out, 0)
    for text in (out.stdout, (ws.root / "p.json").read_text()):
        json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(Broken(f"{name} in JSON")))


@attack("6 all-white and all-black slides")
def _(ws: Workspace) -> None:
    for value in (255, 0):
        path = ws.root / f"blank{value}.tif"
        _slides.write_generic_pyramid(path, np.full((512, 512, 3), value, np.uint8), n_levels=2, tile=128)
        for command, out in (("predict", ws.root / "blank.csv"), ("heatmap", ws.root / "blank_maps")):
            expect(cli(command, path, "--model", ws.run, "--out", out, "-q"), 0,
                   contains=f"Warning: {path}: no tissue found in the view (the view is blank")


@attack("6 a dangling symlink in a predicted folder")
def _(ws: Workspace) -> None:
    folder = ws.fresh("dangling")
    shutil.copy(ws.good(0), folder / "a.tif")
    (folder / "gone.tif").symlink_to(ws.root / "nothing_here.tif")
    expect(cli("predict", folder, "--model", ws.run, "--out", ws.root / "d.csv", "-q"), 1,
           f"failed: {folder / 'gone.tif'}: no such file")


@attack("12 feature_net: hf-hub:attacker/x in a run's config.yaml")
def _(ws: Workspace) -> None:
    run = ws.copy_run("hub_run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("feature_net: small-cnn", "feature_net: hf-hub:attacker/x"))
    import importlib.util

    guard = (mock.patch("timm.create_model", side_effect=Broken("timm asked to build a hub model"))
             if importlib.util.find_spec("timm") else contextlib.nullcontext())
    with guard:
        expect(cli("predict", ws.good(0), "--model", run, "--out", ws.root / "hub.csv", "-q"), 1,
               contains="would be fetched from the Hugging Face hub; pass --allow-hub")


@attack("9 feature_dim: 100000 as a flag and in a run's config")
def _(ws: Workspace) -> None:
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.root / "r",
               "--feature-dim", "100000"), 2, "Error: feature_dim (flag --feature-dim) must be at most 2048, got 100000")
    run = ws.copy_run("wide_run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("feature_dim: 32", "feature_dim: 100000"))
    expect(cli("predict", ws.good(0), "--model", run, "--out", ws.root / "w.csv", "-q"), 1,
           f"Error: {config}: feature_dim (flag --feature-dim) must be at most 2048, got 100000")


@attack("10 a symlink loop given to predict and heatmap")
def _(ws: Workspace) -> None:
    loop = ws.root / "loop.tif"
    loop.unlink(missing_ok=True)
    loop.symlink_to(loop)
    expect(cli("predict", loop, "--model", ws.run, "--out", ws.root / "loop.csv", "-q"), 1, f"failed: {loop}: no such file")
    expect(cli("heatmap", loop, "--model", ws.run, "--out", ws.root / "loop_maps", "-q"), 1,
           f"failed: {loop}: no such file")


@attack("10 a 200 KB labels field")
def _(ws: Workspace) -> None:
    labels = ws.root / "huge.csv"
    labels.write_text("slide_id,label\nsynth_0000," + "x" * 200_000 + "\n")
    expect(cli("train", ws.cohort / "slides", "--labels", labels, "--out", ws.root / "r", *TINY), 1,
           contains="not a readable CSV file (field larger than field limit")


@attack("10 integer YAML keys in --config and in a run's config.yaml")
def _(ws: Workspace) -> None:
    config = ws.root / "int.yaml"
    config.write_text("1: 2\nepoks: 3\n")
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.root / "r",
               "--config", config), 2, contains="unknown key(s) 1, epoks")
    config.write_text("mc: 2\n1: 2\n")
    expect(cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / "p.csv", "--config", config), 2,
           contains="unknown key(s) 1")
    run = ws.copy_run("int_run")
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "1: 2\n")
    expect(cli("predict", ws.good(0), "--model", run, "--out", ws.root / "p.csv", "-q"), 1,
           f"Error: {run / 'config.yaml'}: unknown key(s) 1")


@attack("10 --seed -1 and 2**64 in train and predict")
def _(ws: Workspace) -> None:
    for seed in ("-1", str(2**64)):
        expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.root / "r",
                   "--seed", seed), 2, f"Error: seed (flag --seed) must be an integer from 0 to {2**63 - 1}, got {seed}")
        expect(cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / "p.csv", "--seed", seed), 2,
               contains="Invalid value for '--seed'")


@attack("10 malformed weights-only last_state.pt (5 kinds), and a pickle payload")
def _(ws: Workspace) -> None:
    import torch

    real = torch.load(ws.run / "last_state.pt", weights_only=True)
    states: list[Any] = [torch.zeros(3), {}, {**real, "optimizer": {"state": 1}}, {**real, "epoch": "x"},
                         {**real, "history": torch.zeros(1, 3)}]
    for k, state in enumerate(states):
        run = ws.copy_run("bad_state")
        torch.save(state, run / "last_state.pt")
        expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", run, "--resume",
                   "-q"), 1, contains=f"{run / 'last_state.pt'}: not a training state of this run (")
    run = ws.copy_run("pickle_state")
    torch.save({"x": Exploit()}, run / "last_state.pt")
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", run, "--resume", "-q"),
           1, contains="only weights-only files are accepted")


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickle code ran",))


@attack("10 disk full while saving weights (SafetensorError)")
def _(ws: Workspace) -> None:
    from safetensors import SafetensorError

    run = ws.root / "full_run"
    shutil.rmtree(run, ignore_errors=True)
    with mock.patch("wsiats.checkpoint.save_file", side_effect=SafetensorError("No space left on device (os error 28)")):
        expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", run, "--epochs", "1",
                   *TINY), 1, f"Error: {run / 'model.safetensors'}: cannot write model weights (No space left on "
                              "device (os error 28))")


@attack("10 WORLD_SIZE=2 without RANK, WORLD_SIZE=two")
def _(ws: Workspace) -> None:
    for env, start in (({"WORLD_SIZE": "2"}, "Error: WORLD_SIZE=2 is set but RANK"),
                       ({"WORLD_SIZE": "two"}, "Error: WORLD_SIZE='two' is not an integer")):
        for args in (["train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.root / "r",
                      *TINY], ["predict", ws.good(0), "--model", ws.run, "--out", ws.root / "p.csv", "-q"]):
            out = cli(*args, env=env)
            expect(out, 2)
            if not out.output.startswith(start):
                raise Broken(out.output)


@attack("11 a folder, a read-only place and a too-long name as predict --out")
def _(ws: Workspace) -> None:
    folder = ws.fresh("out_folder.csv")
    cases = [(folder, f"Error: {folder}: is a folder; give a file name"),
             (ws.root / ("p" * 300 + ".csv"), f"Error: {ws.root / ('p' * 300 + '.csv')}: file name too long; "
                                              "choose a shorter one")]
    if Path("/sys").is_dir():
        cases.append((Path("/sys/pred.csv"), "Error: /sys/pred.csv: Permission denied"))
    with mock.patch("wsiats.predict.Predictor.predict", side_effect=Broken("predicted before the output was checked")):
        for out, line in cases:
            expect(cli("predict", ws.good(0), "--model", ws.run, "--out", out, "-q"), 1, line)
    expect(cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / ("q" * 239 + ".csv"), "-q"), 0)


@attack("11 classes: [negative, negative]")
def _(ws: Workspace) -> None:
    run = ws.copy_run("dup_classes")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("- positive", "- negative"))
    expect(cli("predict", ws.good(0), "--model", run, "--out", ws.root / "p.csv", "-q"), 1,
           contains="classes must be at most 10000 distinct names")


@attack("11 heatmap --out into the slide folder, then predict the folder")
def _(ws: Workspace) -> None:
    folder = ws.fresh("maps_in_slides")
    shutil.copy(ws.good(0), folder / "a.tif")
    expect(cli("heatmap", folder, "--model", ws.run, "--out", folder, "-q"), 0)
    expect(cli("predict", folder, "--model", ws.run, "--out", ws.root / "m.csv", "-q"), 0,
           f"wrote {ws.root / 'm.csv'}: 1 slide(s) predicted, 0 failed")


@attack("11 info on several slides, one bad")
def _(ws: Workspace) -> None:
    bad = ws.root / "empty.tif"
    bad.write_bytes(b"")
    out = cli("info", ws.good(0), bad, ws.good(1), "--json")
    expect(out, 1, f"failed: {bad}: file is empty (0 bytes)")
    if len(json.loads(out.stdout)) != 2:
        raise Broken("the good slides' records are missing")


@attack("13 a view cache file replaced by another slide's")
def _(ws: Workspace) -> None:
    from wsiats.config import Config
    from wsiats.data import Item, ViewDataset

    cache = ws.fresh("view_cache")
    cfg = Config(view_downsample=16.0, view_cache=str(cache))
    items = [Item("synth_0000", ws.good(0), 0), Item("synth_0001", ws.good(1), 1)]
    truth = ViewDataset(items, cfg)[0][1]
    ViewDataset(items, cfg)[1]
    (mine,), (other,) = sorted(cache.glob("synth_0000-*.npz")), sorted(cache.glob("synth_0001-*.npz"))
    mine.write_bytes(other.read_bytes())
    if not np.array_equal(ViewDataset(items, cfg)[0][1].image, truth.image):  # type: ignore[attr-defined]
        raise Broken("the poisoned view was used")


@attack("held: a YAML python tag in --config")
def _(ws: Workspace) -> None:
    config = ws.root / "tag.yaml"
    config.write_text("epochs: !!python/object/apply:os.system ['echo pwned']\n")
    expect(cli("train", ws.cohort / "slides", "--labels", ws.cohort / "labels.csv", "--out", ws.root / "r",
               "--config", config), 2, contains="not a readable YAML file")


# --- fuzzing: mutated labels files and run configs, until the budget is spent ------------------------------------


def fuzz_inputs(ws: Workspace, rng: random.Random) -> Iterator[tuple[str, Callable[[], None]]]:
    base_labels = (ws.cohort / "labels.csv").read_bytes()
    base_config = (ws.run / "config.yaml").read_bytes()
    pieces = [b",", b"\n", b"\r", b'"', b"\x00", b"\xff", b"label", b"slide_id", b"-1", b"1e309", b"nan", b"{", b"[",
              b": ", b"- ", b"!!", b"\t", b"&a", b"*a", b"0x10", b"~"]

    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(out) + 1)
            op = rng.random()
            if op < 0.4:
                out[at:at] = rng.choice(pieces)
            elif op < 0.7 and out:
                del out[at:at + rng.randint(1, 8)]
            else:
                out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        return bytes(out)

    k = 0
    while True:
        k += 1
        labels = ws.root / "fuzz_labels.csv"
        data = mutate(base_labels)

        def labels_case(data: bytes = data) -> None:
            labels.write_bytes(data)
            out = cli("predict", ws.good(0), "--model", ws.run, "--out", ws.root / "fuzz.csv", "--labels", labels,
                      "-q")
            if out.code not in (0, 1) or (out.code and "Error: " not in out.output):
                raise Broken(f"labels {data[:200]!r}: exit {out.code}: {out.output[-300:]!r}")

        yield f"fuzzed labels.csv #{k}", labels_case
        data = mutate(base_config)

        def config_case(data: bytes = data) -> None:
            run = ws.root / "fuzz_model"
            run.mkdir(exist_ok=True)
            shutil.copy(ws.run / "model.safetensors", run / "model.safetensors")
            (run / "config.yaml").write_bytes(data)
            out = cli("predict", ws.good(0), "--model", run, "--out", ws.root / "fuzz.csv", "-q")
            if out.code not in (0, 1, 2) or (out.code and "Error: " not in out.output):
                raise Broken(f"config.yaml {data[:200]!r}: exit {out.code}: {out.output[-300:]!r}")

        yield f"fuzzed run config.yaml #{k}", config_case


# --- running ---------------------------------------------------------------------------------------------------------


def run(*, quick: bool, budget: float, workdir: Path | None = None, fuzz: int | None = None,
        seed: int = 0) -> dict[str, Any]:
    """Run the attacks (and then fuzzing until `budget` seconds or `fuzz` inputs); return the report."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsiats-attack-")))
        root.mkdir(parents=True, exist_ok=True)
        ws = setup(root)
        report: dict[str, Any] = {"attacks": [], "fuzzed": 0, "fuzz_failures": []}
        for name, in_quick, fn in ATTACKS:
            if quick and not in_quick:
                continue
            if time.perf_counter() - t0 > budget:
                report["attacks"].append({"name": name, "result": "not run (time budget spent)"})
                continue
            start = time.perf_counter()
            try:
                fn(ws)
                result = "held"
            except Broken as exc:
                result = f"FAILED: {exc}"
            except Exception as exc:  # the attack itself broke: report it, go on with the others
                result = f"FAILED: the attack raised {type(exc).__name__}: {exc}"
            report["attacks"].append({"name": name, "result": result,
                                      "seconds": round(time.perf_counter() - start, 2)})
        limit = fuzz if fuzz is not None else (20 if quick else 10**9)
        rng = random.Random(seed)
        for name, case in fuzz_inputs(ws, rng):
            if report["fuzzed"] >= limit or time.perf_counter() - t0 > budget:
                break
            report["fuzzed"] += 1
            try:
                case()
            except Broken as exc:
                report["fuzz_failures"].append(f"{name}: {exc}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["held"] = sum(a["result"] == "held" for a in report["attacks"])
    report["failed"] = sum(a["result"].startswith("FAILED") for a in report["attacks"]) + len(report["fuzz_failures"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The quick attacks and 20 fuzzed inputs.")
    parser.add_argument("--budget", type=float, default=None, help="Seconds in all (default: 120 quick, 600 full).")
    parser.add_argument("--fuzz", type=int, default=None, help="Fuzzed inputs to try (default: 20 quick, until the budget).")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the files here instead of a temporary folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fuzzing.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report as JSON.")
    args = parser.parse_args(argv)
    budget = args.budget if args.budget is not None else (120.0 if args.quick else 600.0)
    report = run(quick=args.quick, budget=budget, workdir=args.workdir, fuzz=args.fuzz, seed=args.seed)
    for a in report["attacks"]:
        print(f"{a['result'].splitlines()[0][:160]:<10}  {a['name']}")
    for failure in report["fuzz_failures"]:
        print(f"FAILED: {failure.splitlines()[0][:200]}")
    tried = len(report["attacks"]) + report["fuzzed"]
    print(f"{tried} inputs tried ({len(report['attacks'])} attacks, {report['fuzzed']} fuzzed) in {report['seconds']} s: "
          f"{report['held']} attacks held, {report['failed']} failed")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
