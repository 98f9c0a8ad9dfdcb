"""Embeddings of patches already seen, kept across epochs while the feature network is frozen.

With `--freeze-features` the feature network never changes, so the embedding of a patch depends
only on its pixels: the slide, the sampled cell (with the view's downsample, where the cell is),
the patch settings (size, downsample) and the augmentation applied to it. `EmbeddingCache` maps
that key to the embedding (float32, on the CPU), least recently used out past `max_mb`;
`embed_patches` runs the feature network on the patches the cache does not hold.

A random augmentation (`--augment`: brightness and contrast are drawn per slide and epoch) makes
every epoch's keys new, so the cache pays off with `--no-augment`, for validation passes (always
unaugmented) and for `predict --mc`.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PatchKey = tuple[Hashable, ...]

#: Bytes an entry costs beyond its float32 data. Measured (RSS growth over 200,000 entries, CPython 3.11):
#: ~280 bytes for the numpy row object and the ordered-dict slot, ~90 for the key. (A torch tensor per
#: row would cost ~1,160 bytes; hence numpy rows.)
_ENTRY_OVERHEAD = 400


def patch_keys(slide: str | Path, cells: np.ndarray, view_downsample: tuple[float, float], patch_size: int,
               patch_downsample: float, augment: Hashable) -> list[PatchKey]:
    """One key per sampled cell: what fixes the pixels of its patch."""
    where = (str(slide), tuple(float(d) for d in view_downsample), int(patch_size), float(patch_downsample), augment)
    return [(where, int(c)) for c in np.asarray(cells).reshape(-1)]


@dataclass
class CacheStats:
    """Counts and seconds since the last `EmbeddingCache.take_stats()`."""

    hits: int = 0
    misses: int = 0
    embed_s: float = 0.0  # feature-network time spent on the misses
    overhead_s: float = 0.0  # look-ups, stores, copies
    seconds_per_patch: float = float("nan")  # feature-network time per embedded patch, over the cache's life
    entries: int = 0
    mb: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")

    @property
    def speedup(self) -> float:
        """Estimated time of the feature passes without the cache over their time with it."""
        spent = self.embed_s + self.overhead_s
        total = self.hits + self.misses
        if not total or not spent or self.seconds_per_patch != self.seconds_per_patch:
            return float("nan")
        return self.seconds_per_patch * total / spent


class EmbeddingCache:
    """An LRU map from patch keys to embeddings, bounded in memory."""

    def __init__(self, max_mb: float) -> None:
        if max_mb < 0:
            raise ValueError(f"max_mb must be >= 0, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self._store: OrderedDict[PatchKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats()
        self._embedded, self._embed_total_s = 0, 0.0  # over the cache's whole life: the per-patch cost

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, keys: Sequence[PatchKey]) -> list[np.ndarray | None]:
        """The stored embedding (a float32 row) of each key, or None; a hit becomes the most recently used."""
        found: list[np.ndarray | None] = []
        for key in keys:
            value = self._store.get(key)
            if value is not None:
                self._store.move_to_end(key)
            found.append(value)
        return found

    def store(self, keys: Sequence[PatchKey], feats: Tensor) -> None:
        """Keep `feats[i]` (moved to the CPU as float32) under `keys[i]`; evict the least recently used."""
        rows = feats.detach().to("cpu", torch.float32).numpy()
        for key, row in zip(keys, rows):
            if key in self._store:
                self._store.move_to_end(key)
                continue
            row = row.copy()  # its own memory, not a view that keeps the whole batch alive
            size = row.size * 4 + _ENTRY_OVERHEAD
            if size > self.max_bytes:
                return
            self._store[key] = row
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._store.popitem(last=False)
                self._bytes -= old.size * 4 + _ENTRY_OVERHEAD

    def record(self, *, hits: int, misses: int, embed_s: float, overhead_s: float) -> None:
        s = self._stats
        s.hits += hits
        s.misses += misses
        s.embed_s += embed_s
        s.overhead_s += overhead_s
        if misses:
            self._embedded += misses
            self._embed_total_s += embed_s

    def take_stats(self) -> CacheStats:
        """The stats since the previous call (then reset), with the cache's size now."""
        s = self._stats
        s.seconds_per_patch = self._embed_total_s / self._embedded if self._embedded else float("nan")
        s.entries, s.mb = len(self._store), self._bytes / 2**20
        self._stats = CacheStats()
        return s


def embed_patches(model: torch.nn.Module, patches: Tensor, keys: Sequence[PatchKey] | None = None, *,
                  device: torch.device, autocast: Callable[[], object] | None = None) -> Tensor:
    """Features [M, D] (float32, on `device`) of uint8 patches [M, 3, p, p] (on the CPU).

    A frozen feature network (`model.freeze_features`) runs without gradient, in the autocast
    dtype (bfloat16 on CUDA), and its embeddings are looked up in / stored to `model.embed_cache`
    (when the model has one and `keys` are given). Otherwise this is the plain feature pass.
    """
    frozen = bool(getattr(model, "freeze_features", False))
    cache: EmbeddingCache | None = getattr(model, "embed_cache", None) if frozen else None
    if cache is None or keys is None or cache.max_bytes == 0:
        return _run(model.feature_net, patches, device, autocast, frozen)  # type: ignore[arg-type]  # an nn.Module's attribute
    if len(keys) != len(patches):
        raise ValueError(f"{len(keys)} keys for {len(patches)} patches")
    t0 = time.perf_counter()
    found = cache.lookup(keys)
    miss = [i for i, f in enumerate(found) if f is None]
    embed_s = 0.0
    new = None
    if miss:
        t1 = time.perf_counter()
        new = _run(model.feature_net, patches[miss], device, autocast, frozen).cpu()  # type: ignore[arg-type]  # .cpu() waits for the GPU
        embed_s = time.perf_counter() - t1
        cache.store([keys[i] for i in miss], new)
    dim = new.shape[1] if new is not None else found[0].shape[0]  # type: ignore[union-attr]
    out = torch.empty(len(keys), dim)
    hit = [i for i, f in enumerate(found) if f is not None]
    if hit:
        out[hit] = torch.from_numpy(np.stack([found[i] for i in hit]))  # type: ignore[misc]
    if new is not None:
        out[miss] = new
    result = out.to(device, non_blocking=device.type == "cuda")
    cache.record(hits=len(hit), misses=len(miss), embed_s=embed_s,
                 overhead_s=time.perf_counter() - t0 - embed_s)
    return result


def _run(net: torch.nn.Module, patches: Tensor, device: torch.device, autocast: Callable[[], object] | None,
         frozen: bool) -> Tensor:
    use_cuda = device.type == "cuda"
    if use_cuda:
        patches = patches.pin_memory()  # lets the copy below overlap with work already queued on the GPU
    ctx = autocast or contextlib.nullcontext
    grad = torch.no_grad() if frozen else contextlib.nullcontext()
    with grad, ctx():  # type: ignore[attr-defined]
        return net(patches.to(device, non_blocking=use_cuda)).float()
