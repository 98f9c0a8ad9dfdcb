"""Model files: safetensors weights + YAML config. Loading never unpickles code.

A run folder holds `config.yaml`, `model.safetensors` (best on validation),
`last.safetensors` and `last_state.pt` (model weights again, optimizer, scheduler and epoch
in one file, so that weights and optimizer state are renamed into place together; loaded with
`weights_only=True`) for `--resume`, and `metrics.csv`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from wsiats._io import atomic_path
from wsiats.config import Config, load_run_config
from wsiats.errors import CheckpointError
from wsiats.models import ATSModel

MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
STATE_FILE = "last_state.pt"


def build_model(cfg: Config, *, load_feature_weights: bool = True) -> ATSModel:
    """An ATSModel shaped by `cfg` (feature weights from `cfg.feature_weights` when asked)."""
    return ATSModel(
        n_classes=len(cfg.classes),
        feature_net=cfg.feature_net,
        feature_dim=cfg.feature_dim,
        feature_weights=cfg.feature_weights if load_feature_weights else None,
        freeze_features=cfg.freeze_features,
        feature_net_args=cfg.feature_net_args,
        pretrained=load_feature_weights,  # hub weights only when training starts; a run's file holds them after
        feature_cache_mb=cfg.feature_cache_mb,
    )


def save_weights(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found; did `wsiats train` finish an epoch?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match config.yaml ({first})") from None


def load_model(run_dir: str | Path, *, which: str = MODEL_FILE) -> tuple[ATSModel, Config]:
    """Read a run folder's config and weights; the model is in eval mode on the CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: model folder not found; pass the --out folder of `wsiats train`")
    cfg = load_run_config(run_dir)
    model = build_model(cfg, load_feature_weights=False)
    load_weights_into(model, run_dir / which)
    model.eval()
    return model, cfg


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from; run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load training state ({type(exc).__name__}); only weights-only files are accepted"
        ) from None
