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

#: Candidate patches per training slide with gated pooling (see `Config.candidates`).
DEFAULT_CANDIDATES = 256

#: Bumped when the meaning of a saved run changes; older runs are refused with a clear error.
CONFIG_VERSION = 1

#: Largest accepted values of the options that size memory. feature_dim is the small CNN's width:
#: its width x width 3x3 convolution holds 9 * 4 * width^2 bytes (2048: 151 MB; 100000 would be 360 GB).
#: workers are processes that each hold their own view cache.
_MAX = {"patch_size": 4096, "n_patches": 10_000, "feature_dim": 2048, "batch_size": 1024, "workers": 64}
#: Patch pixels one training step reads and embeds (batch_size x n_patches x patch_size^2): 2^28 is
#: 768 MiB of uint8 patches before the feature network's activations (defaults: 327,680).
MAX_STEP_PIXELS = 1 << 28
#: Most classes a run may have (the classifier is feature width x classes).
MAX_CLASSES = 10_000
#: Largest seed: torch and numpy take any integer from 0 to 2^64 - 1; int64 keeps it portable.
SEED_MAX = 2**63 - 1


@dataclass
class ViewConfig:
    """The low-resolution view the attention network sees, and the patches read at full resolution."""

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
    tissue_mask: bool = True
    """Sample only inside the tissue mask of the view."""


@dataclass
class SamplingConfig:
    """Which patches are read: how many, and how training chooses among candidates."""

    n_patches: int = 32
    """Patches read per slide at inference (N)."""
    replace: bool = False
    """Sample with replacement (default: without, Gumbel top-k)."""
    candidates: int | None = None
    """Training with --pooling gated: candidate patches per slide, drawn from the attention mixed with uniform, embedded without gradient; the N with the highest instance scores get the gradient pass (0: the N patches sampled from the attention; default 256 with gated pooling, 0 with ats)."""
    zoom: float = 0.625
    """With --pooling gated: share of the N patches drawn around the most telling patch of the others (0: all N from the attention)."""
    train_patches: int = 64
    """Training with candidates: how many of them get the gradient pass, highest instance scores first."""
    explore: float = 0.5
    """Training with candidates: share of the candidate distribution that explores (equal mass per colour group of the view) instead of following the attention."""
    select_random: float = 0.5
    """Training with candidates: share of the gradient pass's patches drawn at random from the other candidates instead of by instance score (0: the top train_patches, IPS; 0.5, the default: Megapixel MNIST left chance 7 epochs sooner, 0.730 test error against 0.865, with the needle and 12k cohorts unchanged)."""
    nested: bool = False
    """Nested attention sampling: a coarse attention over a --coarse-downsample view picks --regions regions, the attention network over the --view-downsample view inside them picks the N patches; only the picked regions' fine pixels are read (with gated pooling: candidates in training and --zoom inside the best patch's region)."""
    coarse_downsample: float = 256.0
    """With --nested: level-0 pixels per pixel of the coarse view; each pixel is a region of (coarse_downsample / view_downsample)^2 fine cells."""
    regions: int = 8
    """With --nested: regions picked per slide (M); with --pooling ats the N patches are split over them, with gated pooling 4M regions are read and the patches go to the best of their cells."""


@dataclass
class ModelConfig:
    """The networks: attention, feature network, pooling."""

    attention: str = "learned"
    """'learned' (attention network) or 'uniform' (the paper's U-N baseline)."""
    feature_net: str = "small-cnn"
    """Feature network: a registered name, timm:<model name> or hf-hub:<repo>."""
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
    pooling: str = "gated"
    """'gated' (gated attention MIL over the N patches: one telling patch can decide) or 'ats' (the paper's estimator of sum_i a_i f_i)."""
    feature_norm: str = "l2"
    """'l2' (unit-norm features, the paper's model: sampling from a is then the minimum-variance choice for the ats estimator) or 'none' (the feature network's output as it is: a small CNN from scratch learned simulated Megapixel MNIST bags only so, but on the project's cohorts fewer sampled patches landed in the informative regions); default 'l2'."""


@dataclass
class TrainingConfig:
    """Optimisation, the loss, the data split."""

    epochs: int = 30
    """Training epochs."""
    batch_size: int = 4
    """Slides per optimisation step."""
    lr: float = 1e-3
    """AdamW learning rate of the feature network (official: Adam 1e-3; a pretrained backbone wants 1e-4 or --freeze-features)."""
    head_lr_scale: float = 3.0
    """Learning rate of the attention network, MIL head and classifier, as a multiple of --lr (3: a needle cohort's attention finds its regions in half the epochs)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    clip_norm: float = 1.0
    """Gradient clipping norm (official clipnorm 1)."""
    warmup_epochs: int = 1
    """Linear learning-rate warm-up before the cosine decay."""
    entropy_weight: float = 1e-4
    """Weight of the attention-entropy bonus in the loss (official scripts: 1e-4)."""
    distill_weight: float = 1.0
    """Training: weight of the view-attention target taken from the candidates' instance scores."""
    instance_weight: float = 0.0
    """Training with gated pooling: weight of the instance loss, the slide's label on the 2 patches of each slide that the classifier finds most telling of it (top-k MIL; 0, the default: off)."""
    val_fraction: float = 0.2
    """Fraction of training slides held out for validation when the labels have no split column."""
    class_weighting: bool = True
    """Weight the loss by inverse class frequency."""
    augment: bool = True
    """Flips, brightness and contrast on views and patches."""
    seed: int = 0
    """Random seed for splits, sampling and augmentation."""


@dataclass
class Runtime:
    """Machine settings: how this machine runs a job, not a property of the model. A run's config.yaml records
    those it was trained with (`train --resume` keeps them unless given others); a trained model never passes
    them on: `load_model` gives its config with these defaults, and predict/heatmap take their own."""

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


#: The parts of a Config, in the order of its fields (and of the CLI options).
PARTS: tuple[type, ...] = (ViewConfig, SamplingConfig, ModelConfig, TrainingConfig, Runtime)


@dataclass
class Config(Runtime, TrainingConfig, ModelConfig, SamplingConfig, ViewConfig):
    """Everything that defines a run, flat (`cfg.n_patches`), made of the typed parts in PARTS (dataclass
    fields come base class last first, hence the reversed list). Field docstrings are the CLI help texts."""

    # --- bookkeeping, filled by `train`
    classes: list[str] = field(default_factory=list)
    """Class names in label order (set by `train`)."""
    train_mpp: float | None = None
    """Median level-0 microns per pixel of the training slides (set by `train`; None when unknown)."""
    version: int = CONFIG_VERSION
    """Configuration format version."""

    def __post_init__(self) -> None:
        if self.candidates is None:
            self.candidates = DEFAULT_CANDIDATES if self.pooling == "gated" else 0
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the option when a value is out of range."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} (flag {flag}) {what}, got {getattr(self, name)!r}")

        for name in ("view_downsample", "patch_downsample", "lr", "head_lr_scale"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be a positive number")
        for name in ("view_mpp", "patch_mpp"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and value > 0), name, "must be a positive number")
        for name in ("patch_size", "n_patches", "feature_dim", "epochs", "batch_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be an integer >= 1")
        need(isinstance(self.workers, int) and self.workers >= 0, "workers", "must be an integer >= 0")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= SEED_MAX, "seed",
             f"must be an integer from 0 to {SEED_MAX}")
        # Upper bounds on what sizes memory, checked before any network is built or any slide read.
        for name, most in _MAX.items():
            need(getattr(self, name) <= most, name, f"must be at most {most}")
        step = self.batch_size * self.n_patches * self.patch_size**2
        need(step <= MAX_STEP_PIXELS, "n_patches",
             f"times batch_size times patch_size^2 is {step} patch pixels a step, over the limit of {MAX_STEP_PIXELS}")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) > MAX_CLASSES:
            raise ConfigError(f"classes must be at most {MAX_CLASSES} distinct names, got {self.classes!r}"[:300])
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
        need(self.pooling in ("gated", "ats"), "pooling", "must be 'gated' or 'ats'")
        need(self.feature_norm in ("l2", "none"), "feature_norm", "must be 'l2' or 'none'")
        need(isinstance(self.candidates, int) and not isinstance(self.candidates, bool) and 0 <= self.candidates <= 65536,
             "candidates", "must be an integer in 0..65536")
        need(self.pooling == "gated" or self.candidates == 0, "candidates",
             "needs --pooling gated (the ats estimator trains on the N sampled patches); pass --candidates 0")
        need(isinstance(self.zoom, (int, float)) and 0 <= self.zoom < 1, "zoom", "must be in [0, 1)")
        need(isinstance(self.train_patches, int) and not isinstance(self.train_patches, bool) and 1 <= self.train_patches <= 4096,
             "train_patches", "must be an integer in 1..4096")
        need(isinstance(self.explore, (int, float)) and 0 <= self.explore <= 1, "explore", "must be in [0, 1]")
        need(isinstance(self.select_random, (int, float)) and not isinstance(self.select_random, bool)
             and 0 <= self.select_random <= 1, "select_random", "must be in [0, 1]")
        need(isinstance(self.distill_weight, (int, float)) and self.distill_weight >= 0, "distill_weight", "must be >= 0")
        need(isinstance(self.instance_weight, (int, float)) and not isinstance(self.instance_weight, bool)
             and self.instance_weight >= 0, "instance_weight", "must be >= 0")
        self._check_nested(need)
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

    def _check_nested(self, need: Any) -> None:
        """The options of nested attention sampling (`wsiats.nested`)."""
        need(isinstance(self.regions, int) and not isinstance(self.regions, bool) and 1 <= self.regions <= 4096,
             "regions", "must be an integer in 1..4096")
        need(isinstance(self.coarse_downsample, (int, float)) and math.isfinite(self.coarse_downsample)
             and self.coarse_downsample > 0, "coarse_downsample", "must be a positive number")
        if not self.nested:
            return
        need(self.view_mpp is None, "view_mpp", "cannot be used with --nested; set --view-downsample")
        ratio = self.coarse_downsample / self.view_downsample
        need(ratio >= 2 and abs(ratio - round(ratio)) < 1e-9, "coarse_downsample",
             f"must be an integer multiple (>= 2) of view_downsample ({self.view_downsample:g}) with --nested")
        need(self.pooling != "ats" or self.regions <= self.n_patches, "regions",
             f"must be at most n_patches ({self.n_patches}) with --pooling ats: one patch a region at least")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        with atomic_open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)

    def without_runtime(self) -> Config:
        """This config with the Runtime part at its defaults: what a trained model passes on."""
        return dataclasses.replace(self, **dataclasses.asdict(Runtime()))


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
#: Fields `train` fills in and records in RUN/config.yaml: facts about the run, not options.
RUN_FIELDS = ("classes", "train_mpp", "version")


#: Options that `train --resume` takes from the command line (or --config): how the run goes on (the training
#: part but the split: seed and val_fraction) and on which machine (Runtime, and the memory of the feature cache).
#: Every other option defines the model or what it is shown, and stays as saved.
RESUME_MAY_CHANGE = (*(f.name for f in dataclasses.fields(TrainingConfig) if f.name not in ("seed", "val_fraction")),
                     *(f.name for f in dataclasses.fields(Runtime)), "feature_cache_mb")


def flag_of(name: str) -> str:
    """The command-line flag of a Config field (`n_patches` -> `--n-patches`)."""
    return "--" + name.replace("_", "-")


def resume_config(saved: Config, given: dict[str, Any]) -> tuple[Config, list[str]]:
    """The configuration a resumed run goes on with, and what it took from `given` ("--epochs 40 (was 30)").

    `saved` is the run's own (RUN/config.yaml); `given` maps option names to the values the user passed (None:
    not passed). Options of RESUME_MAY_CHANGE are taken; any other one that differs from the run's value is a
    ConfigError naming them all, since it would change the model the saved weights and optimizer belong to.
    """
    changed = {k: v for k, v in given.items()
               if v is not None and k not in RUN_FIELDS and k in _FIELDS and getattr(saved, k) != v}
    fixed = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if fixed:
        listing = ", ".join(f"{flag_of(k)} {changed[k]!r} (the run has {getattr(saved, k)!r})" for k in fixed)
        raise ConfigError(f"{listing}: would change the model of the run being resumed; resume without "
                          f"{'it' if len(fixed) == 1 else 'them'}, or train a new run into another --out")
    cfg = dataclasses.replace(saved, **changed)
    return cfg, [f"{flag_of(k)} {v} (was {getattr(saved, k)})" for k, v in changed.items()]


def field_help(name: str) -> str:
    """The docstring of a Config field (used as CLI help), from the part that declares it."""
    import ast
    import inspect

    for part in (Config, *PARTS):
        body = ast.parse(inspect.getsource(part)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    return str(nxt.value.value)
    return ""


def _number(text: str) -> float:
    """A float as people write it (3e-3, 1E4, 1_000), NaN when the text is not one."""
    try:
        return float(text)
    except ValueError:
        return math.nan


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
    if "float" in annotation and isinstance(value, str) and math.isfinite(number := _number(value)):
        return number  # PyYAML (YAML 1.1) reads 3e-3 and 1e4, without a dot, as strings
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


def _unknown_keys(raw: dict[Any, Any]) -> str:
    """The keys of `raw` that are not Config fields, as text ('' when none); YAML keys may be numbers."""
    return ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in raw if k not in _FIELDS))


def read_mapping(path: str | Path) -> dict[Any, Any]:
    """The option: value mapping of a YAML config file (empty for an empty file); ConfigError names the file."""
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
    return raw


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML into a checked dict of overrides (unknown keys are errors)."""
    path = Path(path)
    raw = read_mapping(path)
    unknown = _unknown_keys(raw)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(_FIELDS)}")
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


#: What a run's config.yaml that predates these keys meant by their absence.
_BEFORE_POOLING = {"pooling": "ats", "candidates": 0, "zoom": 0.0}


def config_from_mapping(raw: dict[Any, Any], source: str) -> Config:
    """The Config of a run's saved mapping (`RUN/config.yaml`), refusing other versions and unknown keys;
    ConfigError names `source`."""
    version = raw.get("version")
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"{source}: config version {version!r} is not supported by this wsiats (expects {CONFIG_VERSION}); "
            "retrain, or use the wsiats release that wrote it"
        )
    unknown = _unknown_keys(raw)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}")
    raw = {**_BEFORE_POOLING, **raw}  # runs written before pooling existed used the ats estimator
    raw = {"feature_norm": "l2", **raw}  # and runs written before feature_norm, unit-norm features
    return Config(**{k: _coerce(k, v, source) for k, v in raw.items()})
