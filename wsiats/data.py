"""Cohorts: a slide folder plus a labels CSV becomes a list of labelled items.

Slide ids are file names without their extension(s) (`case_01.ome.tif` -> `case_01`).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import math
import os
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from wsiats._base import VIEW_DOWNSAMPLE_RTOL
from wsiats.errors import LabelsError, SlideNotFoundError, WsiatsError
from wsiats.slide import (
    SLIDE_SUFFIXES,
    collect_notes,
    dicom_series,
    is_dicom_folder,
    open_slide,
    slide_key,
    slides_in_folder,
)

if TYPE_CHECKING:
    from wsiats.view import PreparedView

SPLITS = ("train", "val", "test")
#: The ending of the attention maps `wsiats heatmap` writes (TIFFs, but not slides).

log = logging.getLogger(__name__)


def slide_id(path: str | Path) -> str:
    """File name without its slide extension(s)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in SLIDE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class Item:
    slide_id: str
    path: Path
    label: int
    split: str | None = None


def find_slides(inputs: Iterable[str | Path], *, recursive: bool = False) -> list[Path]:
    """Expand files, folders and glob patterns, in order, once each.

    A folder gives `wsiats.slide.slides_in_folder`: its slide files and its DICOM series sub-folders (one
    slide each), sorted by name; with `recursive`, those of its sub-folders too (a `**` in a glob pattern
    also descends). A DICOM folder (`is_dicom_folder`) is itself one slide. Loose DICOM instances (in a
    folder or a pattern's matches) give one file per series. A slide named twice (also as another file of
    its DICOM series) is listed once. A broken symbolic link with a slide's name is kept (it is then
    reported as a slide that failed), and `<id>.attention.tif` maps written by `wsiats heatmap` are not slides.
    """
    found: list[Path] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise SlideNotFoundError(path, "no file matches this pattern")
            dcm = {p for p in matches if p.is_file() and p.suffix.lower() == ".dcm"}
            keep = set(dicom_series(sorted(dcm)))
            found.extend(p for p in matches if p in keep or p not in dcm)
        elif path.is_dir() and not is_dicom_folder(path):
            slides = _slides_in(path, recursive=recursive)
            if not slides:
                raise SlideNotFoundError(path, "folder holds no slides (" + ", ".join(SLIDE_SUFFIXES[:6]) + " ..., or "
                                               "DICOM series folders)" + _nested_hint(path))
            found.extend(slides)
        else:
            found.append(path)
    seen: set[tuple[str, ...]] = set()
    unique = []
    for p in found:
        key = slide_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _slides_in(folder: Path, *, recursive: bool, _seen: set[Path] | None = None) -> list[Path]:
    """`slides_in_folder(folder)`, and with `recursive` the slides of its other sub-folders too, depth first."""
    seen = _seen if _seen is not None else set()
    seen.add(folder.resolve())  # a link back up the tree is not followed twice
    found = slides_in_folder(folder)
    if recursive:
        for p in sorted(folder.iterdir(), key=lambda q: q.name):
            if p.is_dir() and not is_dicom_folder(p) and p.resolve() not in seen:
                found.extend(_slides_in(p, recursive=True, _seen=seen))
    return found


def _nested_hint(folder: Path) -> str:
    """'; its sub-folders hold N slide(s): ...' when they do, else ''."""
    nested = [p for p in _slides_in(folder, recursive=True) if p.parent != folder]
    if not nested:
        return ""
    suffix = Counter(_suffix(p) for p in nested).most_common(1)[0][0]
    return (f"; its sub-folders hold {len(nested)} slide(s): pass --recursive, or a glob such as "
            f"'{folder / '**' / ('*' + suffix)}'")


def _suffix(path: Path) -> str:
    """The slide extension of a file name ('.ome.tif', '.svs', ...), '' for a DICOM series folder."""
    lower = path.name.lower()
    return next((s for s in SLIDE_SUFFIXES if lower.endswith(s)), "") if path.is_file() else ""


def check_unique_ids(paths: Sequence[Path]) -> None:
    """Refuse slides that share a slide id (`a.tif`, `a.ome.tif`): their rows could not be told apart."""
    first: dict[str, Path] = {}
    for p in paths:
        sid = slide_id(p)
        if sid in first:
            raise WsiatsError(f"{first[sid]} and {p} have the same slide id {sid!r}; rename one, or give them "
                              "to separate commands")
        first[sid] = p


def read_labels(csv_path: str | Path) -> list[dict[str, str]]:
    """Parse a labels CSV (`slide_id,label[,split]`) with checks; rows as dicts."""
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(f"{csv_path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{csv_path}: cannot read labels file ({type(exc).__name__})") from None
    if not text.strip():
        raise LabelsError(f"{csv_path}: labels file is empty; expected a header slide_id,label")
    try:
        return _parse_labels(csv_path, text)
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise LabelsError(f"{csv_path}: not a readable CSV file ({exc})") from None


def _parse_labels(csv_path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader)]
    if len(header) == 1 and any(d in header[0] for d in (";", "\t", "|")):
        delim = next(d for d in (";", "\t", "|") if d in header[0])
        raise LabelsError(
            f"{csv_path}: columns are separated by {delim!r}; wsiats reads comma-separated files (slide_id,label)"
        )
    missing = [c for c in ("slide_id", "label") if c not in header]
    if missing:
        raise LabelsError(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}")
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise LabelsError(f"{csv_path}: column(s) {', '.join(repeated)} appear more than once in the header")
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise LabelsError(f"{csv_path}:{lineno}: expected {len(header)} fields, found {len(values)}")
        row = {k: v.strip() for k, v in zip(header, values)}
        sid = row["slide_id"]
        if not sid:
            raise LabelsError(f"{csv_path}:{lineno}: empty slide_id")
        if "/" in sid or "\\" in sid or sid in (".", ".."):
            raise LabelsError(f"{csv_path}:{lineno}: slide_id {sid!r} must be a file name without folders")
        if not row["label"]:
            raise LabelsError(f"{csv_path}:{lineno}: empty label for {sid}")
        if sid in seen:
            raise LabelsError(f"{csv_path}:{lineno}: duplicate slide_id {sid!r} (first on line {seen[sid]})")
        seen[sid] = lineno
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise LabelsError(f"{csv_path}:{lineno}: split {split!r} must be one of {', '.join(SPLITS)} or empty")
        rows.append(row)
    if not rows:
        raise LabelsError(f"{csv_path}: no rows below the header")
    _warn_similar_labels(csv_path, [r["label"] for r in rows])
    return rows


def _warn_similar_labels(csv_path: Path, labels: Sequence[str]) -> None:
    """Warn about labels that are different classes but look like one (`1` and `1.0`, `Tumour` and `tumour`)."""

    def key(label: str) -> str:
        try:
            return repr(float(label))
        except ValueError:
            return label.casefold()

    groups: dict[str, set[str]] = {}
    for label in labels:
        groups.setdefault(key(label), set()).add(label)
    for group in groups.values():
        if len(group) > 1:
            names = " and ".join(repr(g) for g in sorted(group))
            warnings.warn(f"{csv_path}: labels {names} differ only in case or number format but are separate "
                          "classes; write them the same way if they mean one class", UserWarning, stacklevel=3)


@dataclass
class Cohort:
    """Labels matched to slide files, and what did not match."""

    items: list[Item]
    classes: list[str]
    missing: list[str]  # labelled slide ids with no slide file
    unlabelled: list[Path]  # slide files whose id has no label


def match_cohort(
    slide_dir: str | Path,
    labels_csv: str | Path,
    *,
    classes: Sequence[str] | None = None,
    recursive: bool = False,
    allow_missing: bool = False,
) -> Cohort:
    """Match labels to the slide files of `slide_dir` (and of its sub-folders with `recursive`).

    A labelled slide without a file is an error unless `allow_missing` (the CLI's --skip-bad).
    Class names are sorted (unless given) over the labelled slides that have a file.
    """
    slide_dir = Path(slide_dir)
    if not slide_dir.is_dir():
        raise SlideNotFoundError(slide_dir, "slide folder not found")
    rows = read_labels(labels_csv)
    labelled = {r["slide_id"] for r in rows}
    files: dict[str, Path] = {}
    for p in _slides_in(slide_dir, recursive=recursive):
        sid = slide_id(p)
        if sid in files and sid in labelled:
            raise LabelsError(f"{files[sid]} and {p} have the same slide_id {sid!r}, so its label would apply "
                              "to either; rename or remove one")
        files.setdefault(sid, p)
    missing = [r["slide_id"] for r in rows if r["slide_id"] not in files]
    rows = [r for r in rows if r["slide_id"] in files]
    if missing and (not allow_missing or not rows):
        text = f"{labels_csv}: no slide file in {slide_dir} for slide_id {short_list(missing)}"
        hint = "" if recursive else _nested_hint(slide_dir)
        if not hint and len({r["label"] for r in rows}) > 1:
            hint = f"; pass --skip-bad to train on the {len(rows)} labelled slide(s) that have one"
        raise LabelsError(text + hint)
    names = list(classes) if classes is not None else sorted({r["label"] for r in rows})
    if classes is None and len(names) < 2:
        raise LabelsError(f"{labels_csv}: only one class ({names[0]!r}); training needs at least two")
    index = {c: i for i, c in enumerate(names)}
    bad = sorted({r["label"] for r in rows} - set(index))
    if bad:
        raise LabelsError(f"{labels_csv}: label(s) {', '.join(bad)} not among the model's classes {', '.join(names)}")
    items = [Item(r["slide_id"], files[r["slide_id"]], index[r["label"]], r.get("split") or None) for r in rows]
    return Cohort(items, names, missing, [p for sid, p in files.items() if sid not in labelled])


def build_cohort(
    slide_dir: str | Path,
    labels_csv: str | Path,
    *,
    classes: Sequence[str] | None = None,
    recursive: bool = False,
) -> tuple[list[Item], list[str]]:
    """Match labels to slide files (every labelled slide must have one). Returns items and class names."""
    cohort = match_cohort(slide_dir, labels_csv, classes=classes, recursive=recursive)
    return cohort.items, cohort.classes


def short_list(names: Sequence[object], shown: int = 5) -> str:
    """'a, b, c, d, e and 7 more'."""
    text = ", ".join(str(n) for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def split_items(items: Sequence[Item], *, val_fraction: float, seed: int) -> tuple[list[Item], list[Item], list[Item]]:
    """Train / val / test. A split column decides; otherwise a stratified random val split."""
    if any(it.split for it in items):
        train = [it for it in items if it.split in (None, "train")]
        val = [it for it in items if it.split == "val"]
        test = [it for it in items if it.split == "test"]
        if not val and val_fraction > 0:
            train, val = _stratified(train, val_fraction, seed)
        return train, val, test
    train, val = _stratified(list(items), val_fraction, seed)
    return train, val, []


def _stratified(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    if fraction <= 0:
        return items, []
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted({it.label for it in items}):
        group = [it for it in items if it.label == label]
        order = rng.permutation(len(group))
        k = int(round(fraction * len(group)))
        k = min(max(k, 1), len(group) - 1) if len(group) > 1 else 0
        val += [group[i] for i in order[:k]]
        train += [group[i] for i in order[k:]]
    return train, val


class ViewDataset(Dataset):
    """Loads the low-resolution view and tissue mask of each slide (inside DataLoader workers).

    Prepared views are kept between epochs in memory, up to `cfg.view_cache_mb` per process
    (least recently used first out: a large cohort does not fill the machine), and, with
    `cfg.view_cache` set, in files there (`<slide id>-<key>.npz`, written atomically), so a view
    evicted from memory, or needed by a later run, is loaded in milliseconds instead of decoded
    from the slide again. The file key covers the slide file (path, size, modification time) and
    every setting that changes the view, so a stale file is never used.
    """

    def __init__(self, items: Sequence[Item], cfg: object, *, backend: str = "auto", mpp: float | None = None) -> None:
        self.items = list(items)
        self.cfg = cfg
        self.backend = backend
        self.mpp = mpp
        self.budget = int(getattr(cfg, "view_cache_mb", 0)) << 20
        folder = getattr(cfg, "view_cache", None)
        self.folder = Path(folder) if folder else None
        self._cache: OrderedDict[int, object] = OrderedDict()
        self._bytes = 0
        # Cache file -> what it must match, once a slide was opened to check it: a view evicted from
        # memory is then loaded again without opening its slide (the file name covers path, size, mtime).
        self._identities: dict[Path, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, object]:
        """(index, PreparedView), or (index, error message) for a slide that cannot be read:
        exceptions do not cross DataLoader worker processes intact, so they travel as text."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return i, self._cache[i]
        view = self._load(i)
        self._remember(i, view)
        return i, view

    def _load(self, i: int) -> object:
        from wsiats.view import prepare_view, with_exploration

        path = self.items[i].path
        file = self._file(path)
        known = self._identities.get(file) if file is not None else None
        identity = known or {}
        view = _read_view_file(file, known) if known is not None and file is not None and file.is_file() else None
        fresh = False
        if view is None:  # checked against the slide before, or read from it now
            try:
                with collect_notes() as notes, open_slide(path, backend=self.backend, mpp=self.mpp) as slide:
                    identity = _slide_identity(slide, self.cfg) if file is not None else {}  # opening decodes no pixels
                    if file is not None and file.is_file():
                        view = _read_view_file(file, identity)
                    if view is None:
                        view = prepare_view(slide, self.cfg)  # type: ignore[arg-type]
                        fresh = True
            except WsiatsError as exc:
                return str(exc)
            if fresh:
                view.notes = notes  # type: ignore[attr-defined]
            if file is not None:
                self._identities[file] = identity
        fresh = with_exploration(view, self.cfg) or fresh  # type: ignore[arg-type]
        if file is not None and fresh:
            _write_view_file(file, view, identity)  # type: ignore[arg-type]
        return view

    def check_all(self, *, workers: int = 0, progress: bool = False) -> list[tuple[Item, str]]:
        """Prepare every view once, before any training (in `workers` processes); keep them in memory
        as the budget allows. Returns (item, error message) for each view that cannot be read."""
        from torch.utils.data import DataLoader

        from wsiats._progress import track

        loader = DataLoader(self, batch_size=1, num_workers=workers, collate_fn=collate_views)
        bad = []
        for batch in track(loader, total=len(self), description="reading views", disable=not progress):
            for i, view in batch:
                if isinstance(view, str):
                    bad.append((self.items[i], view))
                elif i not in self._cache:  # prepared in a worker process: keep it here too
                    self._remember(i, view)
        return bad

    def subset(self, keep: Sequence[int]) -> ViewDataset:
        """A dataset of the items at `keep`, with their views already in memory carried over."""
        out = ViewDataset([self.items[i] for i in keep], self.cfg, backend=self.backend, mpp=self.mpp)
        out._identities = dict(self._identities)
        for j, i in enumerate(keep):
            if i in self._cache:
                out._remember(j, self._cache[i])
        return out

    def _remember(self, i: int, view: object) -> None:
        size = _view_bytes(view)
        if size > self.budget:
            return
        self._cache[i] = view
        self._bytes += size
        while self._bytes > self.budget:
            _, old = self._cache.popitem(last=False)
            self._bytes -= _view_bytes(old)

    def _file(self, path: Path) -> Path | None:
        """The cache file of a slide's view, or None without a cache folder (or for a missing slide)."""
        if self.folder is None:
            return None
        try:
            st = Path(path).stat()
        except OSError:
            return None
        from wsiats import __version__  # a release may read views or compute masks differently

        cfg = self.cfg
        key = json.dumps({
            "format": _VIEW_FILE_FORMAT, "wsiats": __version__,
            "path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "view_mpp": getattr(cfg, "view_mpp", None), "view_downsample": getattr(cfg, "view_downsample", None),
            "tissue_mask": getattr(cfg, "tissue_mask", None), "backend": self.backend, "mpp": self.mpp,
            # nested sampling caches the coarse view (the key of a one-level view is unchanged)
            **({"coarse_downsample": getattr(cfg, "coarse_downsample", None)} if getattr(cfg, "nested", False) else {}),
        }, sort_keys=True)
        return self.folder / f"{slide_id(path)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


#: Version of the view cache files; a change makes earlier files unused.
_VIEW_FILE_FORMAT = 4  # 3: with what the file must match of its slide (dimensions, downsample, header hash); 4: half-resolution tissue mask of large views
#: Bytes hashed at each end of a slide file to identify its content (a TIFF's header and IFDs lie there).
_HEADER_BYTES = 1 << 16


_IDENTITY_TEXT = {"dimensions": "the slide's size", "requested_downsample": "the view downsample",
                  "header_sha256": "the hash of the slide file's header"}


def _slide_identity(slide: object, cfg: object) -> dict[str, np.ndarray]:
    """What a view cache file must match: the slide's level-0 size, the view's requested downsample,
    and a SHA-256 of the slide file's first and last 64 KiB (of each file, for a DICOM folder)."""
    from wsiats.view import view_downsample

    path = Path(slide.path)  # type: ignore[attr-defined]
    digest = hashlib.sha256()
    for part in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
        with open(part, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            digest.update(f"{part.name}:{size}:".encode() + fh.read(_HEADER_BYTES))
            fh.seek(max(_HEADER_BYTES, size - _HEADER_BYTES))
            digest.update(fh.read(_HEADER_BYTES))
    return {"dimensions": np.asarray(slide.dimensions, dtype=np.int64),  # type: ignore[attr-defined]
            "requested_downsample": np.asarray(view_downsample(slide, cfg), dtype=np.float64),  # type: ignore[arg-type]
            "header_sha256": np.asarray(digest.hexdigest())}


def _view_bytes(view: object) -> int:
    """Memory a cached entry holds (an error message: nothing to speak of)."""
    image, mask = getattr(view, "image", None), getattr(view, "mask", None)
    return int(image.nbytes + mask.nbytes) if image is not None and mask is not None else 0


def _write_view_file(file: Path, view: PreparedView, identity: dict[str, np.ndarray]) -> None:
    """Store a prepared view; the cache only speeds things up, so a failure to write is logged, not raised."""
    from wsiats._io import atomic_open

    try:
        with atomic_open(file, "wb") as fh:
            extra = {} if view.explore is None else {"explore": view.explore}  # type: ignore[attr-defined]
            np.savez(fh, image=view.image, mask=view.mask, downsample=np.asarray(view.downsample, dtype=np.float64),
                     fell_back=np.asarray(view.fell_back), mpp=np.asarray(np.nan if view.mpp is None else view.mpp),
                     mpp_source=np.asarray(view.mpp_source or ""), notes=np.array(view.notes, dtype=np.str_).reshape(-1),
                     **extra, **identity)  # type: ignore[arg-type]
    except OSError as exc:
        log.warning("%s: cannot write the view cache file (%s); going on without it", file, exc)


def _read_view_file(file: Path, identity: dict[str, np.ndarray]) -> object | None:
    """A view stored by `_write_view_file` for the slide and settings of `identity`, or None (logged) when
    the file cannot be used: damaged, or stored for another slide, another size or another downsample."""
    from wsiats.view import PreparedView

    try:
        with np.load(file, allow_pickle=False) as z:
            image, mask = z["image"], z["mask"]
            downsample, fell_back = z["downsample"], z["fell_back"]
            mpp, mpp_source, notes = float(z["mpp"]), str(z["mpp_source"]), [str(n) for n in z["notes"]]
            explore = z["explore"] if "explore" in z.files else None
            stored = {name: z[name] for name in identity}
        if image.dtype != np.uint8 or image.ndim != 3 or mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
            raise ValueError("unexpected arrays")
        for name, value in identity.items():
            if stored[name].shape != value.shape or not (np.allclose(stored[name], value, rtol=1e-9, atol=0)
                                                         if value.dtype.kind == "f" else np.array_equal(stored[name], value)):
                raise ValueError(f"stored for another slide or setting: {_IDENTITY_TEXT[name]} differs")
        (width, height), ds = (int(v) for v in identity["dimensions"]), float(identity["requested_downsample"])
        shape = (max(1, round(height / ds)), max(1, round(width / ds)))  # Slide.read_view's size
        if image.shape[:2] != shape or not np.allclose(downsample, (width / shape[1], height / shape[0]),
                                                       rtol=VIEW_DOWNSAMPLE_RTOL, atol=0):
            raise ValueError(f"a view of {image.shape[1]} x {image.shape[0]} px does not fit the slide")
        if explore is not None and (explore.dtype != np.float32 or explore.shape != mask.shape):
            raise ValueError("unexpected exploration distribution")
        return PreparedView(image=image, mask=mask, downsample=(float(downsample[0]), float(downsample[1])),
                            fell_back=bool(fell_back), mpp=None if math.isnan(mpp) else mpp,
                            mpp_source=mpp_source or None, notes=notes, explore=explore)
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: unusable view cache file (%s); reading the slide", file, exc)
        return None


def collate_views(batch: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Keep views as a list: slides differ in size."""
    return batch


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed depends only on `parts` (seed, epoch, ...): resumable runs."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))
    return g
