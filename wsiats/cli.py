"""The command-line interface. Click lives here and nowhere else in the package.

Each command parses its options, calls the library, and turns a `WsiatsError` into a
one-line `Error: ...` message with exit status 1 (click's own usage errors exit 2).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from wsiats import __version__
from wsiats.config import SEED_MAX
from wsiats.errors import ConfigError, Interrupted, WsiatsError

# Idle OpenMP threads sleep instead of spinning (torch's libgomp spins by default). Measured here on 2 cores:
# predict ~5% slower on an idle machine, training steps ~5x faster on a busy one (shared nodes are the rule
# in pathology labs). libgomp reads this once, when torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound=Any)

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


def _print_warning(message: str) -> None:
    """A fact about a slide or the cohort, from the library's results: one `Warning: ...` line."""
    click.echo(f"Warning: {message}", err=True)


def _print_notes(result: Any) -> None:
    """The warnings about a result's slide (a prediction, a heatmap), one `Warning: ...` line each."""
    for text in result.notes:
        _print_warning(text)


def _warned(results: Iterable[R]) -> Iterator[R]:
    """Each result (a prediction, a heatmap) as it comes, after printing the warnings about its slide."""
    for result in results:
        _print_notes(result)
        yield result


def _log_verbosely(ctx: click.Context | None = None, param: click.Parameter | None = None, value: bool = True) -> None:
    if value:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="wsiats")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (to stderr).")
@click.option("--max-tile-mb", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MIB",
              help="Largest decoded tile or strip a slide may have, in MiB  [default: 64]; bigger ones are "
                   "refused as decompression bombs.")
def cli(verbose: bool, max_tile_mb: float | None) -> None:
    """Classify whole-slide images with attention sampling.

    A small attention network looks at a low-resolution view of each slide, a few
    locations are sampled from it, and only those tiles are read at full resolution.

    Shell completion (bash): eval "$(_WSIATS_COMPLETE=bash_source wsiats)"
    """
    import warnings

    warnings.showwarning = _show_warning
    if max_tile_mb is not None:  # the environment carries it into DataLoader worker processes too
        os.environ["WSIATS_MAX_TILE_MB"] = repr(max_tile_mb)
    _log_verbosely(value=verbose)


verbose_option = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_log_verbosely,
                              help="Log what the library does (to stderr).")
quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress bars or per-slide progress lines (warnings, epoch lines and the summary "
                                 "stay).")
recursive_option = click.option("--recursive", is_flag=True,
                                help="Also take the slides in the sub-folders of a folder given.")


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
@click.argument("slides", nargs=-1, required=True, type=str)
@backend_option
@mpp_option
@recursive_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@verbose_option
@quiet_option
@_reports_errors
def info(slides: tuple[str, ...], backend: str, mpp: float | None, recursive: bool, as_json: bool,
         quiet: bool) -> None:
    """Show levels, dimensions, resolution and associated images of SLIDES (files, folders or glob patterns).

    \b
    Example:
        wsiats info slides/case_001.svs --json
    """
    from wsiats.data import find_slides
    from wsiats.slide import describe, open_slide

    paths = find_slides(slides, recursive=recursive)
    records, failed = [], []
    for path in paths:
        try:
            with open_slide(path, backend=backend, mpp=mpp) as slide:
                slide.read_region((0, 0), slide.level_count - 1, (1, 1))  # decode one tile: a missing codec shows here
                records.append(describe(slide))
        except WsiatsError as exc:
            if len(paths) == 1:
                raise
            failed.append(str(exc))
            continue
        if not as_json:  # each table as its slide is read, below the warnings about it
            _show_info(records[-1:], as_json)
    if as_json:
        _show_info(records, as_json, several=len(paths) > 1)
    for text in failed:
        click.echo(f"failed: {text}", err=True)
    if failed:
        sys.exit(1)


def _show_info(records: list[dict[str, Any]], as_json: bool, *, several: bool = False) -> None:
    """Tables, or JSON: a list when several slides were asked for (even if one of them failed), else one object."""
    if not records:
        return
    if as_json:
        click.echo(json.dumps(records if several else records[0], indent=2))
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


class _FeatureNetOption(click.Option):
    """--feature-net: its help lists the registered networks, looked up only when help is shown (torch loads)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from wsiats.models import list_feature_nets

        self.help = (self.help or "").replace("a registered name", ", ".join(list_feature_nets()), 1)
        return super().get_help_record(ctx)


def _config_options(func: F) -> F:
    """One option per `Config` field; None means 'not given' so the config file applies."""
    import dataclasses

    from wsiats.config import RUN_FIELDS, Config, field_help

    for f in reversed(dataclasses.fields(Config)):
        if f.name in RUN_FIELDS or f.name in _FLAGLESS:  # a mapping: set in --config YAML
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            shown = flag if f.default else f"--no-{flag[2:]}"
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None,
                                  help=f"{field_help(f.name)} [default: {shown}]")
        else:
            typ: Any = float if "float" in kind else int if "int" in kind else str
            shown = "" if f.default is None else f" [default: {f.default}]"
            option = click.option(flag, f.name, type=typ, default=None, help=field_help(f.name) + shown,
                                  cls=_FeatureNetOption if f.name == "feature_net" else click.Option)
        func = option(func)
    return func


def _config_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    from wsiats.config import Config

    names = {f.name for f in dataclasses.fields(Config)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


class _ConfigFileError(click.ClickException):
    """A bad --config file: one `Error: FILE: ...` line, exit 2 like any bad option."""

    exit_code = 2


def _option_key(param: click.Parameter) -> str:
    """The --config key of an option: its long flag name with underscores (`--n-patches` -> n_patches)."""
    longs = [o for o in param.opts if o.startswith("--")] or param.opts
    return longs[0].lstrip("-").replace("-", "_")


def _config_keys(command: click.Command) -> dict[str, click.Option]:
    """Every option of `command` that a --config file may set, by key."""
    return {_option_key(p): p for p in command.params
            if isinstance(p, click.Option) and p.name not in ("config_file", "print_config", "help")}


def _load_option_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """`--config FILE`: its keys (the long flag names) become option defaults; flags override them."""
    if value is None:
        return None
    from wsiats.config import read_mapping

    path = Path(value)
    try:
        raw = read_mapping(path)
    except ConfigError as exc:
        raise _ConfigFileError(str(exc)) from None
    options = _config_keys(ctx.command)
    given = {str(k).replace("-", "_"): v for k, v in raw.items()}
    # Config fields without a flag (a mapping such as feature_net_args) go to train through ctx.meta
    flagless = set(_FLAGLESS) if ctx.command.name == "train" else set()
    unknown = sorted(set(given) - set(options) - flagless)
    if unknown:
        valid = [*options, *sorted(flagless)]
        raise _ConfigFileError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    from wsiats.config import _coerce

    try:
        ctx.meta["config_flagless"] = {k: _coerce(k, v, str(path)) for k, v in given.items() if k in flagless}
    except ConfigError as exc:
        raise _ConfigFileError(str(exc)) from None
    defaults = {options[k].name: _option_value(ctx, options[k], k, v, path) for k, v in given.items() if k in options}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


#: Config fields that a --config file of train may set but no flag does (their values are mappings).
_FLAGLESS = ("feature_net_args",)


def _option_value(ctx: click.Context, option: click.Option, key: str, value: Any, source: Path) -> Any:
    """A --config value checked against its option's type, strictly (no 1 for true, no 2.5 for an integer)."""
    import dataclasses

    from wsiats.config import Config, _coerce

    if option.name in {f.name for f in dataclasses.fields(Config)}:
        try:
            return _coerce(key, value, str(source))
        except ConfigError as exc:
            raise _ConfigFileError(str(exc)) from None
    if value is None:
        return None
    typ = option.type
    if option.is_flag:
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(typ, click.types.IntParamType):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(typ, click.types.FloatParamType):
        ok, kind = isinstance(value, (int, float, str)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise _ConfigFileError(f"{source}: {key} must be {kind}, got {value!r}")
    try:
        return option.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise _ConfigFileError(f"{source}: {key}: {exc.message}") from None


option_file = click.option(
    "--config", "config_file", type=click.Path(path_type=Path), default=None, is_eager=True,
    expose_value=True, callback=_load_option_file,
    help="YAML of option: value, keys the long flag names (n_patches: 20); flags override it.",
)


def _write_resolved(path: Path, ctx: click.Context) -> None:
    """Record the options a command ran with next to its outputs (keys as in --config)."""
    import yaml

    from wsiats._io import atomic_open

    record: dict[str, Any] = {"wsiats": __version__}
    for param in ctx.command.params:
        if param.name in ctx.params and param.name != "config_file":
            v = ctx.params[param.name]
            key = _option_key(param) if isinstance(param, click.Option) else str(param.name)
            record[key] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    with atomic_open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(record, fh, sort_keys=False)


allow_hub_option = click.option(
    "--allow-hub", is_flag=True,
    help="Accept a model folder whose feature_net is hf-hub:<repo>: timm fetches that repository's config.")


@cli.command()
@click.argument("slide_dir", required=False, type=click.Path(path_type=Path))
@click.option("--labels", "labels", type=click.Path(path_type=Path), default=None,
              help="CSV: slide_id,label[,split] (required).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="Run folder to write (required).")
@option_file
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--skip-bad", is_flag=True,
              help="Train on the labelled slides that have a readable file when some are missing or unreadable.")
@recursive_option
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as YAML (a --config file) and exit.")
@backend_option
@mpp_option
@verbose_option
@quiet_option
@_config_options
@_reports_errors
def train(slide_dir: Path | None, labels: Path | None, out: Path | None, config_file: Path | None, resume: bool,
          skip_bad: bool, recursive: bool, print_config: bool, backend: str, mpp: float | None, quiet: bool,
          **kwargs: Any) -> None:
    """Train an attention-sampling model on the slides in SLIDE_DIR.

    Writes RUN/config.yaml, RUN/model.safetensors (best on validation), RUN/last.safetensors
    with the optimizer state for --resume, and RUN/metrics.csv.

    \b
    Example:
        wsiats train cohort/slides --labels cohort/labels.csv --out runs/exp1 --epochs 20
    """
    import time

    import yaml

    from wsiats._progress import clock
    from wsiats.config import RUN_FIELDS, resolve, resume_config
    from wsiats.run import RunFolder
    from wsiats.train import TrainHooks
    from wsiats.train import train as run_training

    from wsiats.distributed import read_env

    given = {**click.get_current_context().meta.get("config_flagless", {}), **_config_overrides(kwargs)}
    cfg = resolve(overrides=given)  # on --resume: its values are checked again with the run's own
    if print_config:
        doc = {k: v for k, v in cfg.to_dict().items() if k not in RUN_FIELDS}
        paths = {"labels": labels, "out": out}
        doc.update({k: str(v) for k, v in paths.items() if v is not None})
        doc.update(backend=backend, mpp=mpp, skip_bad=skip_bad, recursive=recursive)
        click.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)
        return
    for what, value in (("argument 'SLIDE_DIR'", slide_dir), ("option '--labels'", labels), ("option '--out'", out)):
        if value is None:
            raise click.UsageError(f"Missing {what}.")
    assert slide_dir is not None and labels is not None and out is not None
    read_env()  # a broken torchrun environment is reported before any slide is read
    run = RunFolder(out)
    if run.holds_run() and not resume:
        raise click.ClickException(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    if resume:
        saved = run.load_config(use="resume")
        run.check("resume")
        cfg, taken = resume_config(saved, given)
        if taken:
            console.print(f"resuming {out} with {', '.join(taken)}; the rest as saved in {run.config}")
    total = cfg.epochs
    t0, shown = time.perf_counter(), []

    def show(row: dict[str, float]) -> None:
        shown.append(row)
        epoch = int(row["epoch"])
        eta = (time.perf_counter() - t0) / len(shown) * max(total - epoch, 0)
        val = "" if row["val_loss"] != row["val_loss"] else (
            f"  val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f} auc {row['val_auc']:.3f}")
        hits = row.get("feature_cache_hit_rate", float("nan"))
        cache = "" if hits != hits else (
            f"  feature cache {hits:.0%} hits ({row['feature_cache_speedup']:.1f}x)")
        console.print(
            f"epoch {epoch}/{total}: train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}{val}"
            f"  entropy {row['attention_entropy']:.2f}  {row['seconds_per_slide']:.3f} s/slide{cache}, ETA {clock(eta)}"
        )

    # A program that runs this command (a test, a notebook) can pass `TrainHooks` as click's context object.
    hooks = click.get_current_context().find_object(TrainHooks)
    result = run_training(slide_dir, labels, out, cfg, resume=resume, skip_bad=skip_bad, backend=backend,
                          mpp=mpp, on_epoch=show, progress=not quiet, recursive=recursive, on_note=_print_warning,
                          hooks=hooks)
    if result.rank != 0:
        return
    if result.skipped:
        console.print(f"skipped {len(result.skipped)} unreadable slide(s): {', '.join(result.skipped)}")
    if result.tile_errors:
        console.print(f"{sum(result.tile_errors.values())} read(s) of tiles failed and were left out (--skip-bad): "
                      + ", ".join(f"{path} ({n}x)" for path, n in result.tile_errors.items()))
    table = Table(title="training summary", title_justify="left")
    for col in ("slides train/val/test", "epochs", "best epoch", "best val acc"):
        table.add_column(col)
    best = next((r for r in result.history if int(r["epoch"]) == result.best_epoch + 1), {})
    best_acc = best.get("val_acc", float("nan"))
    table.add_row(
        f"{result.n_train}/{result.n_val}/{result.n_test}", str(result.epochs_run), str(result.best_epoch + 1),
        "n/a" if best_acc != best_acc else f"{best_acc:.3f}",
    )
    console.print(table)
    console.print(f"model: {run.model}")


model_option = click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
                            help="Run folder written by `wsiats train` (or the model.safetensors in it).")


def _record_path(out: Path) -> Path:
    """Where predict records the options it ran with: beside the output, `<out>.config.yaml`."""
    return out.with_name(out.name + ".config.yaml")


@cli.command()
@click.argument("slides", nargs=-1, required=True, type=str)
@model_option
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output file: .csv or .json.")
@click.option("--labels", "labels", type=click.Path(path_type=Path), default=None, help="Labels CSV: also report accuracy, AUC, confusion.")
@click.option("--mc", type=click.IntRange(min=1), default=1, show_default=True, help="Average this many sampling passes; report their spread.")
@click.option("--topk", is_flag=True, help="Deterministic: the N highest-attention patches instead of sampling.")
@click.option("--n-patches", type=click.IntRange(min=1), default=None, help="Patches per slide (default: as trained).")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Threads reading tiles and prefetching views.")
@click.option("--amp/--no-amp", default=True, show_default=True,
              help="Mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU. Not taken from the training run.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@allow_hub_option
@backend_option
@mpp_option
@recursive_option
@verbose_option
@quiet_option
@option_file
@_reports_errors
def predict(slides: tuple[str, ...], model_dir: Path, out: Path, labels: Path | None, mc: int, topk: bool,
            n_patches: int | None, seed: int, device: str, workers: int, amp: bool, as_json: bool, allow_hub: bool,
            backend: str,
            mpp: float | None, recursive: bool, quiet: bool, config_file: Path | None) -> None:
    """Classify SLIDES (files, folders or glob patterns) with a trained model.

    A slide that fails is recorded in the error column and the others go on; the exit
    status is 1 when any failed. Writes OUT and OUT.config.yaml (the options it ran with).

    \b
    Example:
        wsiats predict cohort/slides --model runs/exp1 --out predictions.csv
    """
    from wsiats._io import check_writable
    from wsiats.data import check_unique_ids, find_slides, read_labels
    from wsiats.predict import predict_slides, write_predictions

    if out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"{out}: --out must end in .csv or .json")
    truth = None if labels is None else {r["slide_id"]: r["label"] for r in read_labels(labels)}  # before any slide
    paths = find_slides(slides, recursive=recursive)
    check_unique_ids(paths)  # two rows with one slide_id could not be told apart
    check_writable(out, _record_path(out))  # fail now, not after predicting every slide
    done = predict_slides(model_dir, paths, device=device, truth=truth, labels_file=labels, progress=not quiet,
                          on_prediction=_print_notes, mc=mc, topk=topk,
                          seed=seed, workers=workers, amp=amp, backend=backend, mpp=mpp, n_patches=n_patches,
                          allow_hub=allow_hub)
    if done.rank != 0:
        return
    preds = done.predictions
    write_predictions(out, preds, done.classes, extra={"model": str(model_dir), "mc": done.mc, "topk": topk})
    _write_resolved(_record_path(out), click.get_current_context())
    failed = [p for p in preds if not p.ok]
    summary: dict[str, Any] = {"slides": len(preds), "failed": len(failed), "out": str(out)}
    if done.metrics is not None:
        summary["metrics"] = done.metrics
    if as_json:
        from wsiats._io import json_safe

        click.echo(json.dumps(json_safe(summary), indent=2))
    else:
        console.print(f"wrote {out}: {len(preds) - len(failed)} slide(s) predicted, {len(failed)} failed")
        if "metrics" in summary:
            _print_metrics(summary["metrics"], done.classes)
    if failed:
        for p in failed:
            click.echo(f"failed: {p.error}", err=True)
        sys.exit(1)


def _print_metrics(m: dict[str, Any], classes: list[str]) -> None:
    if not m["n"]:
        console.print("0 labelled slides: every slide with a label failed")
        return
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
@model_option
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder for the PNG, TIFF and GeoJSON files.")
@click.option("--top", type=click.IntRange(min=1), default=50, show_default=True, help="Highest-attention patches in the GeoJSON.")
@click.option("--scale", type=click.Choice(["slide", "global"]), default="slide", show_default=True,
              help="Colour scale: each slide's own maximum, or one fixed scale for all slides (attention relative "
                   "to uniform, log).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@allow_hub_option
@backend_option
@mpp_option
@recursive_option
@verbose_option
@quiet_option
@option_file
@_reports_errors
def heatmap(slides: tuple[str, ...], model_dir: Path, out: Path, top: int, scale: str, device: str, allow_hub: bool,
            backend: str, mpp: float | None, recursive: bool, quiet: bool, config_file: Path | None) -> None:
    """Draw where the model looks on SLIDES.

    Per slide: OUT/<id>.png (the slide and its attention side by side, a colour bar, the
    prediction in the title),
    OUT/<id>.attention.tif (float32 map; its downsample to level 0 stored in the file) and
    OUT/<id>.geojson (the highest-attention patches, importable in QuPath); and once
    OUT/heatmap.config.yaml (the options it ran with).

    \b
    Example:
        wsiats heatmap cohort/slides/case_07.tif --model runs/exp1 --out heatmaps/
    """
    from wsiats._progress import track
    from wsiats.data import find_slides
    from wsiats.heatmap import heatmap_slides

    from wsiats._io import check_writable

    paths = find_slides(slides, recursive=recursive)
    check_writable(out / "heatmap.config.yaml")  # the folder can be made and written: fail now, not per slide
    results = list(_warned(track(heatmap_slides(paths, model_dir, out, top=top, device=device, backend=backend,
                                                mpp=mpp, allow_hub=allow_hub, scale=scale),
                                 total=len(paths), description="heatmaps", disable=quiet, unit="slide",
                                 label=lambda r: r.slide_id + (" (failed)" if r.error else ""))))
    failed = [r for r in results if r.error]
    if len(failed) < len(results):
        _write_resolved(out / "heatmap.config.yaml", click.get_current_context())
    console.print(f"wrote {len(results) - len(failed)} heatmap(s) to {out}, {len(failed)} failed")
    if failed:
        for r in failed:
            click.echo(f"failed: {r.error}", err=True)
        sys.exit(1)


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Write into OUT even when it holds files that this command did not write (they may be replaced).")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=2), default=40, show_default=True, help="Number of slides (half positive).")
@click.option("--size", type=click.IntRange(min=512), default=4096, show_default=True, help="Level-0 side in pixels.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True, help="Random seed.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.25, show_default=True,
              help="Fraction of each class marked split=test in labels.csv.")
@click.option("--kind", type=click.Choice(["regions", "needles"]), default="regions", show_default=True,
              help="regions: every region of a positive slide is informative; needles: 2-6 look-alike regions a "
                   "slide, 1-2 informative on positive slides, the rest decoys.")
@verbose_option
@overwrite_option
@quiet_option
@_reports_errors
def synth(out: Path, n: int, size: int, seed: int, test_fraction: float, kind: str, overwrite: bool,
          quiet: bool) -> None:
    """Generate a synthetic cohort of pyramidal slides in OUT.

    Positive slides hold small regions whose texture shows only at full resolution;
    negative slides hold look-alike regions with the same low-resolution appearance
    (with --kind needles, positive slides hold decoys too).
    Writes OUT/slides/*.tif, OUT/labels.csv (slide_id,label,split) and OUT/truth.json.

    \b
    Example:
        wsiats synth cohort --n 40 --size 4096 --seed 0
        wsiats synth needles --n 64 --size 12288 --kind needles
    """
    from wsiats.synth import make_cohort

    labels = _make_cohort(out, n=n, size=size, seed=seed, test_fraction=test_fraction, quiet=quiet, make=make_cohort,
                          overwrite=overwrite, kind=kind)
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
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="Seed of the cohort and the training run.")
@click.option("--n", "n", type=click.IntRange(min=8), default=48, show_default=True, help="Slides in the cohort.")
@click.option("--size", type=click.IntRange(min=1024), default=4096, show_default=True, help="Level-0 side of each slide.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: the demo's tuned value).")
@verbose_option
@overwrite_option
@quiet_option
@_reports_errors
def demo(out: Path, seed: int, n: int, size: int, epochs: int | None, overwrite: bool, quiet: bool) -> None:
    """Run the whole job on a generated cohort: synth, train, predict, heatmap.

    Trains on the train split, predicts the held-out test split, draws their heatmaps and
    prints the test accuracy. A few minutes on two CPU cores.

    \b
    Example:
        wsiats demo --out wsiats-demo
    """
    from wsiats.demo import run_demo
    from wsiats.synth import make_cohort

    run_demo(out, seed=seed, n=n, size=size, epochs=epochs, overwrite=overwrite, progress=not quiet,
             say=console.print, on_note=_print_warning,
             synthesise=functools.partial(_make_cohort, quiet=quiet, make=make_cohort))
