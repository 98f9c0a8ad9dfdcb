"""What the benchmark scripts share: the machine and code they ran on, child processes, cached data and models.

Heavy imports (torch, wsiats) happen inside functions, after OMP_WAIT_POLICY is set: OpenMP reads it once,
when torch loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --- the machine, the code, child processes ---------------------------------------------------------------------


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; NaN where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # the kernel reports kB
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def code_hash() -> str:
    """A short hash of the package's sources: cached models are retrained when the code changes."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "wsiats").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def code_version() -> dict[str, Any]:
    """The commit the numbers were measured at, whether wsiats/ had uncommitted changes, and code_hash(), as they
    stood when this module was imported (the benchmark's start): a commit made while a long run is going does
    not relabel what it measured."""
    return dict(_CODE_AT_START)


def _code_version() -> dict[str, Any]:
    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "wsiats")
    return {"git_commit": git("rev-parse", "HEAD"), "wsiats_uncommitted_changes": bool(status) if status is not None
            else None, "wsiats_source_hash": code_hash()}


_CODE_AT_START = _code_version()


def prune_stale(cache: Path, prefix: str, keep: Path) -> None:
    """Remove this script's cached runs made by other versions of the code (`prefix*`, all but `keep`)."""
    for old in cache.glob(prefix + "*"):
        if old.is_dir() and old != keep and not old.name.endswith(code_hash()):
            shutil.rmtree(old, ignore_errors=True)


def machine_info(*, with_torch: bool = True) -> dict[str, Any]:
    """The machine the numbers were measured on; with torch's version, threads and OpenMP policy unless
    `with_torch` is False (bench_read measures the readers alone and never imports torch)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    if with_torch:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), numpy=np.__version__,
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP default, active spinning)"))
    return info


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def set_omp_policy(policy: str) -> None:
    """OMP_WAIT_POLICY for this process (before torch loads) and its children."""
    if policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy == "active":
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"


def tissue_tile_centers(mask: np.ndarray, view_downsample: tuple[float, float], dimensions: tuple[int, int],
                        patch: int) -> tuple[np.ndarray, int]:
    """Level-0 centres (n, 2) of the `patch`-px grid tiles whose centre lies on tissue; and the grid size.

    The grid covers the slide with whole tiles (a partial last row/column is dropped); a tile is
    tissue when the view cell under its centre is in `mask`.
    """
    W, H = dimensions
    ys, xs = np.mgrid[0: H // patch, 0: W // patch]
    cx, cy = (xs + 0.5) * patch, (ys + 0.5) * patch
    rows = np.minimum((cy / view_downsample[1]).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum((cx / view_downsample[0]).astype(np.int64), mask.shape[1] - 1)
    keep = mask[rows, cols]
    return np.stack([cx[keep], cy[keep]], axis=1).astype(np.float64), int(xs.size)


def run_child(script: Path, spec: dict[str, Any], *, timeout: float = 1800) -> dict[str, Any]:
    """Run `script --child SPEC` in a fresh interpreter; its last stdout line is the JSON answer."""
    proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec.get('kind')} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def json_safe(value: Any) -> Any:
    """NaN and infinities become None, so that the file is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- cached data: slides, a cohort, a trained model -----------------------------------------------------------


def ensure_slide(cache: Path, size: int, seed: int) -> tuple[Path, float | None]:
    """A synthetic positive slide of `size` x `size` px, generated once; (path, seconds or None if cached)."""
    from wsiats.synth import make_slide

    path = cache / f"predict_slide_{size}_s{seed}.tif"
    if path.exists():
        return path, None
    t0 = time.perf_counter()
    make_slide(path, size=size, label="positive", seed=seed)
    return path, time.perf_counter() - t0


def ensure_cohort(cache: Path, *, n: int, size: int, seed: int) -> tuple[Path, float | None]:
    """A `wsiats synth` cohort (a quarter of it test slides), generated once; (folder, seconds or None if cached)."""
    from wsiats.synth import make_cohort

    cohort = cache / f"synth_cohort_{n}x{size}_s{seed}"
    if (cohort / "truth.json").exists():  # make_cohort writes it last
        return cohort, None
    shutil.rmtree(cohort, ignore_errors=True)
    t0 = time.perf_counter()
    make_cohort(cohort, n=n, size=size, seed=seed, test_fraction=0.25)
    return cohort, time.perf_counter() - t0


def ensure_model(cache: Path, *, n: int, size: int, epochs: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """A run folder trained with the demo settings on a synthetic cohort (cached per code version)."""
    from wsiats.demo import DEMO_CONFIG
    from wsiats.config import resolve
    from wsiats.train import train

    cohort, _ = ensure_cohort(cache, n=n, size=size, seed=seed)
    run = cache / f"predict_run_{n}x{size}_s{seed}_e{epochs}_{code_hash()}"
    prune_stale(cache, "predict_run_", run)
    info_path = run / "bench_info.json"
    if info_path.exists():
        return run, json.loads(info_path.read_text())
    shutil.rmtree(run, ignore_errors=True)
    cfg = resolve(overrides={**DEMO_CONFIG, "seed": seed, "epochs": epochs})
    t0 = time.perf_counter()
    result = train(cohort / "slides", cohort / "labels.csv", run, cfg, progress=False)
    last = result.history[-1]
    info = {"cohort": f"{n} slides of {size} px (synth seed {seed})", "epochs": epochs,
            "train_seconds": time.perf_counter() - t0, "best_epoch": result.best_epoch + 1,
            "final_train_loss": last["train_loss"], "final_val_acc": last["val_acc"]}
    info_path.write_text(json.dumps(info, indent=1))
    return run, info


# --- baselines ----------------------------------------------------------------------------------------------------


@functools.cache
def _gated_pool_class() -> type:
    """Defined on first use, so that torch is not imported before OMP_WAIT_POLICY is set."""
    import torch
    from torch import nn

    class GatedPool(nn.Module):
        """Gated attention pooling of Ilse et al. (2018): softmax_i w^T (tanh(V h_i) * sigmoid(U h_i))."""

        def __init__(self, dim: int, hidden: int) -> None:
            super().__init__()
            self.V, self.U, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            """h [n, dim] -> pooled [dim]."""
            a = torch.softmax(self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1), dim=0)
            return (a[:, None] * h).sum(0)

    return GatedPool


def gated_pool(dim: int, *, hidden: int = 64) -> Any:
    """A gated attention-pooling module (Ilse et al. 2018; hidden 64 is a small version of their 128)."""
    return _gated_pool_class()(dim, hidden)
