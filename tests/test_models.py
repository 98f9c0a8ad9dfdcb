"""The networks (`wsiats.models`) and the model files that hold them (`wsiats.checkpoint`)."""

from __future__ import annotations

import pathlib
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from wsiats.checkpoint import build_model, load_model, save_weights
from wsiats.config import Config
from wsiats.errors import CheckpointError, ModelError
from wsiats.models import (
    ATSModel,
    AttentionNet,
    SmallCNN,
    Tanh,
    _normalized_nhwc,
    create_feature_net,
    list_feature_nets,
    load_weights,
    normalize_images,
)
from wsiats.run import MODEL_FILE



# --- the feature-network registry ---------------------------------------------------------------------------------


def test_registry_lists_the_names() -> None:
    assert list_feature_nets() == ["conch", "h-optimus-0", "h-optimus-1", "prov-gigapath", "resnet18", "resnet50",
                                   "small-cnn", "uni", "uni2-h", "virchow", "virchow2"]


def test_unknown_feature_net_lists_the_valid_ones() -> None:
    with pytest.raises(ModelError) as info:
        create_feature_net("resnet-18")
    assert str(info.value) == (
        "unknown feature net 'resnet-18'; valid: conch, h-optimus-0, h-optimus-1, prov-gigapath, resnet18, resnet50, "
        "small-cnn, uni, uni2-h, virchow, virchow2, timm:<model name> or hf-hub:<repo>"
    )


def _import_fails(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "timm":
            raise exc
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize(("name", "shown"), [("timm:resnet18", "timm:resnet18"), ("resnet50", "timm:resnet50"),
                                             ("hf-hub:org/model", "hf-hub:org/model"), ("uni", "uni")])
def test_timm_names_without_timm_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch, name: str, shown: str) -> None:
    """timm is a dependency now; an environment that lost it still gets one line, not a traceback."""
    _import_fails(monkeypatch, ImportError("No module named 'timm'"))
    with pytest.raises(ModelError) as info:
        create_feature_net(name)
    assert str(info.value) == (f"feature net {shown!r} needs timm, a dependency of wsiats that is not installed: "
                               "pip install 'timm>=1.0.9'")


def test_a_broken_timm_install_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured here: timm with torchvision 0.28.0 beside a torch 2.13.0 build fails on import with
    RuntimeError 'operator torchvision::nms does not exist'; that must be one line, not a traceback."""
    _import_fails(monkeypatch, RuntimeError("operator torchvision::nms does not exist"))
    with pytest.raises(ModelError, match=r"timm is installed but cannot be imported \(RuntimeError: operator "
                                         r"torchvision::nms does not exist\); its torchvision must be the release"):
        create_feature_net("timm:resnet18")


def test_timm_unknown_model_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"^feature net 'timm:no-such-model-xyz': timm could not create it "
                                         r"\(Unknown model \(no-such-model-xyz\)\)$"):
        create_feature_net("timm:no-such-model-xyz")


# --- shapes and normalisation ----------------------------------------------------------------------------------


def test_features_are_l2_normalised() -> None:
    torch.manual_seed(0)
    net = create_feature_net("small-cnn", width=12)
    assert net.out_dim == 12
    patches = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    feats = net(patches)
    assert feats.shape == (5, 12) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    # uint8 and the same images in [0, 1] are the same input
    torch.testing.assert_close(net(patches.float() / 255.0), feats)
    # a blank patch (all features 0 before normalising) gives a finite vector, not NaN
    assert torch.isfinite(net(torch.full((1, 3, 40, 40), 255, dtype=torch.uint8))).all()


def test_feature_norm_none_keeps_the_backbones_output() -> None:
    patches = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(0)
    unit = ATSModel(n_classes=2, feature_dim=12, pooling="gated")
    torch.manual_seed(0)
    raw = ATSModel(n_classes=2, feature_dim=12, pooling="gated", feature_norm="none")
    f_unit, f_raw = unit.feature_net(patches), raw.feature_net(patches)
    torch.testing.assert_close(f_unit.norm(dim=1), torch.ones(5))
    assert not torch.allclose(f_raw.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(f_raw / f_raw.norm(dim=1, keepdim=True), f_unit)  # same network, not normalised
    with pytest.raises(ModelError, match="feature_norm must be 'l2' or 'none'"):
        ATSModel(n_classes=2, feature_norm="batch")


def test_normalize_images_uses_imagenet_statistics() -> None:
    x = normalize_images(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 0, 0], (1 - mean) / std)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 5), (9, 16)])
def test_attention_map_has_the_view_shape(h: int, w: int) -> None:
    net = AttentionNet()
    out = net(torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8))
    assert out.shape == (2, h * w) and out.dtype == torch.float32


def test_attention_cell_is_centred_on_its_view_pixel() -> None:
    """Changing view pixel (r, c) changes exactly the cells within receptive_field // 2 of (r, c)."""
    torch.manual_seed(0)
    net = AttentionNet()
    view = torch.randint(0, 256, (1, 3, 11, 13), dtype=torch.uint8)
    base = net(view).reshape(11, 13)
    half = AttentionNet.receptive_field // 2
    for r, c in ((5, 6), (0, 0), (10, 2)):
        moved = view.clone()
        moved[0, :, r, c] = 255 - moved[0, :, r, c]
        changed = (net(moved).reshape(11, 13) - base).abs() > 0
        rows, cols = torch.meshgrid(torch.arange(11), torch.arange(13), indexing="ij")
        near = ((rows - r).abs() <= half) & ((cols - c).abs() <= half)
        assert not (changed & ~near).any()
        if (r, c) == (5, 6):  # interior: the whole 7 x 7 neighbourhood responds, centred on (r, c)
            assert (changed == near).all()
        assert changed[r, c]


def test_ats_model_parts_and_frozen_features() -> None:
    model = ATSModel(n_classes=3, feature_dim=16, freeze_features=True)
    assert model.classifier.in_features == 16 and model.classifier.out_features == 3
    assert not any(p.requires_grad for p in model.feature_net.parameters())
    assert all(p.requires_grad for p in model.attention_net.parameters())
    model.train()
    assert model.training and model.attention_net.training and not model.feature_net.training


# --- loading weights --------------------------------------------------------------------------------------------


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_weights_from_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = SmallCNN(width=8)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = SmallCNN(width=8)
    assert not _same(src, dst)
    load_weights(dst, path)
    assert _same(src, dst)
    # through the registry: the backbone of the L2-normalised wrapper gets them
    net = create_feature_net("small-cnn", width=8, weights=path)
    assert _same(src, net.backbone)


@pytest.mark.parametrize("nested", [False, True])
def test_load_weights_from_a_weights_only_torch_file(tmp_path: Path, nested: bool) -> None:
    torch.manual_seed(2)
    src = SmallCNN(width=8)
    path = tmp_path / "w.pt"
    state = src.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if nested else state, path)
    dst = SmallCNN(width=8)
    load_weights(dst, path)
    assert _same(src, dst)


def test_load_weights_ignores_a_classifier_head(tmp_path: Path) -> None:
    """Backbones are built without their head (num_classes=0): 'fc.' keys of a full checkpoint are dropped."""
    src = SmallCNN(width=8)
    state = dict(src.state_dict(), **{"fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)})
    torch.save(state, tmp_path / "w.pth")
    dst = SmallCNN(width=8)
    load_weights(dst, tmp_path / "w.pth")
    assert _same(src, dst)


def test_load_weights_mismatch_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'nope.pt'}: weights file not found")):
        load_weights(SmallCNN(), tmp_path / "nope.pt")
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError) as info:
        load_weights(SmallCNN(), tmp_path / "other.safetensors")
    assert str(info.value) == (f"{tmp_path / 'other.safetensors'}: weights do not match the feature net: "
                               "8 missing (net.0.weight, net.0.bias, net.2.weight, ...); 1 unexpected (other.weight)")
    # same names, other shapes (a width-16 net's weights for a width-32 net)
    w16 = {k: v.contiguous() for k, v in SmallCNN(width=16).state_dict().items()}
    save_file(w16, str(tmp_path / "w16.safetensors"))
    with pytest.raises(ModelError) as info:
        load_weights(SmallCNN(width=32), tmp_path / "w16.safetensors")
    assert str(info.value) == (
        f"{tmp_path / 'w16.safetensors'}: weights do not match the feature net: 4 mis-shaped "
        "(net.4.weight (file 16x32x3x3, net 32x32x3x3), net.4.bias (file 16, net 32), "
        "net.6.weight (file 16x16x3x3, net 32x32x3x3), ...)")
    assert "\n" not in str(info.value)
    state = SmallCNN(width=8).state_dict()
    torch.save({**state, "net.0.bias": 3}, tmp_path / "int.pt")
    with pytest.raises(ModelError, match=r"int\.pt: weights do not match the feature net: 1 mis-shaped "
                                         r"\(net\.0\.bias \(a int, not a tensor\)\)$"):
        load_weights(SmallCNN(width=8), tmp_path / "int.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list\.pt: expected a state dict of tensors"):
        load_weights(SmallCNN(), tmp_path / "list.pt")


def test_load_weights_under_a_prefix(tmp_path: Path) -> None:
    """A backbone inside a larger checkpoint (CONCH's image trunk under visual.trunk.) loads with prefix=."""
    torch.manual_seed(4)
    src = SmallCNN(width=8)
    state = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    state["text.proj"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "big.pth")
    dst = SmallCNN(width=8)
    load_weights(dst, tmp_path / "big.pth", prefix="visual.trunk.")
    assert _same(src, dst)
    with pytest.raises(ModelError, match=r"weights do not match the feature net under the prefix 'visual\.tower\.': "
                                         r"8 missing"):
        load_weights(dst, tmp_path / "big.pth", prefix="visual.tower.")


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do (with os.system, say)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_load_weights_never_runs_pickled_code(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({**SmallCNN(width=8).state_dict(), "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ModelError) as info:
        load_weights(SmallCNN(width=8), path)
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith(f"{path}: not a loadable weights file (UnpicklingError: ")
    assert message.endswith("only safetensors and weights-only torch files are accepted")
    # the payload is real: a plain (unsafe) torch.load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a weights file at all", b"\x00" * 64])
def test_load_weights_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    for name in ("g.safetensors", "g.pt"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelError, match=rf"{re.escape(str(tmp_path / name))}: not a loadable weights file"):
            load_weights(SmallCNN(), tmp_path / name)


# --- model folders (wsiats.checkpoint) ----------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(classes=["benign", "tumour"], feature_dim=8)
    cfg.save(run / "config.yaml")
    torch.manual_seed(3)
    save_weights(build_model(cfg), run / MODEL_FILE)
    return run


def test_load_model_round_trip(run_dir: Path) -> None:
    model, cfg = load_model(run_dir)
    assert cfg.classes == ["benign", "tumour"] and not model.training
    torch.manual_seed(3)
    assert _same(model, build_model(cfg))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "header"])
def test_load_model_refuses_a_corrupt_safetensors(run_dir: Path, damage: str) -> None:
    path = run_dir / MODEL_FILE
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a header length far past the end of the file
        path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: corrupt or not a safetensors file"):
        load_model(run_dir)


def test_load_model_refuses_weights_of_another_shape(run_dir: Path) -> None:
    save_weights(ATSModel(n_classes=2, feature_dim=16), run_dir / MODEL_FILE)
    path = re.escape(str(run_dir / MODEL_FILE))
    with pytest.raises(CheckpointError, match=rf"{path}: weights do not match config\.yaml"):
        load_model(run_dir)
    (run_dir / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="model weights not found"):
        load_model(run_dir)


def test_attention_map_in_bands_equals_one_shot() -> None:
    """Inference computes the map in row bands (bounded memory); it must equal the full map."""
    from wsiats.models import AttentionNet

    torch.manual_seed(0)
    net = AttentionNet()
    net.band_rows = 16
    view = torch.randint(0, 255, (1, 3, 70, 53), dtype=torch.uint8)
    net.band_rows = 70
    full = net(view).detach()  # one band: the whole view at once
    net.band_rows = 16
    with torch.no_grad():
        banded = net(view)
    torch.testing.assert_close(banded, full, rtol=0, atol=1e-5)


def test_training_in_checkpointed_bands_gives_the_one_shot_gradients() -> None:
    """With gradients, bands are checkpointed (activations recomputed in backward): the logits and
    every parameter gradient must equal the one-shot computation, and autograd must hold far less."""
    from wsiats.models import AttentionNet

    torch.manual_seed(0)
    net = AttentionNet()
    net.checkpoint_cells = 0  # small views are computed in one shot: make this one count as large
    view = torch.randint(0, 255, (1, 3, 130, 53), dtype=torch.uint8)
    weights = torch.randn(130 * 53)

    def run(band_rows: int) -> tuple[Tensor, list[Tensor], int]:
        net.band_rows = band_rows
        net.zero_grad()
        saved: list[int] = []

        def pack(t: Tensor) -> Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(view)
        (torch.softmax(logits, -1)[0] * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in net.parameters()], sum(saved)

    full, full_grads, full_bytes = run(130)
    banded, banded_grads, banded_bytes = run(16)
    torch.testing.assert_close(banded, full, rtol=0, atol=1e-5)
    for g, ref in zip(banded_grads, full_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    assert banded_bytes < full_bytes / 4, (banded_bytes, full_bytes)


def test_tanh_is_torch_tanh_with_and_without_gradient() -> None:
    """`Tanh` (2 sigmoid(2x) - 1) is torch.tanh to float rounding, values and gradients; without gradient it
    works in place."""
    x = torch.linspace(-12, 12, 4001)
    with torch.no_grad():
        y = Tanh()(x.clone())
    torch.testing.assert_close(y, torch.tanh(x), atol=3e-7, rtol=0)
    xg = x.clone().requires_grad_()
    Tanh()(xg).pow(2).sum().backward()
    xr = x.clone().requires_grad_()
    torch.tanh(xr).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-6, rtol=0)
    buf = x.clone()
    with torch.no_grad():
        out = Tanh()(buf)
    assert out.data_ptr() == buf.data_ptr()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_normalized_channels_last_is_normalize_images(dtype: torch.dtype) -> None:
    """The attention network's input (`_normalized_nhwc`: cast, scale and shift in one channels-last buffer) is
    `normalize_images` to float rounding."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 17, 23), generator=gen, dtype=torch.uint8)
    if dtype != torch.uint8:
        images = (images.to(dtype) / 255)
    out = _normalized_nhwc(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalize_images(images).float(), atol=2e-6, rtol=0)
