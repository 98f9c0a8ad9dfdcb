"""Lazy, multi-backend access to whole-slide images.

`open_slide` returns a `Slide` backed by tifffile (the TIFF family: generic tiled
pyramids, Aperio SVS, OME-TIFF with SubIFD pyramids, BigTIFF) or by OpenSlide (NDPI, MRXS,
SCN, BIF, DICOM, ...). Nothing is decoded at open time; reads decode only the tiles they touch.

Conventions (the same for both backends):
- `location` arguments are level-0 pixel coordinates of a top-left corner, as in OpenSlide;
  the level pixel is floor(x * level_width / level0_width) (per-axis scale). OpenSlide itself
  interpolates sub-pixel offsets, so the backends agree exactly when x is a multiple of the
  level's downsample (always at level 0).
- Pixels outside the image are `fill` (255: white, like glass). Tiles a file leaves empty
  (byte count 0) are glass too and read as white in both backends.
- Transparent pixels (OpenSlide's premultiplied ARGB, TIFF alpha) are composited over white.
- Every failure is a `wsiats.errors.SlideError` subclass whose message starts with the path.
"""


from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiats._base import (  # noqa: F401 - the public names of the slide layer live here
    _OPENSLIDE_TIFF_VENDORS,
    MAX_SIDE,
    MAX_TILE_MB,
    PATCH_READ_BUDGET,
    PIXEL_BUDGET,
    VIEW_READ_BUDGET,
    Slide,
    View,
    _exc_text,
    collect_notes,
    max_tile_bytes,
    note,
    patch_box,
)
from wsiats._openslide import OpenSlideSlide
from wsiats.errors import ConfigError, CorruptSlideError, SlideError, SlideNotFoundError, SlideReadError
from wsiats.errors import UnsupportedSlideError

BACKENDS = ("auto", "tifffile", "openslide")
#: File endings wsiats treats as slides when it scans a folder (OpenSlide's and the TIFF family, PerkinElmer
#: .qptiff); longest first, so that `slide_id` strips `.ome.tif` whole.
SLIDE_SUFFIXES = (
    ".ome.tiff", ".ome.tif", ".qptiff", ".svs", ".tif", ".tiff", ".btf", ".ndpi", ".vms", ".vmu",
    ".mrxs", ".scn", ".bif", ".svslide", ".dcm",
)
#: DICOM ImageType values (third item) of instances that are not the slide itself.
_DICOM_NOT_SLIDE = ("LABEL", "OVERVIEW", "THUMBNAIL")
#: Suffixes OpenSlide should read first: vendor layouts tifffile exposes differently, and non-TIFF containers.
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")


# --- what is a slide ----------------------------------------------------------------------------------------------


#: What `wsiats heatmap` names its attention maps: TIFFs, but never slides.
ATTENTION_SUFFIX = ".attention.tif"


def is_slide_file(path: Path) -> bool:
    """A name that ends in one of `SLIDE_SUFFIXES` (not an attention map of `wsiats heatmap`), not a folder
    (a dangling link counts: opening it says so)."""
    lower = path.name.lower()
    return lower.endswith(SLIDE_SUFFIXES) and not lower.endswith(ATTENTION_SUFFIX) and not path.is_dir()


@dataclass(frozen=True)
class _DicomInstance:
    path: Path
    series: str | None  # Series Instance UID; None when the header cannot be read
    kind: str  # ImageType value 3: VOLUME, LABEL, OVERVIEW, THUMBNAIL ("" when absent)
    pixels: int  # TotalPixelMatrixColumns x TotalPixelMatrixRows (0 when absent)


def _dicom_instance(path: Path) -> _DicomInstance:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"])
        image_type = list(ds.get("ImageType") or [])
        return _DicomInstance(path, str(ds.get("SeriesInstanceUID") or "") or None,
                              str(image_type[2]).upper() if len(image_type) > 2 else "",
                              int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0))
    except Exception:  # not DICOM, truncated, unreadable: left for open_slide to report
        return _DicomInstance(path, None, "", 0)


def dicom_series(files: Sequence[Path]) -> list[Path]:
    """One file per DICOM series among `files` (.dcm instances), sorted by name.

    Instances are grouped by folder and Series Instance UID (OpenSlide opens a whole series from any one
    of its files); each series is represented by its largest VOLUME instance. A series made only of
    label, overview or thumbnail instances is no slide and is left out. Files whose header cannot be read
    form one group per folder, kept, so that opening them reports what is wrong.
    """
    groups: dict[tuple[Path, str | None], list[_DicomInstance]] = {}
    for f in sorted(files, key=lambda p: p.name):
        inst = _dicom_instance(f)
        groups.setdefault((f.parent, inst.series), []).append(inst)
    out = []
    for (_, series), members in groups.items():
        volumes = [m for m in members if m.kind not in _DICOM_NOT_SLIDE]
        if volumes:
            out.append(max(volumes, key=lambda m: m.pixels).path)  # max keeps the first of equals
        elif series is None:
            out.append(members[0].path)
    return sorted(out, key=lambda p: p.name)


def _dicom_files(folder: Path) -> tuple[list[Path], bool]:
    """The .dcm files of `folder` and whether they are all its files."""
    files = [p for p in folder.iterdir() if p.is_file()]
    dcm = [p for p in files if p.suffix.lower() == ".dcm"]
    return dcm, bool(dcm) and len(dcm) == len(files)


def is_dicom_folder(path: Path) -> bool:
    """A folder that is one slide: every file in it is a .dcm instance, all of one DICOM series."""
    if not path.is_dir():
        return False
    dcm, only = _dicom_files(path)
    return only and len(dicom_series(dcm)) == 1


def slides_in_folder(folder: Path) -> list[Path]:
    """The slides of a folder, sorted by name, without descending further: its slide files (loose
    DICOM instances as one file per series) and its sub-folders that are DICOM slides."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    files = [p for p in entries if is_slide_file(p)]
    dcm = [p for p in files if p.suffix.lower() == ".dcm"]
    keep = set(dicom_series(dcm)) if dcm else set()
    slides = [p for p in files if p.suffix.lower() != ".dcm" or p in keep]
    slides += [p for p in entries if p.is_dir() and is_dicom_folder(p)]
    return sorted(slides, key=lambda p: p.name)


def slide_key(path: Path) -> tuple[str, ...]:
    """What identifies the slide that `path` opens: a DICOM series (from any of its files, or its folder)
    or, for anything else, the resolved path."""
    where = Path(os.path.realpath(path))  # unlike Path.resolve(), no RuntimeError on a symlink loop
    if path.is_dir():
        dcm, only = _dicom_files(path)
        series = dicom_series(dcm) if only else []
        path = series[0] if len(series) == 1 else path
    if path.is_file() and path.suffix.lower() == ".dcm":
        uid = _dicom_instance(path).series
        if uid:
            return os.path.realpath(path.parent), uid
    return (str(where),)


# --- opening ------------------------------------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders


def open_slide(path: str | Path, *, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily.

    backend "auto": tifffile for the TIFF family (8-bit RGB, or 8-bit greyscale read as RGB),
    OpenSlide for the rest and for vendor TIFF variants (NDPI, SCN, Philips, BIF); each falls back
    to the other when it cannot open the file or refuses its pixel layout (palette colours, say). "tifffile" or "openslide" forces one.
    `mpp` (microns per level-0 pixel) overrides the file's metadata.
    A directory is accepted only when it is a DICOM slide (`is_dicom_folder`: only .dcm files, one series):
    OpenSlide opens the series' largest VOLUME instance and finds the other levels beside it; any other
    directory is a SlideNotFoundError.
    """
    from wsiats._tiff import TiffSlide

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    try:
        override = None if mpp is None else float(mpp)
    except (TypeError, ValueError):
        override = math.nan
    if override is not None and not (math.isfinite(override) and override > 0):
        raise ConfigError(f"--mpp must be a positive number of microns per pixel, not {mpp!r}")
    max_tile_bytes()  # a bad WSIATS_MAX_TILE_MB is a usage error, not a bad slide
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path, "no such file")
    if path.is_dir():
        dcm, only = _dicom_files(path)
        series = dicom_series(dcm) if only else []
        if len(series) > 1:
            raise SlideNotFoundError(path, f"is a directory holding {len(series)} DICOM series, not one slide; "
                                           "name one of its .dcm files")
        if len(series) != 1 or backend == "tifffile":
            raise SlideNotFoundError(path, "is a directory, not a slide file (only a folder whose files are all "
                                           "DICOM .dcm instances of one series is read as one slide)")
        return OpenSlideSlide(path, mpp=override, open_path=series[0])
    if not path.is_file():
        raise SlideNotFoundError(path, "is not a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise SlideReadError(path, f"cannot read the file ({exc.strerror or _exc_text(exc)})") from None
    if size == 0:
        raise CorruptSlideError(path, "file is empty (0 bytes)")
    is_tiff = head in _TIFF_MAGIC
    if backend == "tifffile":
        if not is_tiff:
            raise UnsupportedSlideError(path, "not a TIFF file, so tifffile cannot read it; try --backend openslide")
        return TiffSlide(path, mpp=override)
    if backend == "openslide":
        return OpenSlideSlide(path, mpp=override)
    if not is_tiff:
        return OpenSlideSlide(path, mpp=override)
    if path.name.lower().endswith(OPENSLIDE_SUFFIXES):
        try:
            return OpenSlideSlide(path, mpp=override)
        except SlideError as exc:
            first = exc
        try:
            return TiffSlide(path, mpp=override)
        except SlideError:
            raise first from None
    try:
        slide = TiffSlide(path, mpp=override)
    except (CorruptSlideError, UnsupportedSlideError) as exc:
        # a TIFF tifffile cannot parse, or whose pixel layout it refuses: OpenSlide may read it
        try:
            return _openslide_that_reads(path, override)
        except SlideError:
            raise exc from None
    if slide.vendor in _OPENSLIDE_TIFF_VENDORS.values():  # vendor TIFF variants: OpenSlide knows their layout
        try:
            other = OpenSlideSlide(path, mpp=override)
        except SlideError:
            return slide
        slide.close()
        return other
    return slide


def _openslide_that_reads(path: Path, mpp: float | None) -> OpenSlideSlide:
    """OpenSlide as the fallback reader, checked by decoding one pixel: OpenSlide opens some TIFFs whose
    pixels it then cannot decode (16-bit samples, for one), and tifffile's reason is the better message."""
    slide = OpenSlideSlide(path, mpp=mpp)
    try:
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
    except SlideError:
        slide.close()
        raise
    return slide


def describe(slide: Slide) -> dict[str, Any]:
    """JSON-able summary of a slide: what `wsiats info` prints."""
    path = slide.path
    try:
        file_size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())
    except OSError:
        file_size = None
    return {
        "path": str(path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": list(slide.level_downsamples),
        "mpp": None if slide.mpp is None else list(slide.mpp),
        "mpp_source": slide.mpp_source,
        "objective_power": slide.objective_power,
        "associated_images": list(slide.associated_names),
        "file_size": file_size,
        "gigapixels": slide.dimensions[0] * slide.dimensions[1] / 1e9,
    }


def __getattr__(name: str) -> Any:
    """`wsiats.slide.TiffSlide` without importing the tifffile backend at module import."""
    if name == "TiffSlide":
        from wsiats._tiff import TiffSlide

        return TiffSlide
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

