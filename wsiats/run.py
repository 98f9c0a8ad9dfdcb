"""The run folder that `wsiats train` writes and `predict`, `heatmap` and `train --resume` read.

This module alone knows the folder's layout:

    RUN/config.yaml         the resolved configuration (written once, before the first epoch)
    RUN/model.safetensors   the weights of the best epoch on validation
    RUN/last.safetensors    the weights of the last completed epoch
    RUN/last_state.pt       weights, optimizer, scheduler, scaler and history of that epoch, in one file
                            (renamed into place at once; loaded with `weights_only=True`) for --resume
    RUN/metrics.csv         one row per completed epoch (METRIC_COLUMNS)

The file formats (safetensors weights, the weights-only state) are `wsiats.checkpoint`'s.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wsiats._io import atomic_open
from wsiats.config import Config, config_from_mapping
from wsiats.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "last_state.pt"
METRICS_FILE = "metrics.csv"

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc",
    "attention_entropy", "seconds_per_slide", "lr", "feature_cache_hit_rate", "feature_cache_speedup",
)

#: What each use of a run folder needs in it.
NEEDS = {"predict": (CONFIG_FILE, MODEL_FILE), "resume": (CONFIG_FILE, STATE_FILE)}


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder (none of them need exist yet)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def last(self) -> Path:
        return self.path / LAST_FILE

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def holds_run(self) -> bool:
        """A run finished an epoch here (a config.yaml alone is a run that never got that far)."""
        return self.state.exists()

    def missing(self, names: Sequence[str]) -> list[str]:
        """The files of `names` that are not in the folder, in that order."""
        return [name for name in names if not (self.path / name).is_file()]

    def check(self, use: str, *, weights: str = MODEL_FILE) -> None:
        """Raise CheckpointError listing every file that `use` ('predict', 'resume') needs and the folder lacks;
        for 'predict', `weights` is the weights file to be read."""
        needs = [CONFIG_FILE, weights] if use == "predict" else list(NEEDS[use])
        if use == "predict" and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model folder not found; pass the --out folder of `wsiats train`")
        missing = self.missing(needs)
        if not missing:
            return
        if CONFIG_FILE in missing:
            runs = sorted(p.parent for p in self.path.glob(f"*/{CONFIG_FILE}")) if self.path.is_dir() else []
            hint = (f"did you mean {' or '.join(map(str, runs[:3]))}?" if runs
                    else "pass the --out folder of `wsiats train`")
            raise CheckpointError(f"{self.path}: not a wsiats run folder (no {', no '.join(missing)}); {hint}")
        if use == "resume":
            raise CheckpointError(f"{self.path}: nothing to resume (no {', no '.join(missing)}); start without --resume")
        raise CheckpointError(f"{self.path / missing[0]}: model weights not found; did `wsiats train` finish an epoch?")

    def load_config(self, *, use: str = "predict", weights: str = MODEL_FILE) -> Config:
        """The run's configuration, from `RUN/config.yaml`; CheckpointError names the file and what is wrong
        (without the file: every other file that `use` needs and lacks too, see `check`)."""
        path = self.config
        if not path.is_file():
            self.check(use, weights=weights)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: config is not UTF-8 text") from None
        except yaml.YAMLError:
            raise CheckpointError(f"{path}: config is not valid YAML") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: config is not a mapping")
        try:
            cfg = config_from_mapping(raw, str(path))
        except ConfigError as exc:
            text = str(exc)
            raise CheckpointError(text if text.startswith(str(path)) else f"{path}: {text}") from None
        if len(cfg.classes) < 2:
            raise CheckpointError(f"{path}: no class names recorded; the run did not finish setting up")
        return cfg

    def save_config(self, cfg: Config) -> None:
        """Write `RUN/config.yaml` (atomically)."""
        cfg.save(self.config)

    def write_metrics(self, history: Sequence[dict[str, float]]) -> None:
        """`RUN/metrics.csv`: one row per epoch of `history`, the columns METRIC_COLUMNS ('' for NaN)."""
        with atomic_open(self.metrics, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(METRIC_COLUMNS)
            for row in history:
                writer.writerow([_fmt(row.get(c, math.nan)) for c in METRIC_COLUMNS])


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"
