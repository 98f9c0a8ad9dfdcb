"""Atomic file output: write to a temporary file in the same folder, then rename into place.

A crash, a kill or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from wsiats.errors import WsiatsError

# mkstemp creates files readable by the owner only; give outputs the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    The caller writes the temporary path with any library (tifffile, PIL, safetensors).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)  # again: some writers (safetensors) replace the file, with mode 0600
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; rename it onto `path` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def claim_folder(path: str | Path, *, command: str, overwrite: bool = False) -> None:
    """Make `path` a folder `wsiats <command>` may write into, or refuse.

    An absent or empty folder is created and marked with a file `wsiats-<command>.txt`; a folder
    holding that marker was made by the same command and may be written again. Any other
    non-empty folder is the user's: refused unless `overwrite`, so that nothing of theirs is lost.
    """
    path = Path(path)
    marker = path / f"wsiats-{command}.txt"
    if path.is_dir() and not marker.is_file() and not overwrite and any(path.iterdir()):
        raise WsiatsError(f"{path}: folder is not empty and was not made by `wsiats {command}`; "
                          "choose a new folder, or pass --overwrite to write into it anyway")
    path.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(f"This folder was written by `wsiats {command}`, which may overwrite what it wrote here.\n"
                          "Delete this file to keep the command from writing here again without --overwrite.\n",
                          encoding="utf-8")


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: JSON has no NaN (`json.dumps` would write one)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
