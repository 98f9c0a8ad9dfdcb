"""The exceptions wsiats raises: one base class, one subclass per kind of bad input.

Every message names the input that was wrong and, where it helps, what to try next; the
command-line interface prints it as one line and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path


class WsiatsError(Exception):
    """Base class of every error wsiats raises on purpose."""


class SlideError(WsiatsError):
    """A slide could not be opened or read. The message starts with the file's path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class SlideNotFoundError(SlideError):
    """The path does not exist, or is not a regular file."""


class UnsupportedSlideError(SlideError):
    """No backend recognises the file's format, or its pixels are not RGB."""


class CorruptSlideError(SlideError):
    """The file claims a known format but its content is broken (truncated, absurd sizes)."""


class SlideReadError(SlideError):
    """The slide opened but reading pixels from it failed (bad tile, missing codec)."""


class LabelsError(WsiatsError):
    """The labels CSV is missing, malformed, or does not match the slides."""


class ConfigError(WsiatsError):
    """A configuration value or file is invalid. The message names the key or the flag."""


class CheckpointError(WsiatsError):
    """A model directory is incomplete, corrupt, or from an incompatible version."""


class ModelError(WsiatsError):
    """A network could not be built: unknown name, missing optional package, bad weights."""


class Interrupted(WsiatsError):
    """The user pressed Ctrl-C; the message says what was saved and how to continue."""
