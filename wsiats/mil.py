"""Instance-level pooling and exploration for sparse evidence: pure torch, no I/O.

Attention sampling's estimator is a mean over N patches drawn from the view attention. When the
evidence is a needle (a few tumour regions, a fraction of a percent of the tissue, whose decoys
look the same in the low-resolution view), the view attention gets no useful gradient before the
features discriminate, and a lone informative patch is diluted among N. This module holds the
pieces of the training procedure that finds needles (see `wsiats.forward.forward_batch`,
mode 'explore'):

- `GatedAttentionPool`: gated attention MIL pooling (Ilse et al., ICML 2018) over the features
  of the patches a slide was given: z = sum_k alpha_k f_k, alpha = softmax(w^T (tanh(V f) *
  sigmoid(U f))). One tumour patch can take almost all of alpha, so it dominates the slide's
  representation instead of counting 1/N. Its logits `score(f)` are the instance scores.
- `appearance_strata`, `stratified_uniform` and `exploration_prior`: the view's tissue cells grouped
  by colour (k-means on the view pixels), and the distribution that gives every group the same
  mass, spread evenly inside it: a rare-looking kind of tissue (a few aggregates among stroma) is explored as often
  as the common kinds, whatever its area.
- `exploration_mixture`: the candidate distribution q = (1 - rho) a + rho u, u uniform over the
  tissue or stratified: every tissue cell keeps a probability of being a candidate that does not
  depend on what the attention has learnt.
- `distinct_patches`: the candidates whose pixels differ from every earlier one's. Identical patches
  (empty background where no tissue mask applies, the padding past a slide's edge) have identical
  features and scores, so they teach nothing beyond the first; they are embedded and passed once.
- `select_informative`: the N candidates with the highest instance scores (IPS, Bergner et al.,
  ICLR 2023, over ATS's candidates instead of every patch of the slide); `select_for_gradient`:
  those for part of the gradient pass, the rest drawn at random from the other candidates.
- `instance_loss`: top-k MIL (Campanella et al., Nat. Med. 2019, here over the patches a slide was
  given): the slide's label on the patches the classifier finds most telling of it, so that one
  digit or tumour patch is taught its class directly instead of through a pooled mean.
- `distillation_loss`: the view attention's target: the candidates with the highest instance
  scores, so the attention network learns where to look from what the feature network found.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GatedAttentionPool",
    "appearance_strata",
    "distillation_loss",
    "distinct_patches",
    "exploration_mixture",
    "instance_loss",
    "select_for_gradient",
    "select_informative",
    "exploration_prior",
    "stratified_uniform",
]


class GatedAttentionPool(nn.Module):
    """Gated attention MIL pooling: features [n, D] -> (pooled [D], weights alpha [n])."""

    def __init__(self, dim: int, *, hidden: int = 64) -> None:
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def score(self, features: Tensor) -> Tensor:
        """Instance scores (attention logits) of features [..., n, D] -> [..., n]."""
        h = torch.tanh(self.value(features)) * torch.sigmoid(self.gate(features))
        return self.out(h).squeeze(-1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features [n, D] -> (sum_k alpha_k f_k [D], alpha [n]); alpha sums to 1."""
        if features.ndim != 2 or features.shape[0] < 1:
            raise ValueError(f"features must have shape [n >= 1, D], got {tuple(features.shape)}")
        alpha = torch.softmax(self.score(features).float(), dim=0)
        return alpha @ features.float(), alpha


def appearance_strata(image: np.ndarray, mask: np.ndarray, *, k: int = 8, iterations: int = 8) -> np.ndarray:
    """Group the allowed pixels of a view by colour: labels (h, w) int16, -1 off the mask.

    Lloyd's k-means on RGB, initialised deterministically at k luminance quantiles of the allowed
    pixels (so the same view always gives the same groups); empty groups disappear. At most
    2**14 pixels take part in the fit (an even subsample); every allowed pixel gets its nearest centre.
    """
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"image must be (h, w, 3) and mask (h, w), got {image.shape} and {mask.shape}")
    labels = np.full(mask.shape, -1, np.int16)
    pixels = image[mask].astype(np.float32)
    if len(pixels) == 0:
        return labels
    fit = pixels[:: max(1, len(pixels) // 16384)]
    luminance = fit @ np.array([0.299, 0.587, 0.114], np.float32)
    order = np.argsort(luminance, kind="stable")
    centres = fit[order[((np.arange(k) + 0.5) * len(fit) / k).astype(np.int64)]]
    for _ in range(iterations):
        near = _nearest(fit, centres)
        counts = np.bincount(near, minlength=k)
        sums = np.stack([np.bincount(near, weights=fit[:, c], minlength=k) for c in range(3)], axis=1)
        filled = counts > 0
        centres[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    labels[mask] = _nearest(pixels, centres)
    return labels


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean) of each row of x."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.argmin(d, axis=1).astype(np.int16)


def stratified_uniform(strata: np.ndarray) -> np.ndarray:
    """Labels (any shape, -1 = not allowed) -> float32 probabilities of the same shape: each present
    label gets equal mass, spread uniformly over its cells; all zero when no cell is allowed."""
    out = np.zeros(strata.shape, np.float32)
    allowed = strata >= 0
    if not allowed.any():
        return out
    labels = strata[allowed].astype(np.int64)
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    out[allowed] = 1.0 / (present * counts[labels])
    return out


def exploration_prior(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(h, w) float32 distribution over the allowed view cells: equal mass per colour group."""
    return stratified_uniform(appearance_strata(image, mask))


def exploration_mixture(attention: Tensor, mask: Tensor, rho: float, *, explore: Tensor | None = None) -> Tensor:
    """q = (1 - rho) a + rho u for attention [B, K] (rows sum to 1, zero off the mask) and mask [B, K].

    u is `explore` ([B, K], rows summing to 1 and zero off the mask, e.g. `stratified_uniform`) or,
    when None, uniform over each row's allowed cells; q is zero exactly where a is and sums to 1.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if attention.shape != mask.shape or attention.ndim != 2:
        raise ValueError(f"attention {tuple(attention.shape)} and mask {tuple(mask.shape)} must both be [B, K]")
    if explore is None:
        m = mask.to(attention.dtype)
        explore = m / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
    elif explore.shape != attention.shape:
        raise ValueError(f"explore {tuple(explore.shape)} must have the attention's shape {tuple(attention.shape)}")
    return (1.0 - rho) * attention + rho * explore.to(attention.dtype)


def select_for_gradient(scores: Tensor, n: int, random_share: float, *,
                        generator: torch.Generator | None = None) -> Tensor:
    """Positions [min(n, M)] of the candidates that get the gradient pass: the n - round(random_share n)
    highest instance scores [M] (highest first), then round(random_share n) drawn uniformly without
    replacement from the other candidates.

    By score alone the choice at the start of training is arbitrary but the same on every slide: one
    untrained network put 46 of its 64 gradient patches on empty (black) Megapixel MNIST candidates,
    identical patches that teach nothing, and 0.7 on digits of the label (mean over 12 slides); another
    initialisation put 4 on empty ones (`distinct_patches` now passes identical patches once). The
    random share keeps what the candidates hold in the pass whatever the scores do; random_share 0 is
    `select_informative` (IPS)."""
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    m = scores.shape[0]
    n = min(n, m)
    k_random = int(round(random_share * n))
    top = select_informative(scores, n - k_random)
    if k_random == 0:
        return top
    rest = torch.ones(m, dtype=torch.bool, device=scores.device)
    rest[top] = False
    others = torch.nonzero(rest).squeeze(1)
    pick = torch.randperm(len(others), generator=generator, device="cpu")[:k_random].to(others.device)
    return torch.cat([top, others[pick]])


def distinct_patches(patches: Tensor) -> Tensor:
    """Positions [U] (ascending, int64) of the first of each distinct patch among patches [M, ...]: the
    patches whose values (bytes) equal no earlier patch's. Identical inputs give identical features
    and instance scores, so a candidate pool with 135 empty (black) Megapixel MNIST patches of 256
    embeds and passes one of them; on tissue, where patches are seldom byte-identical (0-2 of 256
    candidates on needle-cohort slides, flat areas), it keeps nearly all. Equal 128-bit digests count as equal bytes."""
    flat = patches.detach().reshape(patches.shape[0], math.prod(patches.shape[1:])).cpu().contiguous().numpy()
    # a strided sample of ~1k values first: patches that differ there are distinct without hashing them
    # whole (512 candidates of 224 px are 77 MB); only patches that agree on it are compared in full
    sample = np.ascontiguousarray(flat[:, :: max(1, flat.shape[1] // 1024)])
    groups: dict[bytes, list[int]] = {}
    digests: dict[int, bytes] = {}

    def digest(i: int) -> bytes:
        if i not in digests:
            digests[i] = hashlib.blake2b(flat[i].data, digest_size=16).digest()
        return digests[i]

    keep = []
    for i in range(len(flat)):
        earlier = groups.setdefault(sample[i].tobytes(), [])
        if not any(digest(j) == digest(i) for j in earlier):
            earlier.append(i)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def select_informative(scores: Tensor, n: int) -> Tensor:
    """Positions of the n highest instance scores [M] (all M when n >= M), highest first."""
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [M], got {tuple(scores.shape)}")
    return torch.topk(scores.detach(), min(n, scores.shape[0]), sorted=True).indices


def distillation_loss(candidate_attention: Tensor, scores: Tensor, *, top: int) -> Tensor:
    """Cross-entropy of the view attention over the candidates against their best instance scores.

    candidate_attention [M] (the view attention a at the candidate cells, with gradient) and
    scores [M] (instance scores, detached here) -> a scalar: -mean_{c in T} log(a_c / sum_c' a_c'),
    T the (at most) `top` candidates with the highest scores among those that stand out: softmax
    weight p_c >= 1/M, i.e. a score at or above the log-mean-exp of the scores (the best one always).
    With a fixed count instead, a slide with fewer informative candidates than `top` filled T with
    background cells, which pulled the attention off the regions it had found; fewer regions then
    became candidates, T held more background still, and the attention of a needle run drifted back
    to uniform after it had learnt (entropy 6.4 -> 10.3 nats between epochs 19 and 25 of a run that
    had reached val AUC 1.0). The target's minimum puts all of the candidates' attention on T:
    descent raises the attention where the feature network found the most telling patches and
    lowers it elsewhere, without bound, so the attention can become as peaked as the evidence is
    sparse. Restricted to the candidates, the loss does not depend on the proposal they came from.
    It is weighted by `score_contrast(scores)`: only slides where the MIL head singles candidates out
    teach the attention (unweighted, the attention of a needle run collapsed back to uniform once the
    features learnt: negative slides, whose scores are flat, pulled it towards arbitrary cells).
    """
    if candidate_attention.shape != scores.shape or scores.ndim != 1:
        raise ValueError(f"candidate_attention {tuple(candidate_attention.shape)} and scores "
                         f"{tuple(scores.shape)} must both be [M]")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    best = select_informative(scores, top)
    p = torch.softmax(scores.detach().float(), dim=0)
    stands_out = p[best] >= 1.0 / scores.shape[0]
    stands_out[0] = True  # the best score is never below the mean softmax weight; kept for ties too
    best = best[stands_out]
    log_a = torch.log(candidate_attention.float().clamp_min(torch.finfo(torch.float32).tiny))
    return -F.log_softmax(log_a, dim=0)[best].mean() * score_contrast(scores)


#: Patches per slide that `instance_loss` labels.
INSTANCE_TOP = 2


def instance_loss(instance_logits: Tensor, target: int, *, top: int = INSTANCE_TOP,
                  weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of the slide's label on its `top` patches most telling of it: instance_logits [n, C]
    (the slide classifier applied to each patch's features, with gradient) -> a scalar.

    The patches are those with the highest log p(target | patch) (chosen without gradient). Before the
    features discriminate the choice is arbitrary and its labels are noise that averages out over the
    classes; as soon as the patches of a class score a little higher for it they are chosen and taught
    it, undiluted. Pooling alone teaches a lone patch only through the slide's pooled representation:
    on simulated 10-class bags of 64 patches of 50 px (5 digits of the label, 4 of other classes, the
    rest scribbles or black: what a Megapixel MNIST slide's gradient pass holds) gated pooling stayed
    at chance (bag accuracy 0.08-0.12) for 500 steps of 8 bags; with this loss beside it the bag
    accuracy was 0.11 at step 500, 0.33 at step 800 and 0.40 at step 900. `weight` [C]: class
    weights, as for the slide loss.
    """
    if instance_logits.ndim != 2 or instance_logits.shape[0] < 1:
        raise ValueError(f"instance_logits must have shape [n >= 1, C], got {tuple(instance_logits.shape)}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    logp = F.log_softmax(instance_logits.float(), dim=-1)
    chosen = torch.topk(logp[:, target].detach(), min(top, logp.shape[0])).indices
    nll = -logp[chosen, target].mean()
    return nll if weight is None else nll * weight[target]


def score_contrast(scores: Tensor) -> Tensor:
    """How much the instance scores [M] single some candidates out, in [0, 1] (detached): 1 - H(p) / log M,
    p = softmax(scores). Flat scores (a slide where nothing stands out, or a MIL head that has not learnt
    yet) give ~0, so such a slide does not pull the attention towards arbitrary cells; one score far
    above the rest gives ~1."""
    m = scores.shape[0]
    if m < 2:
        return scores.new_zeros(())
    p = torch.softmax(scores.detach().float(), dim=0)
    return (1.0 + (p * torch.log(p.clamp_min(1e-30))).sum() / math.log(m)).clamp(0.0, 1.0)
