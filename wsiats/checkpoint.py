"""Model files: safetensors weights and the weights-only training state. Loading never unpickles code.

Which files a run folder holds, and under what names, is `wsiats.run`'s.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from wsiats._io import atomic_path
from wsiats.config import Config
from wsiats.data import short_list
from wsiats.errors import CheckpointError
from wsiats.models import ATSModel
from wsiats.run import CONFIG_FILE, MODEL_FILE, RunFolder


def build_model(cfg: Config, *, load_feature_weights: bool = True) -> ATSModel:
    """An ATSModel shaped by `cfg` (feature weights from `cfg.feature_weights` or the hub when asked)."""
    return ATSModel(
        n_classes=len(cfg.classes),
        feature_net=cfg.feature_net,
        feature_dim=cfg.feature_dim,
        feature_weights=cfg.feature_weights if load_feature_weights else None,
        freeze_features=cfg.freeze_features,
        pooling=cfg.pooling,
        feature_norm=cfg.feature_norm,
        feature_net_args=cfg.feature_net_args,
        pretrained=load_feature_weights,  # hub weights only when training starts; a run's file holds them after
        feature_cache_mb=cfg.feature_cache_mb,
        nested=cfg.nested,
    )


def save_weights(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata=metadata or {})
        except SafetensorError as exc:  # a full disk: safetensors' own error, not an OSError
            raise OSError(errno.EIO, f"cannot write model weights ({exc})", str(path)) from None


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found; did `wsiats train` finish an epoch?")
    try:
        with open(path, "rb"):  # safetensors reports an unreadable file as "No such file"
            pass
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the model weights ({exc.strerror or exc})") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or not a safetensors file ({exc})") from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: weights hold NaN or infinite values ({bad[0]}); the training run diverged, "
                              "retrain it with a lower --lr")
    mismatch = _mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match config.yaml ({mismatch}); they come from another run, "
                              "or config.yaml was edited")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match config.yaml ({' '.join(str(exc).split())})") from None


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between the tensors a model wants and those of a file ('' when nothing does)."""
    shapes = [f"{k} is {list(found[k].shape)} in the file, {list(v.shape)} in the model"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    parts = []
    if shapes:
        parts.append(shapes[0] + (f" (and {len(shapes) - 1} more tensors of other shapes)" if len(shapes) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the file: {short_list(missing, 3)}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s) in the file: {short_list(extra, 3)}")
    return "; ".join(parts)


def load_model(run_dir: str | Path, *, which: str = MODEL_FILE, allow_hub: bool = False) -> tuple[ATSModel, Config]:
    """Read a run folder's config and weights; the model is in eval mode on the CPU.

    The config's Runtime part (device, amp, workers, caches) is at its defaults, not the training machine's:
    whoever applies the model says how to run it.

    `run_dir` may also be a weights file in a run folder (RUN/model.safetensors, RUN/last.safetensors).
    Nothing is downloaded: the run's own weights are loaded. A `feature_net: hf-hub:<repo>` in the
    run's config would make timm fetch that repository's config (which picks the architecture)
    from the Hugging Face hub, so it is refused unless `allow_hub`.
    """
    path = Path(run_dir)
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        path, which = path.parent, path.name
    elif path.is_file():
        raise CheckpointError(f"{path}: is a file; pass the run folder written by `wsiats train` (the folder "
                              f"that holds {CONFIG_FILE} and {MODEL_FILE})")
    run = RunFolder(path)
    cfg = run.load_config(weights=which)
    if cfg.feature_net.startswith("hf-hub:") and not allow_hub:
        raise CheckpointError(
            f"{run.config}: feature_net {cfg.feature_net!r} would be fetched from the Hugging Face hub; "
            "pass --allow-hub if you trust this model folder and that repository"
        )
    run.check("predict", weights=which)
    model = build_model(cfg, load_feature_weights=False)
    load_weights_into(model, run.path / which)
    model.eval()
    return model, cfg.without_runtime()


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # a full disk: torch's zip writer raises RuntimeError, not OSError
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise OSError(errno.EIO, f"cannot write the training state ({first})", str(path)) from None


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
