"""Attention sampling and its unbiased estimators: pure torch, no I/O.

The model of Katharopoulos & Fleuret (ICML 2019) replaces sum_i a_i f_i over all K locations of
a low-resolution view by an estimate from n sampled locations. This module holds:

- `smooth_attention`: logits -> a = (1 - eps) softmax + eps / K over the allowed locations
  (exactly 0 elsewhere), so 1/a stays bounded; `uniform_attention` is the U-N baseline.
- `sample`: n locations with replacement (categorical draws) or without (Gumbel top-k, in
  sequential-draw order); `topk`: the n highest, for deterministic inference.
- `expectation`: the estimator of sum_i a_i f_i with a custom backward whose gradients with
  respect to BOTH the sampled attention and the sampled features are unbiased.
- `estimate_topk` (deterministic top-k inference) and `entropy` (the loss regulariser).

Without replacement, with sampled order k = 0..n-1, w_k = 1/n and the exclusive cumulative mass
pm_k = 1 - sum_{j<k} a_j (pm_0 = 1):

    Fest_k = sum_{j<k} a_j f_j + pm_k f_k          (each unbiased for sum_i a_i f_i)
    F      = sum_k w_k Fest_k = sum_k c_k f_k,      c_k = w_k (pm_k + (n-1-k) a_k)
    dF/df_k = c_k g                                 (unbiased)
    dF/da_k = <g, f_k> (w_k pm_k / a_k + sum_{j>k} w_j)   (unbiased)

The attention gradient is deliberately NOT the derivative of the forward value (that one is
biased), and it differs from the official code's (also biased; see ATS_NOTES.md in the project's
shared notes). tests/test_sampling.py checks unbiasedness exactly by enumerating every ordered sample.

Which estimator wsiats uses (`Config.pooling`):

- `pooling: ats` (the paper's model; `--pooling ats --candidates 0`): training and inference use
  `expectation` above, F = sum_k c_k f_k over N cells sampled from a: unbiased for
  sum_i a_i f_i, with unbiased gradients for the attention and the features (exact enumeration in
  tests/test_sampling.py and, end to end, tests/test_forward.py). `--topk` uses `estimate_topk`
  (deterministic, not unbiased).
- `pooling: gated` (the default, for sparse evidence; `wsiats.mil`): the slide's representation is
  gated attention MIL pooling z = sum_k alpha_k f_k over the patches it is given (features f
  L2-normalised unless `Config.feature_norm` is 'none'); it is NOT an
  estimate of sum_i a_i f_i and makes no unbiasedness claim.
  - Training draws M = `candidates` cells without replacement from q = (1 - rho) a + rho u
    (Gumbel top-k on log q, `sample`: an exact draw without replacement from q, tested by
    enumeration of its ordered pairs in tests/test_mil.py), keeps one of each set of identical
    patches (`wsiats.mil.distinct_patches`: byte-equal pixels, e.g. empty background without a
    tissue mask), embeds them without gradient, and pools T = max(N, `train_patches`) of them with gradient: the T - round(`select_random` T)
    with the highest instance scores and the rest drawn uniformly without replacement from the
    other candidates (`wsiats.mil.select_for_gradient`; `select_random` 0.5 by default). With `select_random` 0 and M -> K (every
    tissue cell a candidate) this is exactly IPS's objective over the whole view's distinct patches (gated pooling of
    the top-T patches by instance score), whatever the draw: consistent for it, and equal to it
    when M >= K (tested in tests/test_explore.py). The attention network learns
    from `wsiats.mil.distillation_loss` (cross-entropy of a over the candidates against the at
    most `train_patches // 4` best-scored that stand out, softmax weight >= 1/M), not from a
    score-function gradient. An optional training-only term (`instance_weight` > 0), `wsiats.mil.instance_loss` (the slide's label
    on the 2 pooled patches the classifier rates most telling of it), adds to the loss; it changes
    no estimate and no inference.
  - Inference reads N patches: N - round(zoom N) cells drawn without replacement from a and kept
    at least `SPREAD_PATCHES` patch widths apart (`wsiats.forward.spread_cells`), the rest drawn without replacement from a restricted to the square around the cell
    whose patch has the highest instance score (`wsiats.forward.zoom_cells`), all N pooled.
- `nested: true` (`wsiats.nested`, `wsiats.nested_pass`): with `pooling: ats` the two-level estimator
  of `wsiats.nested.expectation`, unbiased for sum_i a1(r(i)) a2(i | r(i)) f_i with unbiased gradients
  for both attention networks and the features (derivation in that module, exact enumeration in
  tests/test_nested.py). With `pooling: gated` the same gated pooling as above, no unbiasedness claim:
  the candidates are drawn over two levels (regions from a1 mixed with exploration, then cells of those
  regions jointly from a2 mixed with equal mass per colour group: `wsiats.nested_pass.explore_cells`,
  its law tested by frequency), and inference takes its patches among the cells of 4M regions
  (`wsiats.nested_pass.spread_pick`, `zoom_region`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "effective_mask",
    "entropy",
    "estimate_topk",
    "expectation",
    "sample",
    "smooth_attention",
    "topk",
    "uniform_attention",
]


# ---------------------------------------------------------------------------------------------
# Attention distributions
# ---------------------------------------------------------------------------------------------


def effective_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The mask actually used: rows with no allowed location fall back to all allowed.

    mask: [B, K] bool, True = allowed (tissue). Returns (mask [B, K] bool, fell_back [B] bool);
    the caller decides whether to warn about the rows that fell back.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape [B, K], got {tuple(mask.shape)}")
    m = mask.bool()
    fell_back = ~m.any(dim=-1)
    m = m | fell_back[:, None]
    return m, fell_back


def _no_graph(t: Tensor) -> bool:
    """True when no autograd graph is recorded through t: in-place and fused shortcuts are safe."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype (half, bfloat16, ints) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def smooth_attention(logits: Tensor, *, mask: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """Smoothed softmax attention over the allowed locations of each row.

    logits [B, K] -> a [B, K] with a = (1 - eps) softmax(logits over allowed) + eps / K_allowed on
    allowed locations and exactly 0 on disallowed ones; rows sum to 1. mask [B, K] bool (True =
    allowed); a row with no allowed location falls back to all K allowed (see `effective_mask`
    to learn which rows did). Half-precision logits are computed in float32.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, K], got {tuple(logits.shape)}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    x = logits.to(_float_dtype(logits.dtype))
    if mask is None:
        return (1.0 - eps) * torch.softmax(x, dim=-1) + eps / x.shape[-1]
    if mask.shape != logits.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from logits shape {tuple(logits.shape)}")
    m, _ = effective_mask(mask.to(logits.device))
    if _no_graph(x) and x.shape[0] == 1 and x.shape[1] > SPARSE_ABOVE:
        # inference on a large view: the softmax over the allowed cells alone, scattered into zeros (the same
        # values to float rounding; on a 1438^2 view with 29% tissue 7 ms against 25 ms)
        support = torch.nonzero(m[0]).flatten()
        if support.numel() <= SPARSE_SHARE * x.shape[1]:
            on = torch.softmax(x[0, support], dim=-1).mul_(1.0 - eps).add_(eps / support.numel())
            return x.new_zeros(x.shape).index_copy_(1, support, on[None])
    p = torch.softmax(x.masked_fill(~m, -math.inf), dim=-1)
    share = eps / m.sum(dim=-1, keepdim=True).to(x.dtype)  # eps spread uniformly over the allowed cells
    if _no_graph(p):
        # inference: the same arithmetic in place, so a view of K cells costs two K-sized buffers, not six
        return p.mul_(1.0 - eps).add_(share).masked_fill_(~m, 0.0)
    # masked_fill (not multiplication) guarantees exact zeros and no gradient there
    return ((1.0 - eps) * p + share).masked_fill(~m, 0.0)


def uniform_attention(mask: Tensor | None, shape: Sequence[int] | torch.Size) -> Tensor:
    """The paper's U-N baseline: uniform attention over the allowed locations, float32 [B, K].

    mask [B, K] bool or None (all allowed); rows with no allowed location fall back to all.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[-1] < 1:
        raise ValueError(f"shape must be [B, K] with K >= 1, got {shape}")
    if mask is None:
        return torch.full(shape, 1.0 / shape[-1])
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from shape {shape}")
    m, _ = effective_mask(mask)
    return m.float() / m.sum(dim=-1, keepdim=True).float()


def entropy(attention: Tensor) -> Tensor:
    """Entropy of each row of attention [B, K] -> [B], with 0 log 0 = 0 (masked locations).

    Differentiable; the gradient at zero entries is 0 rather than NaN.
    """
    a = attention
    if _no_graph(a):
        return -torch.special.xlogy(a, a).sum(dim=-1)  # one K-sized buffer; xlogy(0, 0) = 0
    safe = torch.where(a > 0, a, torch.ones_like(a))
    return -(a * torch.log(safe)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _check_attention(attention: Tensor, n: int, *, distinct: bool) -> None:
    """Validate attention [B, K] and the number of locations n to pick from each row."""
    if attention.ndim != 2:
        raise ValueError(f"attention must have shape [B, K], got {tuple(attention.shape)}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor, got {attention.dtype}")
    if n < 1:
        raise ValueError(f"the number of locations to pick must be >= 1, got {n}")
    a = attention.detach()
    if a.numel():  # one pass for both checks: a NaN or an infinity shows in the minimum or the maximum
        lo, hi = torch.aminmax(a)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and float(lo) >= 0):
            raise ValueError("attention must be finite and non-negative")
    nonzero = (a > 0).sum(dim=-1, dtype=torch.int32)  # int32 sums are 2.5x faster; a row is < 2^31 cells
    need = n if distinct else 1
    short = torch.nonzero(nonzero < need).flatten()
    if short.numel():
        row = int(short[0])
        raise ValueError(
            f"cannot pick {n} distinct location(s): row {row} of the attention has only "
            f"{int(nonzero[row])} location(s) with non-zero attention (of {a.shape[-1]}); "
            "lower n or allow more locations"
            if distinct
            else f"row {row} of the attention is all zero: nothing to sample"
        )


def _gumbel(shape: torch.Size, *, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise -log(-log U), with U kept away from 0 so that no key is -inf."""
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    # in place: one K-sized buffer instead of five (K is every cell of the view)
    return u.clamp_min_(torch.finfo(dtype).tiny).log_().neg_().log_().neg_()


def sample(
    attention: Tensor, n: int, replace: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample n locations per row of attention [B, K] (rows sum to 1).

    Returns (indices LongTensor [B, n], sampled_attention [B, n]); sampled_attention is
    `attention` gathered at the indices and keeps its autograd connection.

    - replace=True: n independent categorical draws (`torch.multinomial`).
    - replace=False: Gumbel top-k on log a: the indices come in the order a sequential draw
      without replacement would produce them (the estimator depends on it), never repeat, and
      never include a zero-attention location (log 0 = -inf).

    Raises ValueError if attention is not [B, K], has negative or non-finite entries, or, without
    replacement, if n exceeds the number of non-zero-attention locations of some row (locations
    are never silently repeated); with replacement, if a row is all zero.
    `generator` (on attention's device) makes the draw reproducible.
    """
    _check_attention(attention, n, distinct=not replace)
    a = attention.detach()
    work = a.to(_float_dtype(a.dtype))
    support = None
    if work.shape[0] == 1 and work.shape[1] > SPARSE_ABOVE:
        nz = torch.nonzero(work[0]).flatten()
        if nz.numel() <= SPARSE_SHARE * work.shape[1]:
            support, work = nz, work[:, nz]
    if replace:
        idx = torch.multinomial(work, n, replacement=True, generator=generator)
    else:
        keys = _gumbel(work.shape, dtype=work.dtype, device=work.device, generator=generator).add_(torch.log(work))
        idx = _top_indices(keys, n)
    if support is not None:
        idx = support[idx]
    return idx, attention.gather(1, idx)


#: `sample` draws a long single row that is mostly zero (a view's attention off the tissue mask) among its
#: non-zero entries only: the same distribution, from keys over the tissue cells instead of every cell of
#: the view (a 20 Gpx slide's coarse view: 305k cells, 14% on tissue). Another random stream than the
#: draw over the whole row, so only rows longer than SPARSE_ABOVE with at most SPARSE_SHARE non-zero take it.
SPARSE_ABOVE = 1 << 16
SPARSE_SHARE = 0.5


def topk(attention: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Deterministic: the n highest-attention locations of each row, in descending order.

    Returns (indices [B, n], sampled_attention [B, n]) like `sample`. Raises ValueError if n
    exceeds the number of non-zero-attention locations of a row.
    """
    _check_attention(attention, n, distinct=True)
    idx = _top_indices(attention.detach(), n)
    return idx, attention.gather(1, idx)


def highest_or_drawn(weights: Tensor, n: int, *, generator: torch.Generator | None) -> Tensor:
    """Indices [B, n] of n distinct locations of weights [B, K] (non-negative, not normalised): the n highest
    without a generator (deterministic inference), else n drawn without replacement with probability
    proportional to the weights (`sample` of the normalised rows)."""
    if generator is None:
        return topk(weights, n)[0]
    return sample(weights / weights.sum(dim=-1, keepdim=True), n, False, generator=generator)[0]


#: Row length above which `_top_indices` works in blocks of this many entries.
TOPK_BLOCK = 1 << 16


def _top_indices(x: Tensor, n: int) -> Tensor:
    """Indices of the n largest entries of each row of x [B, K], largest first.

    Equal to `torch.topk(x, n).indices` up to the order of tied entries, but for a long row
    (every cell of a view: millions) torch's CPU kernel copies the row into (value, index) pairs,
    16 bytes per entry: 32 MB for a 2 Gpx slide's view. Here each block of TOPK_BLOCK entries
    gives its own top n and the winners of the blocks are ranked once: the n largest of a row are
    among its blocks' n largest. Other devices call torch.topk directly.
    """
    k = x.shape[-1]
    if x.device.type != "cpu" or k <= 2 * TOPK_BLOCK or n > TOPK_BLOCK:
        return torch.topk(x, n, dim=-1, largest=True, sorted=True).indices
    values, indices = [], []
    for start in range(0, k, TOPK_BLOCK):
        v, i = torch.topk(x[:, start: start + TOPK_BLOCK], min(n, k - start), dim=-1, sorted=False)
        values.append(v)
        indices.append(i + start)
    best = torch.topk(torch.cat(values, dim=-1), n, dim=-1, largest=True, sorted=True).indices
    return torch.cat(indices, dim=-1).gather(1, best)


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------


def _exclusive_mass(a: Tensor) -> Tensor:
    """pm_k = 1 - sum_{j<k} a_j (pm_0 = 1), clamped to >= a_k as it is in exact arithmetic."""
    before = torch.cumsum(a, dim=-1) - a
    return torch.maximum(1.0 - before, a)


def _no_replace_weights(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(pm, c, later) for sampled attention a [B, n]: c_k = (pm_k + (n-1-k) a_k) / n, later_k = (n-1-k)/n."""
    n = a.shape[-1]
    pm = _exclusive_mass(a)
    later = torch.arange(n - 1, -1, -1, dtype=a.dtype, device=a.device) / n
    return pm, pm / n + later * a, later


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context with autocast disabled on `device_type` (a no-op where autocast is unknown)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class _Expectation(torch.autograd.Function):
    """Forward: the estimate of sum_i a_i f_i; backward: the unbiased gradients (module docstring)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, f: Tensor, replace: bool) -> Tensor:  # type: ignore[override]
        with _autocast_off(f.device.type):
            if replace:
                out = f.mean(dim=1)
            else:
                _, c, _ = _no_replace_weights(a)
                out = torch.einsum("bn,bnd->bd", c, f)
        ctx.save_for_backward(a, f)
        ctx.replace = replace
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        a, f = ctx.saved_tensors
        n = a.shape[-1]
        grad_a = grad_f = None
        with _autocast_off(f.device.type):
            g = g.to(f.dtype)
            if ctx.replace:
                if ctx.needs_input_grad[1]:
                    grad_f = (g / n)[:, None, :].expand_as(f).contiguous()
                if ctx.needs_input_grad[0]:
                    gf = torch.einsum("bd,bnd->bn", g, f)
                    grad_a = torch.where(a > 0, gf / (n * a.clamp_min(torch.finfo(a.dtype).tiny)), 0.0)
            else:
                pm, c, later = _no_replace_weights(a)
                if ctx.needs_input_grad[1]:
                    grad_f = c[:, :, None] * g[:, None, :]
                if ctx.needs_input_grad[0]:
                    gf = torch.einsum("bd,bnd->bn", g, f)
                    ratio = torch.where(a > 0, pm / (n * a.clamp_min(torch.finfo(a.dtype).tiny)), 0.0)
                    grad_a = gf * (ratio + later)
        return grad_a, grad_f, None


def _prepare(sampled_attention: Tensor, features: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Validate shapes, flatten trailing feature dims and cast both to the compute dtype."""
    if sampled_attention.ndim != 2:
        raise ValueError(f"sampled_attention must have shape [B, n], got {tuple(sampled_attention.shape)}")
    if features.ndim < 3 or features.shape[:2] != sampled_attention.shape:
        raise ValueError(
            f"features must have shape [B, n, D] matching sampled_attention {tuple(sampled_attention.shape)}, "
            f"got {tuple(features.shape)}"
        )
    if sampled_attention.shape[-1] < 1:
        raise ValueError("need at least one sampled location")
    dtype = torch.promote_types(_float_dtype(sampled_attention.dtype), _float_dtype(features.dtype))
    trailing = tuple(features.shape[2:])
    f = features.reshape(*features.shape[:2], -1).to(dtype)
    return sampled_attention.to(dtype), f, trailing


def expectation(sampled_attention: Tensor, features: Tensor, replace: bool) -> Tensor:
    """Unbiased estimate of sum_i a_i f_i from n sampled locations, with unbiased gradients.

    sampled_attention [B, n] and features [B, n, D] (extra trailing dims are kept) from `sample`
    in its order -> [B, D]. With replacement the estimate is mean_k f_k; without, it is
    sum_k c_k f_k (module docstring). The backward gives unbiased gradients with respect to both
    inputs (for the attention, a score-function gradient, not the derivative of the forward).
    Computed in float32 (float64 if an input is float64) with autocast disabled, so it is safe
    under AMP; the result is float32/float64.
    """
    a, f, trailing = _prepare(sampled_attention, features)
    out = _Expectation.apply(a, f, bool(replace))
    return out.reshape(out.shape[0], *trailing)


def estimate_topk(sampled_attention: Tensor, features: Tensor) -> Tensor:
    """Deterministic inference: the without-replacement formula applied in top-k order.

    sampled_attention [B, n] and features [B, n, D] from `topk` (descending attention) -> [B, D]
    = sum_k c_k f_k with c_k = (pm_k + (n-1-k) a_k) / n, the same weights as `expectation(...,
    replace=False)`; they sum to 1. No randomness, so it is not an unbiased estimate of
    sum_i a_i f_i, and its gradient is plain autograd (not meant for training).
    """
    a, f, trailing = _prepare(sampled_attention, features)
    _, c, _ = _no_replace_weights(a)
    out = torch.einsum("bn,bnd->bd", c, f)
    return out.reshape(out.shape[0], *trailing)


def estimate_weights(sampled_attention: Tensor, replace: bool) -> Tensor:
    """The coefficient of each sampled patch's features in the estimate ([B, n], rows sum to 1).

    With replacement 1/n each; without, (pm_k + (n-1-k) a_k) / n, which is also the gradient of
    the estimate w.r.t. each feature vector. Reported next to each patch in prediction outputs.
    """
    a = sampled_attention.detach().to(_float_dtype(sampled_attention.dtype))
    if replace:
        return torch.full_like(a, 1.0 / a.shape[-1])
    return _no_replace_weights(a)[1]
