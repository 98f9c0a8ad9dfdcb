"""The training loss of an attention-sampling pass, and the class weights it may use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsiats import mil
from wsiats.config import Config
from wsiats.errors import ConfigError
from wsiats.forward import ForwardResult


def class_weights(labels: Sequence[int], n_classes: int) -> Tensor:
    """Inverse-frequency class weights, normalised to mean 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise ConfigError("every class needs at least one training slide for class weighting")
    weights = counts.sum() / (n_classes * counts)
    return torch.tensor(weights, dtype=torch.float32)


def loss_fn(result: ForwardResult, targets: Tensor, *, cfg: Config, weight: Tensor | None,
            classifier: torch.nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy - entropy_weight * attention entropy (+ distill_weight * distillation, + instance_weight *
    `mil.instance_loss` of each slide's patches through `classifier` when the pass returned their features).
    Returns (loss, ce)."""
    ce = F.cross_entropy(result.logits, targets, weight=weight)
    loss = ce - cfg.entropy_weight * result.entropy.mean()
    if result.distill is not None:
        loss = loss + cfg.distill_weight * result.distill.mean()
    if classifier is not None and result.features and cfg.instance_weight > 0:
        inst = torch.stack([mil.instance_loss(classifier(f), int(t), weight=weight)
                            for f, t in zip(result.features, targets.tolist())])
        loss = loss + cfg.instance_weight * inst.mean()
    return loss, ce
