"""timm backbones (`wsiats.backbones`): preprocessing, foundation-model recipes, weights from files and the hub."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from wsiats import backbones
from wsiats.backbones import RECIPES
from wsiats.cli import cli
from wsiats.errors import ModelError
from wsiats.models import L2Normalized, channels_last, create_feature_net

TINY_RUN = ["--batch-size", "2", "--n-patches", "3", "--patch-size", "40", "--view-downsample", "16", "--workers", "0",
            "--epochs", "1", "-q"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


# --- preprocessing from the model's pretrained configuration -------------------------------------------------------


def test_timm_model_gets_its_own_input_size_and_statistics() -> None:
    """resnet18's pretrained config: 224 px, ImageNet mean/std, bicubic; a 64 px patch is resized to 224."""
    net = create_feature_net("timm:resnet18")
    assert net.input_size == (224, 224) and net.interpolation == "bicubic"
    torch.testing.assert_close(net.mean.flatten(), torch.tensor(backbones.IMAGENET_MEAN))
    seen: list[tuple[int, ...]] = []
    net.backbone.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    feats = net(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert seen == [(2, 3, 224, 224)] and feats.shape == (2, 512)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))


def test_vit_statistics_follow_its_pretrained_config() -> None:
    """vit_small_patch16_224's default weights (augreg) were trained with mean = std = 0.5, not ImageNet's."""
    net = create_feature_net("timm:vit_small_patch16_224", timm_kwargs={"depth": 1})
    assert net.input_size == (224, 224)
    torch.testing.assert_close(net.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(net.std.flatten(), torch.full((3,), 0.5))


def test_resize_keeps_a_flat_patch_flat_and_normalises() -> None:
    net = L2Normalized(torch.nn.Identity(), 3, input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                       interpolation="bicubic")
    x = net.preprocess(torch.full((1, 3, 5, 5), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 8, 8)
    torch.testing.assert_close(x, torch.full((1, 3, 8, 8), 2.0))  # (1 - 0.5) / 0.25, bicubic clamped to [0, 1]
    same = net.preprocess(torch.zeros((1, 3, 8, 8), dtype=torch.uint8))  # already the input size: not resampled
    torch.testing.assert_close(same, torch.full((1, 3, 8, 8), -2.0))


def test_recipe_input_size_follows_img_size() -> None:
    """timm's pretrained config says 518 px for the DINOv2 giants; built with img_size=224, 224 it is."""
    with torch.device("meta"):
        b = backbones.build("h-optimus-0", pretrained=False)
    assert b.input_size == (224, 224)
    with torch.device("meta"):
        conch = backbones.build("conch", pretrained=False)
    assert conch.input_size == (448, 448) and conch.mean == backbones.CLIP_MEAN


def test_channels_last_converts_the_convolutions_only() -> None:
    net = create_feature_net("timm:resnet18")
    channels_last(net.backbone)
    conv = net.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert net.backbone.fc.weight.is_contiguous() if hasattr(net.backbone.fc, "weight") else True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_backbone_runs_channels_last_in_bfloat16() -> None:
    from wsiats.runtime import autocast_factory

    net = create_feature_net("timm:resnet18").cuda()
    assert net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    assert net.preprocess(x.cuda()).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast_factory(torch.device("cuda"), True)():
        feats = net(x.cuda())
    assert feats.dtype == torch.float32 and feats.shape == (4, 512)


# --- the foundation-model recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_the_published_architecture(name: str) -> None:
    """At full size, on the meta device (no memory, no weights): the parameter count and embedding size of
    each model card (UNI 303M ViT-L/16, Virchow 632M ViT-H/14, H-optimus-0 1.1B, Prov-GigaPath 1.13B ...)."""
    recipe = RECIPES[name]
    with torch.device("meta"):
        b = backbones.build(name, pretrained=False)
    assert sum(p.numel() for p in b.module.parameters()) == recipe.params
    assert b.out_dim == recipe.embed_dim
    assert b.input_size == (recipe.input_size, recipe.input_size)
    assert (b.mean, b.std) == (recipe.mean, recipe.std)
    assert b.module.num_prefix_tokens == 1 + recipe.kwargs.get("reg_tokens", 0)


def test_recipes_use_the_layers_they_name() -> None:
    with torch.device("meta"):
        virchow2 = backbones.build("virchow2", pretrained=False).module
        uni = backbones.build("uni", pretrained=False).module
    assert type(virchow2.blocks[0].mlp).__name__ == "GluMlp"  # SwiGLUPacked
    assert isinstance(virchow2.blocks[0].mlp.act, torch.nn.SiLU)
    assert virchow2.reg_token.shape == (1, 4, 1280)
    assert uni.blocks[0].ls1.gamma.shape == (1024,)  # init_values: LayerScale
    assert uni.dynamic_img_size


def test_a_layer_name_timm_does_not_have_is_one_line() -> None:
    with pytest.raises(ModelError, match=r"^feature net 'uni': mlp_layer 'NoSuchMlp' is not a timm layer$"):
        backbones.build("uni", pretrained=False, kwargs={"mlp_layer": "NoSuchMlp"})


def _tiny_weights(name: str, path: Path) -> L2Normalized:
    """A tiny random version of recipe `name`, saved like the model's own checkpoint (under CONCH's prefix)."""
    torch.manual_seed(7)
    net = create_feature_net(name, timm_kwargs=dict(RECIPES[name].tiny))
    prefix = RECIPES[name].weights_prefix
    save_file({prefix + k: v.contiguous() for k, v in net.backbone.state_dict().items()}, str(path))
    return net


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tiny_recipe_round_trips_through_a_weights_file(name: str, tmp_path: Path) -> None:
    src = _tiny_weights(name, tmp_path / "w.safetensors")
    recipe = RECIPES[name]
    dst = create_feature_net(name, timm_kwargs=dict(recipe.tiny), weights=tmp_path / "w.safetensors")
    patches = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        a, b = src.eval()(patches), dst.eval()(patches)
    torch.testing.assert_close(a, b)
    width = recipe.tiny["embed_dim"] * (2 if recipe.pool == "token+mean" else 1)
    assert a.shape == (3, width) and dst.input_size == (recipe.tiny["img_size"],) * 2


def test_virchow_embedding_is_class_token_and_mean_of_patch_tokens() -> None:
    torch.manual_seed(0)
    net = create_feature_net("virchow2", timm_kwargs=dict(RECIPES["virchow2"].tiny)).eval()
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        tokens = net.backbone(net.preprocess(x))  # [2, 1 + 4 registers + 4 patches, 32]
        feats = net(x)
    assert tokens.shape == (2, 9, 32)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
    torch.testing.assert_close(feats, torch.nn.functional.normalize(expected, dim=-1))


def test_weights_of_another_size_name_the_file_and_keys(tmp_path: Path) -> None:
    _tiny_weights("uni", tmp_path / "uni_tiny.safetensors")
    with pytest.raises(ModelError) as info:
        create_feature_net("uni", timm_kwargs={**RECIPES["uni"].tiny, "embed_dim": 64},
                           weights=tmp_path / "uni_tiny.safetensors")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'uni_tiny.safetensors'}: weights do not match the feature net: ")
    assert "mis-shaped (cls_token (file 1x1x32, net 1x1x64), pos_embed (file 1x5x32, net 1x5x64)" in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    code, text = invoke("synth", out, "--n", "4", "--size", "1024", "--seed", "5", "--test-fraction", "0", "-q")
    assert code == 0, text
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_train_and_predict_through_each_recipe(name: str, cohort: Path, tmp_path: Path) -> None:
    """Random tiny weights in a safetensors file (no download): train 1 epoch with the backbone frozen, predict."""
    weights = tmp_path / f"{name}.safetensors"
    _tiny_weights(name, weights)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"feature_net": name, "feature_weights": str(weights),
                                      "feature_net_args": dict(RECIPES[name].tiny)}))
    run = tmp_path / "run"
    code, text = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", run,
                        "--config", config, "--freeze-features", "--val-fraction", "0", *TINY_RUN)
    assert code == 0, text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["feature_net"] == name and saved["feature_net_args"] == dict(RECIPES[name].tiny)
    # the frozen backbone in the run's weights is the file's, unchanged by training
    state = load_file(str(run / "model.safetensors"))
    source = load_file(str(weights))
    prefix = RECIPES[name].weights_prefix
    for key, value in source.items():
        torch.testing.assert_close(state["feature_net.backbone." + key[len(prefix):]], value)
    weights.unlink()  # predict needs only the run folder
    out = tmp_path / "pred.csv"
    code, text = invoke("predict", cohort / "slides", "--model", run, "--out", out, "--workers", "0", "-q")
    assert code == 0, text
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and all(r["error"] == "" and int(r["n_patches"]) == 3 for r in rows)


# --- the Hugging Face hub ---------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 with an empty (or test-filled) hub cache."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_model_offline_and_not_cached_is_one_line(offline_hub: Path) -> None:
    with pytest.raises(ModelError) as info:
        create_feature_net("hf-hub:MahmoodLab/UNI")
    assert str(info.value) == (
        "feature net 'hf-hub:MahmoodLab/UNI': its weights are not in the local Hugging Face cache and the hub cannot "
        "be reached (offline, or HF_HUB_OFFLINE=1); download them where there is network (hf download MahmoodLab/UNI) "
        "and copy the cache, or pass the weights as a file: --feature-net uni --feature-weights FILE.safetensors")


def test_hub_model_without_a_recipe_offline_names_timm_architecture(offline_hub: Path) -> None:
    with pytest.raises(ModelError, match=re.escape("or pass the weights as a file: --feature-net timm:<its "
                                                   "architecture> --feature-weights FILE.safetensors")):
        create_feature_net("hf-hub:someone/some-vit")


def test_hub_train_cli_offline_is_one_error_line(offline_hub: Path, cohort: Path, tmp_path: Path) -> None:
    code, text = invoke("train", cohort / "slides", "--labels", cohort / "labels.csv", "--out", tmp_path / "run",
                        "--feature-net", "hf-hub:paige-ai/Virchow2", *TINY_RUN)
    assert code == 1
    assert text.splitlines() == [
        "Error: feature net 'hf-hub:paige-ai/Virchow2': its weights are not in the local Hugging Face cache and the "
        "hub cannot be reached (offline, or HF_HUB_OFFLINE=1); download them where there is network (hf download "
        "paige-ai/Virchow2) and copy the cache, or pass the weights as a file: --feature-net virchow2 "
        "--feature-weights FILE.safetensors"]


def test_hub_model_from_the_local_cache(offline_hub: Path) -> None:
    """What a download leaves in the hub cache (config.json + model.safetensors of a snapshot) loads offline,
    with the weights of the file and the preprocessing of the hub config."""
    torch.manual_seed(3)
    src = create_feature_net("timm:vit_tiny_patch16_224", timm_kwargs={"depth": 1, "img_size": 32})
    snapshot = offline_hub / "models--lab--tiny-vit" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (offline_hub / "models--lab--tiny-vit" / "refs").mkdir()
    (offline_hub / "models--lab--tiny-vit" / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 0,
        "model_args": {"depth": 1, "img_size": 32},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.6, 0.5, 0.4], "std": [0.2, 0.2, 0.2],
                           "interpolation": "bilinear", "num_classes": 0}}))
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(snapshot / "model.safetensors"))
    net = create_feature_net("hf-hub:lab/tiny-vit")
    assert net.input_size == (32, 32) and net.interpolation == "bilinear"
    torch.testing.assert_close(net.mean.flatten(), torch.tensor([0.6, 0.5, 0.4]))
    for key, value in src.backbone.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[key], value)


def test_a_run_trained_from_the_hub_predicts_offline(offline_hub: Path) -> None:
    """predict builds the model without hub weights (the run's file holds them): a recipe's hub name
    then needs no hub at all, not even its config.json."""
    net = create_feature_net("hf-hub:MahmoodLab/UNI", pretrained=False, timm_kwargs=dict(RECIPES["uni"].tiny))
    assert net.backbone.blocks[0].ls1.gamma.shape == (32,) and net.backbone.dynamic_img_size
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        create_feature_net("hf-hub:someone/some-vit", pretrained=False)  # no recipe: the architecture is on the hub
