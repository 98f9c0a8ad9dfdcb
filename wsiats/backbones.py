"""Feature-network backbones from timm: any timm model by name, pathology foundation-model recipes.

Each backbone comes with the preprocessing its weights were trained with (input size, mean/std,
interpolation), taken from the model's pretrained configuration (`timm.data.resolve_model_data_config`)
or, for the foundation models, from their published model cards; `wsiats.models.L2Normalized` applies
it, so patches of any `--patch-size` are resized to the model's input.

Names:

- `timm:<name>`: any architecture timm knows, random weights (or `--feature-weights FILE`);
- `hf-hub:<org>/<repo>`: a timm model on the Hugging Face hub, weights downloaded (or read from the
  local hub cache; offline, a missing cache is one clear error);
- a recipe name (`list_recipes()`: `uni`, `virchow2`, `h-optimus-0`, ...): the timm architecture and
  arguments a foundation model needs, for weights from a local file. `hf-hub:` names of those models
  get the recipe's arguments too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wsiats.errors import ModelError

#: ImageNet statistics (most pathology foundation models were trained with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP statistics (CONCH).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Recipe:
    """How to build one foundation model with timm, and how to feed it.

    `kwargs` are `timm.create_model` arguments; layer classes are given by name (`"SwiGLUPacked"`,
    `"SiLU"`) so that a recipe can be written in YAML and printed. `pool` is how the slide-level
    embedding is taken from the tokens: "token" (the class token, timm's default) or "token+mean"
    (the class token concatenated with the mean of the patch tokens, register tokens excluded, as
    Virchow's model card prescribes). `weights_prefix` is stripped from the keys of a weights file
    (CONCH's image trunk sits under `visual.trunk.` in its checkpoint).
    """

    name: str
    architecture: str
    kwargs: Mapping[str, Any]
    hub: str | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    pool: str = "token"
    weights_prefix: str = ""
    embed_dim: int = 0  # the embedding size at full size, after pooling (documentation and tests)
    params: int = 0  # parameters at full size, as counted by timm (the model cards' 303M, 632M, ...)
    note: str = ""
    #: Arguments that make a small model with the same structure (tests, smoke runs).
    tiny: Mapping[str, Any] = field(default_factory=dict)


_TINY_14 = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 28}
_TINY_16 = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}
_DINOV2_G = {"embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2,
             "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

#: The recipes, from each model's card (Hugging Face) and its timm configuration.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("uni", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
           "MahmoodLab/UNI", embed_dim=1024, params=303_350_784, tiny=_TINY_16,
           note="UNI (Chen et al. 2024): ViT-L/16, DINOv2-trained; weights pytorch_model.bin"),
    Recipe("uni2-h", "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
           "MahmoodLab/UNI2-h", embed_dim=1536, params=681_394_176, tiny=_TINY_14,
           note="UNI2-h: ViT-H/14 with 8 register tokens and SwiGLU"),
    Recipe("virchow", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
           "paige-ai/Virchow", pool="token+mean", embed_dim=2560, params=631_229_184, tiny=_TINY_14,
           note="Virchow (Vorontsov et al. 2024): ViT-H/14; embedding = class token ++ mean patch token"),
    Recipe("virchow2", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 4},
           "paige-ai/Virchow2", pool="token+mean", embed_dim=2560, params=631_239_424, tiny=_TINY_14,
           note="Virchow2: ViT-H/14 with 4 register tokens (left out of the mean)"),
    Recipe("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, **_DINOV2_G, "reg_tokens": 4, "no_embed_class": True, "dynamic_img_size": False},
           "bioptimus/H-optimus-0", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
           embed_dim=1536, params=1_134_774_272, tiny=_TINY_14,
           note="H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers; its own mean/std"),
    Recipe("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, **_DINOV2_G, "reg_tokens": 4, "no_embed_class": True, "dynamic_img_size": False},
           "bioptimus/H-optimus-1", mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
           embed_dim=1536, params=1_134_774_272, tiny=_TINY_14,
           note="H-optimus-1: the architecture and statistics of H-optimus-0"),
    Recipe("prov-gigapath", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, **_DINOV2_G, "patch_size": 16, "mlp_ratio": 5.33334},
           "prov-gigapath/prov-gigapath", embed_dim=1536, params=1_134_953_984, tiny=_TINY_16,
           note="Prov-GigaPath tile encoder (Xu et al. 2024): ViT-g with 16 px patches"),
    Recipe("conch", "vit_base_patch16_224", {"img_size": 448}, None, mean=CLIP_MEAN, std=CLIP_STD,
           input_size=448, weights_prefix="visual.trunk.", embed_dim=768, params=86_250_240,
           tiny={"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32},
           note="CONCH's image trunk (Lu et al. 2024): ViT-B/16 at 448 px, CLIP mean/std, the visual.trunk.* "
                "keys of CONCH's checkpoint. CONCH's own image embedding adds an attentional pooler that timm "
                "does not have: these are the trunk's class-token features"),
)}


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def recipe_for(name: str) -> Recipe | None:
    """The recipe of a recipe name, or of an `hf-hub:` name of a model with a recipe."""
    if name in RECIPES:
        return RECIPES[name]
    if name.startswith(("hf-hub:", "hf_hub:")):
        repo = name.split(":", 1)[1]
        return next((r for r in RECIPES.values() if r.hub == repo), None)
    return None


@dataclass
class Backbone:
    """A timm model and how to feed it: what `wsiats.models.L2Normalized` wraps."""

    module: nn.Module
    out_dim: int
    input_size: tuple[int, int] | None  # (h, w) patches are resized to; None: any size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear" or "bicubic"
    pool: str  # "features" (the module's output), "token+mean"
    prefix_tokens: int  # class + register tokens before the patch tokens ("token+mean")
    weights_prefix: str = ""


def import_timm(name: str) -> Any:
    """timm, or a one-line ModelError saying why it cannot be imported."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"feature net {name!r} needs timm, a dependency of wsiats that is not installed: "
                         "pip install 'timm>=1.0.9'") from None
    except Exception as exc:  # typically a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise ModelError(
            f"feature net {name!r}: timm is installed but cannot be imported ({type(exc).__name__}: {exc}); "
            f"its torchvision must be the release built for torch {torch.__version__}"
        ) from None
    return timm


def _resolve_layers(timm: Any, kwargs: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Layer arguments given by name (`mlp_layer: SwiGLUPacked`, `act_layer: SiLU`) -> the classes."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if not (key.endswith("_layer") and isinstance(value, str)):
            continue
        found = None
        if key == "act_layer":
            found = timm.layers.get_act_layer(value.lower())
        elif key == "norm_layer":
            found = timm.layers.get_norm_layer(value)
        else:
            found = getattr(timm.layers, value, None)
        if found is None:
            raise ModelError(f"feature net {name!r}: {key} {value!r} is not a timm layer")
        out[key] = found
    return out


def build(name: str, *, pretrained: bool, kwargs: Mapping[str, Any] | None = None) -> Backbone:
    """Build the timm backbone of `name` (`timm:<arch>`, `hf-hub:<repo>` or a recipe name).

    pretrained: for `hf-hub:` names, download the weights (or take them from the hub cache).
    Otherwise weights are random (a local file is loaded afterwards). `kwargs` override the
    recipe's `timm.create_model` arguments (e.g. a smaller `depth` for a test).
    """
    timm = import_timm(name)
    recipe = recipe_for(name)
    hub = name.startswith(("hf-hub:", "hf_hub:"))
    args = {**(recipe.kwargs if recipe else {}), **(kwargs or {})}
    if recipe is not None and not (hub and pretrained):
        arch = recipe.architecture  # weights from a file: no need to reach the hub for the architecture
    elif hub:
        arch = "hf-hub:" + name.split(":", 1)[1]
    else:
        arch = name[len("timm:"):] if name.startswith("timm:") else name
    try:
        # num_classes=0 drops the classifier head: the model returns pooled features
        model = timm.create_model(arch, pretrained=hub and pretrained, num_classes=0, **_resolve_layers(timm, args, name))
    except ModelError:
        raise
    except Exception as exc:
        raise _creation_error(name, exc) from None
    return _describe(model, recipe, args)


def _creation_error(name: str, exc: Exception) -> ModelError:
    """A one-line error for a model timm could not create; hub failures say how to go without the hub."""
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of timm
        hub_errors = None  # type: ignore[assignment]
    repo = name.split(":", 1)[1] if ":" in name else name
    if hub_errors is not None and isinstance(exc, hub_errors.LocalEntryNotFoundError | hub_errors.OfflineModeIsEnabled):
        recipe = recipe_for(name)
        use = f"--feature-net {recipe.name}" if recipe else f"--feature-net timm:<its architecture>"
        return ModelError(
            f"feature net {name!r}: its weights are not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1); download them where there is network (hf download {repo}) and copy "
            f"the cache, or pass the weights as a file: {use} --feature-weights FILE.safetensors"
        )
    if hub_errors is not None and isinstance(exc, hub_errors.GatedRepoError):
        return ModelError(f"feature net {name!r}: {repo} is gated on the Hugging Face hub; request access on its page "
                          "and log in (hf auth login), or pass the weights as a file with --feature-weights")
    if hub_errors is not None and isinstance(exc, hub_errors.RepositoryNotFoundError):
        return ModelError(f"feature net {name!r}: no repository {repo} on the Hugging Face hub (or it is private)")
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ModelError(f"feature net {name!r}: timm could not create it ({detail})")


def _describe(model: nn.Module, recipe: Recipe | None, args: Mapping[str, Any]) -> Backbone:
    """The backbone with its preprocessing: the recipe's, else the model's pretrained configuration."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if recipe is not None:
        mean, std = recipe.mean, recipe.std
    size: tuple[int, int] | None = tuple(config["input_size"][-2:])  # type: ignore[assignment]
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:  # a ViT built with its own img_size: the pretrained config does not follow it
        size = (int(img_size[0]), int(img_size[1]))
    interpolation = "bicubic" if config.get("interpolation") == "bicubic" else "bilinear"
    dim = int(getattr(model, "num_features"))
    pool = "features"
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    if recipe is not None and recipe.pool == "token+mean":
        if args.get("global_pool", None) != "":
            raise ModelError(f"feature net {recipe.name!r}: pool token+mean needs global_pool '' (the tokens)")
        pool, dim = "token+mean", 2 * dim
    return Backbone(model, dim, size, mean, std, interpolation, pool, prefix,
                    recipe.weights_prefix if recipe else "")
