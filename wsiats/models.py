"""The networks: attention network, feature networks (a registry) and the linear classifier.

`ATSModel` holds the three and the pieces of the forward pass that do not touch a file;
`wsiats.forward` composes them with a patch reader (view -> attention -> sample -> read ->
features -> expectation -> logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from wsiats import backbones
from wsiats.embed_cache import EmbeddingCache
from wsiats.errors import ModelError
from wsiats.mil import GatedAttentionPool

# ImageNet statistics: the convention of every pretrained backbone, harmless for the small CNN.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float images [B, 3, H, W] -> float normalised with ImageNet statistics."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _nhwc(x: Tensor) -> Tensor:
    """x copied into a fresh channels-last (NHWC) tensor, the layout oneDNN's convolutions are fast on.

    Measured on a 1438^2 view without gradients (2 CPU cores): 89 ms, against 194 ms for an NCHW
    tensor and 329 ms for a view as it arrives, an (h, w, 3) array permuted to [1, 3, h, w]: NHWC
    strides except a batch stride of 3, which oneDNN does not take as NHWC. Training (forward and
    backward, 512^2 view): 33 ms against 70 ms. Same outputs.
    """
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).copy_(x)


def _normalized_nhwc(images: Tensor) -> Tensor:
    """`_nhwc(normalize_images(images))` in one float buffer: the cast is the copy into the channels-last
    tensor, then a multiply and a subtract in place (per channel 1 / (255 std) and mean / std), not four
    temporaries of the view's size. The same values to float rounding."""
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device,
                    memory_format=torch.channels_last).copy_(images)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    scale = (1.0 / 255.0 if images.dtype == torch.uint8 else 1.0) / std
    return x.mul_(scale).sub_(torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1) / std)


class Tanh(nn.Module):
    """tanh(x) computed as 2 sigmoid(2x) - 1: the same function to float rounding (|difference| <= 2e-7 in
    float32), and the attention network's largest cost after its convolutions. On this project's 2-core CPU with
    torch 2.14.1, 2.1 M channels-last floats: 4.0 ms with torch.tanh, 1.3 ms this way; forward and backward 8.6
    against 7.7 ms. No parameters, so checkpoints are the same as with nn.Tanh. Without gradient it overwrites
    its input (in `AttentionNet`, a convolution's output): a fresh buffer of the activations' size cost more than
    the arithmetic."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.sigmoid(x * 2) * 2 - 1
        return x.mul_(2).sigmoid_().mul_(2).sub_(1)  # in place, on the convolution's output that nothing else reads


class AttentionNet(nn.Module):
    """Official megapixel-MNIST attention network: three 3x3 convs (8, 8, 1 channels), tanh.

    Padding is 'replicate' and stride 1, so the map has the view's shape and cell (r, c) is
    centred on view pixel (r, c); replicate padding avoids the artificial edge that zero
    padding puts at the slide border (attention collapsing onto edges, official issues).
    The receptive field is `receptive_field` view pixels, centred on the cell.
    """

    receptive_field = 7  # three 3x3 convolutions, stride 1

    def __init__(self, *, channels: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, padding_mode="replicate"),
            Tanh(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate"),
            Tanh(),
            nn.Conv2d(channels, 1, 3, padding=1, padding_mode="replicate"),
        )

    #: Rows per band. Without gradients (inference) memory holds one band's activations, not the
    #: whole view's (8 channels x float32 per view pixel).
    band_rows = 64
    #: With gradients (training), views of more cells than this run in bands that are checkpointed:
    #: their activations are recomputed in the backward pass, one band at a time. Measured per
    #: step (peak RSS rise, time): a 1438^2 view +355-387 MB and 0.48-1.17 s one-shot, +32-113 MB
    #: and 0.40-0.42 s in bands; but ATS-5 on 128^2 views 19.5 ms one-shot, 25.8 ms in bands.
    checkpoint_cells = 512 * 512

    def forward(self, view: Tensor) -> Tensor:
        """view [B, 3, h, w] (uint8 or float) -> attention logits [B, h*w]."""
        h, w = view.shape[-2:]
        train = torch.is_grad_enabled()
        if h <= self.band_rows or (train and h * w <= self.checkpoint_cells):
            return self.net(_normalized_nhwc(view)).flatten(1)
        # Each band carries a halo of receptive_field // 2 rows on both sides; outputs inside
        # the halo are dropped, so the result equals the one-shot map (replicate padding is
        # applied only at the real image border, where band and image edges coincide).
        halo = self.receptive_field // 2
        bands: list[Tensor] = []
        out = None  # inference: allocated once the first band gives the dtype (autocast may make it half)
        for top in range(0, h, self.band_rows):
            lo, hi = max(0, top - halo), min(h, top + self.band_rows + halo)
            rows = min(self.band_rows, h - top)
            if train:
                bands.append(checkpoint(self._band, view[..., lo:hi, :], top - lo, rows, use_reentrant=False))
                continue
            band = self._band(view[..., lo:hi, :], top - lo, rows)
            if out is None:
                out = band.new_empty((*band.shape[:-2], h, band.shape[-1]))
            out[..., top: top + rows, :] = band
        return (torch.cat(bands, dim=-2) if train else out).flatten(1)  # type: ignore[union-attr]

    def _band(self, view: Tensor, start: int, rows: int) -> Tensor:
        """Logits of `rows` rows from `start` of a band of the view (the band includes its halo)."""
        return self.net(_normalized_nhwc(view))[..., start: start + rows, :]

    def unpadded(self, crops: Tensor) -> Tensor:
        """crops [n, 3, s + 2 halo, s + 2 halo] -> logits [n, s, s] of their centres (halo: receptive_field // 2).

        The layers with their convolutions unpadded: no layer pads, the halo holds every pixel the centres'
        logits see, so they equal `forward`'s on any view the crops were cut from away from its border."""
        x = _normalized_nhwc(crops)
        for layer in self.net:
            x = F.conv2d(x, layer.weight, layer.bias) if isinstance(layer, nn.Conv2d) else layer(x)
        return x[:, 0]


class SmallCNN(nn.Module):
    """A feature network that trains from scratch on a CPU.

    After the official megapixel-MNIST feature net (a wide first conv then three 3x3 convs,
    ReLU, global max pool), with strides so that a 64 px patch costs ~5 M multiply-adds.
    """

    def __init__(self, *, width: int = 32) -> None:
        super().__init__()
        self.out_dim = width
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.amax(self.net(x), dim=(2, 3))


class L2Normalized(nn.Module):
    """Wrap a backbone: feed it as its weights expect, L2-normalise its output (paper eq. 9 needs it).

    `normalize` False (`Config.feature_norm` 'none') returns the backbone's output as it is: with unit-norm
    features a small CNN trained from scratch did not learn from slide labels in simulated Megapixel MNIST
    bags (`benchmarks/bench_mnist_bags.py --features`), without them it did; on the project's cohorts fewer
    sampled patches then landed in the informative regions, so unit norm stays the default.

    Patches are resized to the backbone's `input_size` (when it has one) and normalised with its
    `mean`/`std`; `pool` "token+mean" turns a token sequence [M, T, D] into the class token
    concatenated with the mean of the patch tokens (after `prefix_tokens` class/register tokens).
    On CUDA the backbone runs channels-last (see `_apply`).
    """

    def __init__(self, backbone: nn.Module, out_dim: int, *, input_size: tuple[int, int] | None = None,
                 mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD, interpolation: str = "bilinear",
                 pool: str = "features", prefix_tokens: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim
        self.input_size = input_size
        self.interpolation = interpolation
        self.pool = pool
        self.prefix_tokens = prefix_tokens
        #: False: the backbone's (pooled) output as it is (`Config.feature_norm` 'none')
        self.normalize = True
        # not saved with the weights: they come from the feature net's name, like its architecture
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, patches: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) patches [M, 3, p, p] -> the backbone's input: resized, normalised."""
        x = patches.float()
        if patches.dtype == torch.uint8:
            x = x / 255.0
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # bicubic overshoots
        x = (x - self.mean) / self.std  # type: ignore[operator]  # buffers
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, patches: Tensor) -> Tensor:
        """patches [M, 3, p, p] uint8 -> features [M, D], unit-norm unless `normalize` is off."""
        feats = self.backbone(self.preprocess(patches))
        if self.pool == "token+mean":
            feats = torch.cat([feats[:, 0], feats[:, self.prefix_tokens:].mean(1)], dim=-1)
        return F.normalize(feats.float(), dim=-1, eps=1e-6) if self.normalize else feats.float()

    def _apply(self, fn: Callable[..., Tensor], recurse: bool = True) -> L2Normalized:  # type: ignore[override]
        """`.to(device)` and friends; on CUDA also convert the backbone's 4-D weights to channels-last."""
        super()._apply(fn, recurse)
        if self.mean.is_cuda:
            channels_last(self.backbone)
        return self


def channels_last(module: nn.Module) -> nn.Module:
    """Convert the 4-D parameters (convolution weights) of `module` to channels-last, in place.

    cuDNN's convolutions run fastest on NHWC tensors under mixed precision; values are unchanged.
    """
    for param in module.parameters():
        if param.dim() == 4 and not param.is_contiguous(memory_format=torch.channels_last):
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return module


FeatureFactory = Callable[..., "tuple[nn.Module, int]"]
_FEATURE_NETS: dict[str, FeatureFactory] = {}


def register_feature_net(name: str) -> Callable[[FeatureFactory], FeatureFactory]:
    """Decorator: make a feature-network factory available to `create_feature_net(name)`."""

    def deco(fn: FeatureFactory) -> FeatureFactory:
        _FEATURE_NETS[name] = fn
        return fn

    return deco


def list_feature_nets() -> list[str]:
    """Registered names and foundation-model recipes; any timm model is also accepted as `timm:<name>`
    or `hf-hub:<repo>`."""
    return sorted([*_FEATURE_NETS, *_TIMM_ALIASES, *backbones.list_recipes()])


@register_feature_net("small-cnn")
def _small_cnn(*, width: int = 32) -> tuple[nn.Module, int]:
    net = SmallCNN(width=width)
    return net, net.out_dim


#: Registered names that are timm architectures.
_TIMM_ALIASES = {"resnet18": "timm:resnet18", "resnet50": "timm:resnet50"}


def create_feature_net(name: str, *, width: int = 32, weights: str | Path | None = None, pretrained: bool = True,
                       timm_kwargs: dict[str, object] | None = None) -> L2Normalized:
    """Build a feature network by name, L2-normalised, optionally loading local weights.

    Names: the registry and recipes (`list_feature_nets()`), `timm:<any timm model>`, or
    `hf-hub:<repo>` (weights downloaded when `pretrained`). `timm_kwargs` go to
    `timm.create_model`, over a recipe's arguments.
    """
    if name in _FEATURE_NETS:
        backbone, dim = _FEATURE_NETS[name](width=width)
        if weights is not None:
            load_weights(backbone, weights)
        return L2Normalized(backbone, dim)
    if not (name in _TIMM_ALIASES or name in backbones.RECIPES or name.startswith(("timm:", "hf-hub:"))):
        raise ModelError(
            f"unknown feature net {name!r}; valid: {', '.join(list_feature_nets())}, "
            "timm:<model name> or hf-hub:<repo>"
        )
    b = backbones.build(_TIMM_ALIASES.get(name, name), pretrained=pretrained and weights is None, kwargs=timm_kwargs)
    if weights is not None:
        load_weights(b.module, weights, prefix=b.weights_prefix)
    return L2Normalized(b.module, b.out_dim, input_size=b.input_size, mean=b.mean, std=b.std,
                        interpolation=b.interpolation, pool=b.pool, prefix_tokens=b.prefix_tokens)


def load_weights(module: nn.Module, path: str | Path, *, prefix: str = "") -> None:
    """Load a state dict from .safetensors or a weights-only torch file; never unpickle code.

    prefix: only the file's keys that start with it are used, with it removed (a backbone stored
    inside a larger checkpoint). A mismatch is one line naming the file and the first missing,
    unexpected and mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or ["no details"])[0][:200]  # EOFError of an empty file has none
        raise ModelError(
            f"{path}: not a loadable weights file ({type(exc).__name__}: {detail}); "
            "only safetensors and weights-only torch files are accepted"
        ) from None
    for wrapper in ("state_dict", "model"):  # {"state_dict": ...} (Lightning) or {"model": ...} (DINO, iBOT)
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]  # type: ignore[assignment]
            break
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    # A backbone's classifier head is dropped (num_classes=0): 'fc.'/'head.' leftovers are not a mismatch.
    unexpected = [k for k in state if k not in own and str(k).split(".")[0] not in ("fc", "head", "classifier")]
    misshaped = []
    for k, mine in own.items():  # in the net's order: the first layers first
        v = state.get(k)
        if v is not None and not isinstance(v, Tensor):
            misshaped.append(f"{k} (a {type(v).__name__}, not a tensor)")
        elif v is not None and v.shape != mine.shape:
            misshaped.append(f"{k} (file {_shape(v)}, net {_shape(mine)})")
    if missing or unexpected or misshaped:
        parts = [f"{len(keys)} {what} ({', '.join(map(str, keys[:3]))}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                 if keys]
        hint = f" under the prefix {prefix!r}" if prefix else ""
        raise ModelError(f"{path}: weights do not match the feature net{hint}: {'; '.join(parts)}")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


class OnTissue(torch.nn.Module):
    """An `AttentionNet` run only on the tiles of its view that hold a cell of `mask`; logits elsewhere are 0.

    The attention is zero off the tissue mask whatever the logits there (`sampling.smooth_attention`), and the
    network over the whole view is the largest stage of predict: on the 2-gigapixel benchmark slide (a 1438^2
    view, 29% tissue) 0.43 s against 0.13 s on its tissue tiles (same process, loaded machine); on the
    20-gigapixel nested benchmark slide's 552^2 coarse view (14% tissue) likewise. Each tile
    is cut with a halo of half the receptive field, clipped at the view's border (where the network's own
    replicate padding then applies, as on the whole view), so a tile's logits are the whole view's (to float
    rounding). The tile side is whichever of `SIDES` decodes the fewest pixels for this mask; the whole view is
    run at once when that saves less than a fifth. Inference only: with gradients use the network itself.
    """

    SIDES = (8, 16, 32, 64)  # powers of two from 8: `_grids` reads 8 mask cells as one uint64

    def __init__(self, net: AttentionNet, mask: Tensor) -> None:
        super().__init__()
        self.net, self.mask = net, mask.bool().cpu().numpy()

    def forward(self, view: Tensor) -> Tensor:
        """view [1, 3, h, w] -> logits [1, h * w]."""
        h, w = view.shape[-2:]
        if view.shape[0] != 1 or self.mask.shape != (h, w) or not self.mask.any():
            return self.net(view)
        halo = self.net.receptive_field // 2
        grids = self._grids()
        costs = {t: self._cost(int(grids[t].sum()), t, halo, h, w) for t in self.SIDES}
        side = min(costs, key=costs.__getitem__)  # the first of the cheapest
        if costs[side] > 0.8 * h * w:
            return self.net(view)
        rows, cols = np.nonzero(grids[side])
        tiles = list(zip(rows.tolist(), cols.tolist()))
        # tiles whose halo lies inside the view run with unpadded convolutions (`AttentionNet.unpadded`)
        groups: dict[tuple[bool, int, int], list[tuple[int, int, int, int, int, int]]] = {}
        for ty, tx in tiles:
            y0, x0, y1, x1 = ty * side, tx * side, min(h, (ty + 1) * side), min(w, (tx + 1) * side)
            lo_y, lo_x, hi_y, hi_x = max(0, y0 - halo), max(0, x0 - halo), min(h, y1 + halo), min(w, x1 + halo)
            inside = (lo_y, lo_x, hi_y, hi_x) == (y0 - halo, x0 - halo, y1 + halo, x1 + halo)
            groups.setdefault((inside, hi_y - lo_y, hi_x - lo_x), []).append((y0, x0, y1, x1, lo_y, lo_x))
        out: Tensor | None = None
        for (inside, ch, cw), boxes in groups.items():
            crops = torch.stack([view[0, :, ly: ly + ch, lx: lx + cw] for _, _, _, _, ly, lx in boxes])
            if inside:  # [n, side, side]: the crops' centres, at offset `halo`
                logits, at = self.net.unpadded(crops), halo
            else:
                logits, at = self.net(crops).reshape(len(boxes), ch, cw), 0
            if out is None:
                out = logits.new_zeros((h, w))
            for (y0, x0, y1, x1, ly, lx), tile in zip(boxes, logits):
                oy, ox = y0 - ly - at, x0 - lx - at
                out[y0:y1, x0:x1] = tile[oy: oy + y1 - y0, ox: ox + x1 - x0]
        assert out is not None
        return out.reshape(1, h * w)

    def _grids(self) -> dict[int, np.ndarray]:
        """side -> bool grid [ceil(h / side), ceil(w / side)] (more rows and columns of False past the view): the
        tiles of `side` px that hold a cell of the mask, each side's grid reduced from the next smaller one's."""
        h, w = self.mask.shape
        big, small = self.SIDES[-1], self.SIDES[0]
        grid = np.pad(self.mask, ((0, -h % big), (0, -w % big)))
        # each row's runs of 8 cells read as one uint64 (non-zero: one of them is on), then 8 rows at a time: 0.13
        # ms on a 1438^2 mask against 4.5 ms for the same any() over (8, 8) blocks
        grid = (np.ascontiguousarray(grid).view(np.uint64).reshape(grid.shape[0] // small, small, -1) != 0).any(axis=1)
        grids, side = {small: grid}, small
        for nxt in self.SIDES[1:]:
            f = nxt // side
            grid = np.asarray(grid.reshape(grid.shape[0] // f, f, grid.shape[1] // f, f).any(axis=(1, 3)))
            grids[nxt], side = grid, nxt
        return grids

    @staticmethod
    def _cost(tiles: int, side: int, halo: int, h: int, w: int) -> int:
        """View pixels the network runs on for this many tiles of `side` px (halos included)."""
        return tiles * min(h, side + 2 * halo) * min(w, side + 2 * halo)


class ATSModel(nn.Module):
    """Attention network + feature network (+ gated attention MIL pooling) + linear classifier g.

    pooling 'gated' adds `mil`, a `GatedAttentionPool` over the patches' features; 'ats' combines
    them with the attention-sampling estimator alone (the paper's model, no extra parameters).
    With `nested`, `coarse_net` is the attention over the regions of a coarse view and `attention_net`
    the attention inside each picked region (`wsiats.nested`). With `freeze_features` the feature network stays in eval mode and runs without gradient, and
    `embed_cache` (`feature_cache_mb` > 0) keeps the embeddings of patches already seen.
    """

    def __init__(
        self,
        *,
        n_classes: int,
        feature_net: str = "small-cnn",
        feature_dim: int = 32,
        feature_weights: str | Path | None = None,
        freeze_features: bool = False,
        pooling: str = "ats",
        feature_norm: str = "l2",
        feature_net_args: dict[str, object] | None = None,
        pretrained: bool = True,
        feature_cache_mb: float = 0,
        nested: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("gated", "ats"):
            raise ModelError(f"pooling must be 'gated' or 'ats', got {pooling!r}")
        if feature_norm not in ("l2", "none"):
            raise ModelError(f"feature_norm must be 'l2' or 'none', got {feature_norm!r}")
        self.attention_net = AttentionNet()
        # nested sampling (`wsiats.nested`): a second attention network over the coarse view picks the regions
        self.coarse_net = AttentionNet() if nested else None
        self.feature_net = create_feature_net(feature_net, width=feature_dim, weights=feature_weights,
                                              pretrained=pretrained, timm_kwargs=feature_net_args)
        self.feature_net.normalize = feature_norm == "l2"
        self.pooling = pooling
        self.mil = GatedAttentionPool(self.feature_net.out_dim) if pooling == "gated" else None
        self.classifier = nn.Linear(self.feature_net.out_dim, n_classes)
        self.freeze_features = freeze_features
        self.embed_cache = EmbeddingCache(feature_cache_mb) if freeze_features and feature_cache_mb > 0 else None
        if freeze_features:
            self.feature_net.requires_grad_(False)

    def train(self, mode: bool = True) -> ATSModel:
        super().train(mode)
        if self.freeze_features:
            self.feature_net.eval()
        return self
