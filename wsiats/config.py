"""Run configuration: one typed dataclass, read from and written to YAML.

`wsiats train` resolves defaults < `--config FILE` < command-line flags into a `Config`, checks
it, and writes it to `RUN/config.yaml`; `predict` and `heatmap` read it back from there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsiats._io import atomic_open
from wsiats.errors import ConfigError

#: Bumped when the meaning of a saved run changes; older runs are refused with a clear error.
CONFIG_VERSION = 1


@dataclass
class Config:
    """Everything that defines a run. Field docstrings are the CLI help texts."""

    # --- the low-resolution view and the patches
    view_downsample: float = 32.0
    """Level-0 pixels per pixel of the low-resolution view the attention network sees."""
    view_mpp: float | None = None
    """Microns per pixel of the view (overrides view_downsample; needs slide mpp)."""
    patch_size: int = 64
    """Side of each full-resolution patch, in pixels of the patch magnification."""
    patch_downsample: float = 1.0
    """Level-0 pixels per patch pixel (1 = read at level 0)."""
    patch_mpp: float | None = None
    """Microns per pixel of the patches (overrides patch_downsample; needs slide mpp)."""
    n_patches: int = 10
    """Patches sampled per slide (N)."""
    replace: bool = False
    """Sample with replacement (default: without, Gumbel top-k)."""
    tissue_mask: bool = True
    """Sample only inside the tissue mask of the view."""

    # --- the networks
    attention: str = "learned"
    """'learned' (attention network) or 'uniform' (the paper's U-N baseline)."""
    feature_net: str = "small-cnn"
    """Feature network name (see `wsiats.models.list_feature_nets`)."""
    feature_weights: str | None = None
    """Local weights for the feature network (.safetensors, or a weights-only torch file)."""
    feature_dim: int = 32
    """Width of the small CNN feature network."""
    feature_net_args: dict[str, Any] = field(default_factory=dict)
    """timm.create_model arguments over the feature net's recipe (config file only), e.g. {img_size: 448}."""
    freeze_features: bool = False
    """Keep the feature network fixed (eval mode, no gradient); train attention and classifier only."""
    feature_cache_mb: int = 512
    """With --freeze-features, memory for embeddings of patches already seen (MB, per process); 0: off."""
    attention_eps: float = 1e-4
    """Attention smoothing: a = (1-eps) softmax + eps/K (official SampleSoftmax, speed-limits value)."""
    entropy_weight: float = 1e-4
    """Weight of the attention-entropy bonus in the loss (official scripts: 1e-4)."""

    # --- optimisation
    epochs: int = 30
    """Training epochs."""
    batch_size: int = 8
    """Slides per optimisation step."""
    lr: float = 1e-3
    """AdamW learning rate (official: Adam 1e-3)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    clip_norm: float = 1.0
    """Gradient clipping norm (official clipnorm 1)."""
    warmup_epochs: int = 1
    """Linear learning-rate warm-up before the cosine decay."""
    val_fraction: float = 0.2
    """Fraction of training slides held out for validation when the labels have no split column."""
    class_weighting: bool = True
    """Weight the loss by inverse class frequency."""
    augment: bool = True
    """Flips, brightness and contrast on views and patches."""
    seed: int = 0
    """Random seed for splits, sampling and augmentation."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    amp: bool = True
    """Mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU."""
    workers: int = 2
    """DataLoader worker processes loading views, and threads reading patches."""
    view_cache_mb: int = 1024
    """Memory for prepared views kept between epochs, per loader process (MB); least recently used out."""
    view_cache: str | None = None
    """Folder where prepared views are also stored as files (re-read instead of decoding the slide)."""

    # --- bookkeeping, filled by `train`
    classes: list[str] = field(default_factory=list)
    """Class names in label order (set by `train`)."""
    version: int = CONFIG_VERSION
    """Configuration format version."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the option when a value is out of range."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} (flag {flag}) {what}, got {getattr(self, name)!r}")

        for name in ("view_downsample", "patch_downsample", "lr"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be a positive number")
        for name in ("view_mpp", "patch_mpp"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and value > 0), name, "must be a positive number")
        for name in ("patch_size", "n_patches", "feature_dim", "epochs", "batch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be an integer >= 1")
        need(self.patch_size <= 4096, "patch_size", "must be at most 4096")
        need(isinstance(self.workers, int) and self.workers >= 0, "workers", "must be an integer >= 0")
        need(isinstance(self.view_cache_mb, int) and not isinstance(self.view_cache_mb, bool) and self.view_cache_mb >= 0,
             "view_cache_mb", "must be an integer >= 0")
        need(isinstance(self.feature_cache_mb, int) and not isinstance(self.feature_cache_mb, bool)
             and self.feature_cache_mb >= 0, "feature_cache_mb", "must be an integer >= 0")
        need(isinstance(self.feature_net_args, dict) and all(isinstance(k, str) for k in self.feature_net_args),
             "feature_net_args", "must be a mapping of timm argument names to values")
        need(isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0, "warmup_epochs", "must be an integer >= 0")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(0 <= self.attention_eps < 1, "attention_eps", "must be in [0, 1)")
        need(self.entropy_weight >= 0, "entropy_weight", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.clip_norm > 0, "clip_norm", "must be > 0")
        need(self.attention in ("learned", "uniform"), "attention", "must be 'learned' or 'uniform'")
        from wsiats.models import list_feature_nets

        valid = list_feature_nets()
        need(
            self.feature_net in valid or self.feature_net.startswith(("timm:", "hf-hub:")),
            "feature_net",
            f"must be one of {', '.join(valid)}, timm:<model name> or hf-hub:<repo>",
        )
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be auto, cpu, cuda or cuda:N",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        with atomic_open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def field_help(name: str) -> str:
    """The docstring of a Config field (used as CLI help)."""
    import ast
    import inspect

    source = inspect.getsource(Config)
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                return str(nxt.value.value)
    return ""


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a value read from YAML against the field's type; no silent conversions."""
    default = _FIELDS[name].default
    annotation = str(_FIELDS[name].type)
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{source}: {name} must not be empty")
    if annotation.startswith("dict"):  # before the scalar checks: "dict[str, Any]" contains "str"
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        raise ConfigError(f"{source}: {name} must be a mapping (key: value), got {value!r}")
    if "float" in annotation and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if "int" in annotation and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "bool" in annotation and isinstance(value, bool):
        return value
    if "str" in annotation and isinstance(value, str):
        return value
    if "list" in annotation and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    kind = annotation.replace(" | None", "")
    raise ConfigError(f"{source}: {name} must be {kind}, got {value!r} (default {default!r})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML into a checked dict of overrides (unknown keys are errors)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({type(exc).__name__})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(_FIELDS)}")
    return {k: _coerce(k, v, str(path)) for k, v in raw.items()}


def resolve(*, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults < config file < overrides (flags that were given, None meaning 'not given')."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_yaml(config_file))
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown option {key}")
        if value is not None:
            values[key] = value
    values.pop("version", None)
    try:
        return Config(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def load_run_config(run_dir: str | Path) -> Config:
    """Read `RUN/config.yaml` written by `train`, refusing other versions."""
    from wsiats.errors import CheckpointError

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a wsiats run folder (no config.yaml); pass the --out folder of `wsiats train`")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise CheckpointError(f"{path}: config is not valid YAML") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: config is not a mapping")
    version = raw.get("version")
    if version != CONFIG_VERSION:
        raise CheckpointError(
            f"{path}: config version {version!r} is not supported by this wsiats (expects {CONFIG_VERSION}); "
            "retrain, or use the wsiats release that wrote it"
        )
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        values = {k: _coerce(k, v, str(path)) for k, v in raw.items()}
        cfg = Config(**values)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if len(cfg.classes) < 2:
        raise CheckpointError(f"{path}: no class names recorded; the run did not finish setting up")
    return cfg
