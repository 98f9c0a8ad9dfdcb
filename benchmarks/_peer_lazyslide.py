"""LazySlide's dense pipeline on one slide, run by bench_backbones.py inside LazySlide's own venv.

Argument: a JSON spec {"slide", "tile_px", "mpp", "sample", "seed", "model"}. Prints one JSON line:
the seconds of open + find_tissues + tile_tissues (every tile), of feature_extraction on a random
sample of `sample` tiles, and their extrapolation to every tile. The feature network is timm's
architecture with random weights (no download), passed to LazySlide as a callable; tiles are
normalised with ImageNet statistics, as LazySlide does for its own resnet50.
"""

from __future__ import annotations

import json
import sys
import time

t_import = time.perf_counter()
import lazyslide as zs  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import wsidata  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from wsidata import open_wsi  # noqa: E402

import_s = time.perf_counter() - t_import


def main() -> int:
    spec = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    wsi = open_wsi(spec["slide"])
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, spec["tile_px"], mpp=spec["mpp"])
    tiling_s = time.perf_counter() - t0
    tiles = wsi.shapes["tiles"]
    n = len(tiles)
    rng = np.random.default_rng(spec["seed"])
    take = np.sort(rng.choice(n, size=min(spec["sample"], n), replace=False))
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False, num_classes=0).eval()
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])

    def extract() -> np.ndarray:
        return zs.tl.feature_extraction(wsi, model, model_name=spec["model"], transform=transform, device="cpu",
                                        batch_size=32, pbar=False, return_features=True)

    wsi.shapes["tiles"] = tiles.iloc[take[:8]].reset_index(drop=True)
    extract()  # warm-up (thread pools, first allocations), as the wsiats side gets
    wsi.shapes["tiles"] = tiles.iloc[take].reset_index(drop=True)
    t1 = time.perf_counter()
    feats = extract()
    features_sample_s = time.perf_counter() - t1
    features_s = features_sample_s * n / len(take)
    print(json.dumps({
        "peer": "LazySlide", "lazyslide": zs.__version__, "wsidata": wsidata.__version__,
        "reader": str(getattr(wsi, "reader", "")).splitlines()[0][:80], "import_s": import_s,
        "tiling_s": tiling_s, "tiles": n, "sampled_tiles": int(len(take)), "extrapolated": bool(len(take) < n),
        "features_sample_s": features_sample_s, "features_s": features_s, "feature_shape": list(np.shape(feats)),
        "total_s": tiling_s + features_s,
        "what": "open_wsi + find_tissues + tile_tissues (every tile) + feature_extraction (sampled, extrapolated)",
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
