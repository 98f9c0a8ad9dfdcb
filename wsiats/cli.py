"""The command-line interface. Click lives here and nowhere else in the package.

Each command parses its options, calls the library, and turns a `WsiatsError` into a
one-line `Error: ...` message with exit status 1 (click's own usage errors exit 2).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from wsiats import __version__
from wsiats.errors import ConfigError, Interrupted, WsiatsError

# Idle OpenMP threads sleep instead of spinning (torch's libgomp spins by default). Measured here on 2 cores:
# predict ~5% slower on an idle machine, training steps ~5x faster on a busy one (shared nodes are the rule
# in pathology labs). libgomp reads this once, when torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

F = TypeVar("F", bound=Callable[..., Any])

console = Console(highlight=False, soft_wrap=True)


def _reports_errors(func: F) -> F:
    """Turn library errors into `Error: ...` lines and exit 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:  # a bad option value or config file is a usage error
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except Interrupted as exc:
            click.echo(f"Interrupted: {exc}", err=True)
            sys.exit(130)
        except WsiatsError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # an output that cannot be written: a full disk, a file where a folder should be
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from exc
        except KeyboardInterrupt:
            click.echo("Interrupted: nothing half-written was left behind.", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings reach the user as one `Warning: ...` line, without a source line."""
    click.echo(f"Warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="wsiats")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (to stderr).")
def cli(verbose: bool) -> None:
    """Classify whole-slide images with attention sampling.

    A small attention network looks at a low-resolution view of each slide, a few
    locations are sampled from it, and only those tiles are read at full resolution.

    Shell completion (bash): eval "$(_WSIATS_COMPLETE=bash_source wsiats)"
    """
    import logging
    import warnings

    warnings.showwarning = _show_warning
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


backend_option = click.option(
    "--backend",
    type=click.Choice(["auto", "tifffile", "openslide"]),
    default="auto",
    show_default=True,
    help="Slide reader: tifffile+zarr for the TIFF family, OpenSlide for the rest.",
)
mpp_option = click.option(
    "--mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Microns per pixel at level 0, overriding the file's metadata.",
)


@cli.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@backend_option
@mpp_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_reports_errors
def info(slides: tuple[Path, ...], backend: str, mpp: float | None, as_json: bool) -> None:
    """Show levels, dimensions, resolution and associated images of SLIDES.

    \b
    Example:
        wsiats info slides/case_001.svs --json
    """
    from wsiats.slide import describe, open_slide

    records = []
    for path in slides:
        with open_slide(path, backend=backend, mpp=mpp) as slide:
            slide.read_region((0, 0), slide.level_count - 1, (1, 1))  # decode one tile: a missing codec shows here
            records.append(describe(slide))
    if as_json:
        click.echo(json.dumps(records if len(records) > 1 else records[0], indent=2))
        return
    for rec in records:
        table = Table(title=str(rec["path"]), title_justify="left")
        table.add_column("level", justify="right")
        table.add_column("width", justify="right")
        table.add_column("height", justify="right")
        table.add_column("downsample", justify="right")
        for i, (dims, ds) in enumerate(zip(rec["level_dimensions"], rec["level_downsamples"])):
            table.add_row(str(i), str(dims[0]), str(dims[1]), f"{ds:.3f}")
        console.print(table)
        mpp_text = "unknown" if rec["mpp"] is None else f"{rec['mpp'][0]:.4f} x {rec['mpp'][1]:.4f}"
        console.print(
            f"backend {rec['backend']}, vendor {rec['vendor'] or 'unknown'}, mpp {mpp_text}, "
            f"objective {rec['objective_power'] or 'unknown'}, "
            f"associated images: {', '.join(rec['associated_images']) or 'none'}"
        )


def _config_options(func: F) -> F:
    """One option per `Config` field; None means 'not given' so the config file applies."""
    import dataclasses

    from wsiats.config import Config, field_help

    skip = {"classes", "version", "feature_net_args"}  # feature_net_args: a mapping, set in --config YAML
    for f in reversed(dataclasses.fields(Config)):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=field_help(f.name))
        else:
            typ: Any = float if "float" in kind else int if "int" in kind else str
            option = click.option(flag, f.name, type=typ, default=None, help=f"{field_help(f.name)} [default: {f.default}]")
        func = option(func)
    return func


def _config_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    from wsiats.config import Config

    names = {f.name for f in dataclasses.fields(Config)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


@cli.command()
@click.argument("slide_dir", type=click.Path(path_type=Path))
@click.option("--labels", "labels", required=True, type=click.Path(path_type=Path), help="CSV: slide_id,label[,split].")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML with option: value (flags override it).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--skip-bad", is_flag=True, help="Train on the readable slides when some cannot be opened.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML and exit.")
@backend_option
@mpp_option
@quiet_option
@_config_options
@_reports_errors
def train(slide_dir: Path, labels: Path, out: Path, config_file: Path | None, resume: bool, skip_bad: bool,
          print_config: bool, backend: str, mpp: float | None, quiet: bool, **kwargs: Any) -> None:
    """Train an attention-sampling model on the slides in SLIDE_DIR.

    Writes RUN/config.yaml, RUN/model.safetensors (best on validation), RUN/last.safetensors
    with the optimizer state for --resume, and RUN/metrics.csv.

    \b
    Example:
        wsiats train cohort/slides --labels cohort/labels.csv --out runs/exp1 --epochs 20
    """
    import yaml

    from wsiats.config import resolve
    from wsiats.train import train as run_training

    cfg = resolve(config_file=config_file, overrides=_config_overrides(kwargs))
    if print_config:
        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
        return
    if (out / "last_state.pt").exists() and not resume:  # a run that finished an epoch; config.yaml alone is not one
        raise click.ClickException(f"{out}: already holds a run; pass --resume to continue it or choose another --out")

    def show(row: dict[str, float]) -> None:
        if quiet:
            return
        val = "" if row["val_loss"] != row["val_loss"] else (
            f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f} auc {row['val_auc']:.3f}")
        hits = row.get("feature_cache_hit_rate", float("nan"))
        cache = "" if hits != hits else (
            f"  feature cache {hits:.0%} hits ({row['feature_cache_speedup']:.1f}x)")
        console.print(
            f"epoch {int(row['epoch'])}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}{val}"
            f"  entropy {row['attention_entropy']:.2f}  {row['seconds_per_slide']:.3f} s/slide{cache}"
        )

    result = run_training(slide_dir, labels, out, cfg, resume=resume, skip_bad=skip_bad, backend=backend,
                          mpp=mpp, on_epoch=show, progress=not quiet)
    if result.rank != 0:
        return
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} unreadable slide(s): {', '.join(result.skipped)}")
    table = Table(title="training summary", title_justify="left")
    for col in ("slides train/val/test", "epochs", "best epoch", "best val acc"):
        table.add_column(col)
    best = next((r for r in result.history if int(r["epoch"]) == result.best_epoch + 1), {})
    best_acc = best.get("val_acc", float("nan"))
    table.add_row(
        f"{result.n_train}/{result.n_val}/{result.n_test}", str(result.epochs_run), str(result.best_epoch + 1),
        "n/a" if best_acc != best_acc else f"{best_acc:.3f}",
    )
    if not quiet:
        console.print(table)
        console.print(f"model: {out / 'model.safetensors'}")


def _load_option_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """`--config FILE` for predict/heatmap: its keys become option defaults; flags override."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{value}: not a readable YAML file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value}: expected a mapping of option: value")
    names = {p.name for p in ctx.command.params if p.name not in ("slides", "config_file")}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise click.BadParameter(f"{value}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


option_file = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None, is_eager=True,
    expose_value=True, callback=_load_option_file,
    help="YAML with option: value for this command (flags override it).",
)


def _write_resolved(path: Path, params: dict[str, Any]) -> None:
    """Record the options a command ran with next to its outputs."""
    import yaml

    from wsiats._io import atomic_open

    plain = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    with atomic_open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"wsiats": __version__, **plain}, fh, sort_keys=False)


@cli.command()
@click.argument("slides", nargs=-1, required=True, type=str)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Run folder written by `wsiats train`.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output file: .csv or .json.")
@click.option("--labels", "labels", type=click.Path(path_type=Path), default=None, help="Labels CSV: also report accuracy, AUC, confusion.")
@click.option("--mc", type=click.IntRange(min=1), default=1, show_default=True, help="Average this many sampling passes; report their spread.")
@click.option("--topk", is_flag=True, help="Deterministic: the N highest-attention patches instead of sampling.")
@click.option("--n-patches", type=click.IntRange(min=1), default=None, help="Patches per slide (default: as trained).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Threads reading tiles and prefetching views.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@backend_option
@mpp_option
@quiet_option
@option_file
@_reports_errors
def predict(slides: tuple[str, ...], model_dir: Path, out: Path, labels: Path | None, mc: int, topk: bool,
            n_patches: int | None, seed: int, device: str, workers: int, as_json: bool, backend: str,
            mpp: float | None, quiet: bool, config_file: Path | None) -> None:
    """Classify SLIDES (files, folders or glob patterns) with a trained model.

    A slide that fails is recorded in the error column and the others go on; the exit
    status is 1 when any failed.

    \b
    Example:
        wsiats predict cohort/slides --model runs/exp1 --out predictions.csv
    """
    from wsiats._progress import track
    from wsiats.data import find_slides
    from wsiats.predict import Predictor, write_predictions

    if out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"{out}: --out must end in .csv or .json")
    from wsiats import distributed

    paths = find_slides(slides)
    ctx, dev = distributed.setup(device)
    try:
        predictor = Predictor(model_dir, device=dev, mc=mc, topk=topk, seed=seed, workers=workers,
                              backend=backend, mpp=mpp, n_patches=n_patches)
        out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after predicting every slide
        mine = distributed.shard(ctx, len(paths))  # under torchrun each rank takes every world_size-th slide
        done = list(zip(mine, track(predictor.predict([paths[i] for i in mine]), total=len(mine),
                                    description="predicting", disable=quiet or not ctx.is_main)))
        preds = [p for _, p in sorted((pair for part in distributed.gather(ctx, done) for pair in part),
                                      key=lambda pair: pair[0])]
        if not ctx.is_main:
            return
        write_predictions(out, preds, predictor.classes,
                          extra={"model": str(model_dir), "mc": predictor.mc, "topk": topk})
        _write_resolved(out.with_name(out.name + ".config.yaml"), click.get_current_context().params)
    finally:
        distributed.teardown(ctx)
    failed = [p for p in preds if not p.ok]
    summary: dict[str, Any] = {"slides": len(preds), "failed": len(failed), "out": str(out)}
    if labels is not None:
        summary["metrics"] = _label_metrics(preds, labels, predictor.classes)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        console.print(f"wrote {out}: {len(preds) - len(failed)} slide(s) predicted, {len(failed)} failed")
        if "metrics" in summary:
            _print_metrics(summary["metrics"], predictor.classes)
    if failed:
        for p in failed:
            click.echo(f"failed: {p.error}", err=True)
        sys.exit(1)


def _label_metrics(preds: list[Any], labels: Path, classes: list[str]) -> dict[str, Any]:
    import numpy as np

    from wsiats.data import read_labels
    from wsiats.errors import LabelsError
    from wsiats.metrics import classification_metrics

    truth = {r["slide_id"]: r["label"] for r in read_labels(labels)}
    ok = [p for p in preds if p.ok and p.slide_id in truth]
    if not ok:
        raise LabelsError(f"{labels}: none of the predicted slides has a label")
    unknown = sorted({truth[p.slide_id] for p in ok} - set(classes))
    if unknown:
        raise LabelsError(f"{labels}: label(s) {', '.join(unknown)} are not classes of the model ({', '.join(classes)})")
    y = np.array([classes.index(truth[p.slide_id]) for p in ok])
    m = classification_metrics(y, np.array([p.probs for p in ok]), n_classes=len(classes))
    m["n"] = len(ok)
    return m


def _print_metrics(m: dict[str, Any], classes: list[str]) -> None:
    auc = "n/a" if m["auc"] != m["auc"] else f"{m['auc']:.3f}"
    console.print(f"{m['n']} labelled slides: accuracy {m['accuracy']:.3f}, balanced accuracy "
                  f"{m['balanced_accuracy']:.3f}, AUC {auc}")
    table = Table(title="confusion (rows: truth, columns: prediction)", title_justify="left")
    table.add_column("")
    for c in classes:
        table.add_column(c, justify="right")
    for c, row in zip(classes, m["confusion"]):
        table.add_row(c, *map(str, row))
    console.print(table)


@cli.command()
@click.argument("slides", nargs=-1, required=True, type=str)
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="Run folder written by `wsiats train`.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder for the PNG, TIFF and GeoJSON files.")
@click.option("--top", type=click.IntRange(min=1), default=50, show_default=True, help="Highest-attention patches in the GeoJSON.")
@click.option("--scale", type=click.Choice(["slide", "global"]), default="slide", show_default=True,
              help="Colour scale: each slide's own maximum, or one fixed scale for all slides (attention relative "
                   "to uniform, log).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@backend_option
@mpp_option
@quiet_option
@option_file
@_reports_errors
def heatmap(slides: tuple[str, ...], model_dir: Path, out: Path, top: int, scale: str, device: str, backend: str,
            mpp: float | None, quiet: bool, config_file: Path | None) -> None:
    """Draw where the model looks on SLIDES.

    Per slide: OUT/<id>.png (the slide and its attention side by side, a colour bar, the
    prediction in the title),
    OUT/<id>.attention.tif (float32 map; its downsample to level 0 stored in the file) and
    OUT/<id>.geojson (the highest-attention patches, importable in QuPath).

    \b
    Example:
        wsiats heatmap cohort/slides/case_07.tif --model runs/exp1 --out heatmaps/
    """
    from wsiats._progress import track
    from wsiats.data import find_slides
    from wsiats.heatmap import heatmap_slides

    paths = find_slides(slides)
    results = list(track(heatmap_slides(paths, model_dir, out, top=top, device=device, backend=backend, mpp=mpp,
                                        scale=scale),
                         total=len(paths), description="heatmaps", disable=quiet))
    failed = [r for r in results if r.error]
    if len(failed) < len(results):
        _write_resolved(out / "heatmap.config.yaml", click.get_current_context().params)
    console.print(f"wrote {len(results) - len(failed)} heatmap(s) to {out}, {len(failed)} failed")
    if failed:
        for r in failed:
            click.echo(f"failed: {r.error}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=2), default=40, show_default=True, help="Number of slides (half positive).")
@click.option("--size", type=click.IntRange(min=512), default=4096, show_default=True, help="Level-0 side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True,
              help="Fraction of each class marked split=test in labels.csv.")
@quiet_option
@_reports_errors
def synth(out: Path, n: int, size: int, seed: int, test_fraction: float, quiet: bool) -> None:
    """Generate a synthetic cohort of pyramidal slides in OUT.

    Positive slides hold small regions whose texture shows only at full resolution;
    negative slides hold look-alike regions with the same low-resolution appearance.
    Writes OUT/slides/*.tif, OUT/labels.csv (slide_id,label,split) and OUT/truth.json.

    \b
    Example:
        wsiats synth cohort --n 40 --size 4096 --seed 0
    """
    from wsiats.synth import make_cohort

    labels = _make_cohort(out, n=n, size=size, seed=seed, test_fraction=test_fraction, quiet=quiet, make=make_cohort)
    console.print(f"wrote {n} slides to {out / 'slides'}, labels to {labels}, regions to {out / 'truth.json'}")


def _make_cohort(out: Path, *, quiet: bool, make: Callable[..., Path], **kw: Any) -> Path:
    from rich.progress import Progress

    if quiet or not console.is_terminal:
        return make(out, **kw)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("synthesising slides", total=kw["n"])
        return make(out, progress=lambda done, total: bar.update(task, completed=done, total=total), **kw)


@cli.command()
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("wsiats-demo"), show_default=True, help="Folder for everything the demo writes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cohort and the training run.")
@click.option("--n", "n", type=click.IntRange(min=8), default=48, show_default=True, help="Slides in the cohort.")
@click.option("--size", type=click.IntRange(min=1024), default=4096, show_default=True, help="Level-0 side of each slide.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: the demo's tuned value).")
@quiet_option
@_reports_errors
def demo(out: Path, seed: int, n: int, size: int, epochs: int | None, quiet: bool) -> None:
    """Run the whole job on a generated cohort: synth, train, predict, heatmap.

    Trains on the train split, predicts the held-out test split, draws their heatmaps and
    prints the test accuracy. A few minutes on two CPU cores.

    \b
    Example:
        wsiats demo --out wsiats-demo
    """
    import time

    import numpy as np

    from wsiats.config import resolve
    from wsiats.data import build_cohort, split_items
    from wsiats.heatmap import heatmap_slides
    from wsiats.metrics import classification_metrics
    from wsiats.predict import Predictor, write_predictions
    from wsiats.synth import make_cohort
    from wsiats.train import train as run_training

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cohort = out / "cohort"
    console.print(f"[1/4] synthesising {n} slides of {size} x {size} px in {cohort}")
    labels = _make_cohort(cohort, n=n, size=size, seed=seed, test_fraction=0.25, quiet=quiet, make=make_cohort)
    run = out / "run"
    cfg = resolve(overrides={**DEMO_CONFIG, "seed": seed, **({"epochs": epochs} if epochs else {})})
    console.print(f"[2/4] training for {cfg.epochs} epochs into {run}")
    if (run / "config.yaml").exists():
        import shutil

        shutil.rmtree(run)

    def show(row: dict[str, float]) -> None:
        if not quiet:
            console.print(f"  epoch {int(row['epoch'])}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}"
                          f"  val acc {row['val_acc']:.3f}  entropy {row['attention_entropy']:.2f}")

    run_training(cohort / "slides", labels, run, cfg, on_epoch=show, progress=not quiet)
    items, classes = build_cohort(cohort / "slides", labels)
    _, _, test = split_items(items, val_fraction=0, seed=seed)
    console.print(f"[3/4] predicting {len(test)} held-out slides")
    predictor = Predictor(run, mc=1, seed=seed)
    preds = list(predictor.predict([it.path for it in test]))
    pred_file = out / "predictions.json"
    write_predictions(pred_file, preds, predictor.classes, extra={"model": str(run)})
    failed = [p for p in preds if not p.ok]
    if failed:
        raise click.ClickException(f"{len(failed)} slide(s) failed: {failed[0].error}")
    y = np.array([it.label for it in test])
    m = classification_metrics(y, np.array([p.probs for p in preds]), n_classes=len(classes))
    heat_dir = out / "heatmaps"
    console.print(f"[4/4] drawing heatmaps of the held-out slides into {heat_dir}")
    list(heatmap_slides([it.path for it in test], run, heat_dir, top=20))
    minutes = (time.perf_counter() - t0) / 60
    auc = "n/a" if m["auc"] != m["auc"] else f"{m['auc']:.3f}"
    console.print(
        f"demo done in {minutes:.1f} min: test accuracy {m['accuracy']:.3f} on {len(test)} held-out slides (AUC {auc}).\n"
        f"  model {run / 'model.safetensors'}\n  predictions {pred_file}\n  heatmaps {heat_dir}/"
    )


#: The demo's training settings, tuned so that it learns in a few CPU minutes (see README).
DEMO_CONFIG: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 4,
    "n_patches": 10,
    "patch_size": 64,
    "view_downsample": 32.0,
    "lr": 3e-3,
    "val_fraction": 0.15,
    "workers": 0,
}
