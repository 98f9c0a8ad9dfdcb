"""Device selection and the CUDA-only speed-ups (mixed precision, pinned memory)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from wsiats.errors import ConfigError


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda[:N]' fails clearly without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA device; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device {name!r} must be auto, cpu, cuda or cuda:N")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU supports it, else float16; None (no autocast) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_factory(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager[object]]:
    """A zero-argument factory of autocast contexts (a null context when AMP is off)."""
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A loss scaler, active only for float16 autocast on CUDA."""
    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=active)
