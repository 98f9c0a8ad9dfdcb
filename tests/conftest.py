"""Session-wide fixtures: small slides, a synthetic cohort and a 1-epoch run made once per test run (see
tests/_slides.py), and the helpers the CLI tests share (TINY, invoke)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))

import _slides  # noqa: E402
from _slides import Generated  # noqa: E402

#: Training options of the CLI tests: a tiny model that trains in seconds (no progress bars).
TINY = ["--batch-size", "2", "--n-patches", "4", "--patch-size", "32", "--view-downsample", "16", "--workers", "0",
        "-q"]


def invoke(*args: object, env: dict[str, str] | None = None, obj: object = None) -> Result:
    """`wsiats ARGS` through click's CliRunner, in this process; `obj` is click's context object (`train` runs
    the `wsiats.train.TrainHooks` it is given there)."""
    from wsiats.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], env=env, obj=obj)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`wsiats synth --n 8 --size 1024 --seed 5`, read-only for the tests (copy what you change)."""
    out = tmp_path_factory.mktemp("cohort")
    result = invoke("synth", out, "--n", "8", "--size", "1024", "--seed", "5", "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def run_dir(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch TINY run on `cohort`, read-only for the tests (copy it to resume or damage it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run, "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.output
    return run


#: Real slides from scanners and slide software (read-only), shared beside the repository.
SHARED_SLIDES = Path(__file__).parent.parent.parent / "shared" / "slides"


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    """The in-memory level 0 (600 x 800 px) most generated slides are written from."""
    return _slides.tissue_image(600, 800, seed=3)


@pytest.fixture(scope="session")
def generic_tiff(slide_dir: Path, image: np.ndarray) -> Generated:
    """Lossless (deflate) 3-level pyramid in the main IFD chain, 0.25 um/px in centimetre units."""
    path = slide_dir / "generic.tif"
    return Generated(path, _slides.write_generic_pyramid(path, image, n_levels=3, tile=128, mpp=0.25), 0.25)


@pytest.fixture(scope="session")
def generic_jpeg(slide_dir: Path, image: np.ndarray) -> Generated:
    path = slide_dir / "generic_jpeg.tiff"
    return Generated(path, _slides.write_generic_pyramid(path, image, n_levels=3, tile=128, compression="jpeg",
                                                         mpp=None), None)


@pytest.fixture(scope="session")
def ome_tiff(slide_dir: Path, image: np.ndarray) -> Generated:
    """OME-TIFF whose reduced levels are SubIFDs (invisible to OpenSlide)."""
    path = slide_dir / "pyramid.ome.tif"
    return Generated(path, _slides.write_ome_subifds(path, image, n_levels=3, tile=128, mpp=0.5), 0.5)


@pytest.fixture(scope="session")
def svs(slide_dir: Path, image: np.ndarray) -> tuple[Generated, dict[str, np.ndarray]]:
    """Aperio-like JPEG SVS: levels at downsample 1, 4, 16 plus thumbnail, label and macro."""
    path = slide_dir / "aperio.svs"
    written = _slides.write_svs_like(path, image, n_levels=3, tile=128, mpp=0.25)
    extras = {k: v for k, v in written.items() if k != "levels"}
    return Generated(path, written["levels"], 0.25), extras  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def strip_tiff(slide_dir: Path, image: np.ndarray) -> Generated:
    """Single-level stripped TIFF (no pyramid at all)."""
    path = slide_dir / "strips.tif"
    _slides.write_strips(path, image, mpp=0.5)
    return Generated(path, [image], 0.5)


@pytest.fixture(scope="session")
def sparse(slide_dir: Path) -> _slides.SparseSlide:
    """100,000 x 100,000 px (10 gigapixels) pyramid, a few MB on disk: almost every tile is empty."""
    return _slides.write_sparse_huge(slide_dir / "sparse_10gpx.tif")


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    if not SHARED_SLIDES.is_dir():
        pytest.skip(f"real test slides not found at {SHARED_SLIDES}")
    return SHARED_SLIDES


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Many tiny ops: intra-op threads only add wake-up latency (~0.5 ms an op on 2 busy cores).
    Use it for a whole module with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
