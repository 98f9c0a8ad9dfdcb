"""Atomic file output: write to a temporary file in the same folder, then rename into place.

A crash, a kill or a full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
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
#: Characters of the output's name kept in its temporary name (".<name>.<random>.tmp<suffix>" must fit in 255).
_TMP_NAME = 64


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    The caller writes the temporary path with any library (tifffile, PIL, safetensors).
    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temporary(path)
    try:
        os.chmod(tmp_path, _FILE_MODE)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)  # again: some writers (safetensors) replace the file, with mode 0600
        os.replace(tmp_path, path)
    except OSError as exc:  # name the output, not the temporary file the user never asked for
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if exc.filename is None or Path(exc.filename) == tmp_path:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _temporary(path: Path) -> Path:
    """A new empty file beside `path`, hidden, named after it but short enough for any name `path` may have."""
    stem = path.name[:_TMP_NAME]
    suffix = path.suffix if len(path.suffix) <= 16 else ""  # some writers choose the format by the suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp" + suffix, dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    os.close(fd)
    return Path(tmp)


def check_writable(*paths: str | Path) -> None:
    """Fail now, before any work, when an output could not be written: a folder, or a name too long, at
    `path`, or a folder that cannot be created or written to. Raises OSError naming the output."""
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, "file name too long; choose a shorter one", str(path))
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(path))
        _temporary(path).unlink()


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
