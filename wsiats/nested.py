"""Nested (two-level) attention sampling and its unbiased estimator: pure torch, no I/O.

One-level attention sampling runs the attention network over every cell of a low-resolution view,
so its cost grows with the slide's area. Here the slide's cells i are grouped into regions (a region
is one pixel of a coarse view; its cells are the `ratio` x `ratio` cells of the finer view inside
it, each cell r(i) in exactly one region) and the attention over cells is a product

    a(i) = a1(r(i)) a2(i | r(i)),     sum_r a1(r) = 1,   sum_{i in r} a2(i | r) = 1 for each r,

a1 the coarse attention (a smoothed softmax over the regions of the coarse view, `coarse_net`),
a2 the fine attention (a smoothed softmax over the cells of ONE region, the attention network run
on that region's crop of the finer view). a sums to 1 over all cells. Only the fine crops of the
regions that are picked are ever read.

Target: S = sum_i a(i) f(i) = sum_r a1(r) G(r),  G(r) = sum_{i in r} a2(i | r) f(i).

Sampling (`sample_regions`, `allocate`, `sample_cells`):
1. M regions r_0..r_{M-1} from a1: with replacement (categorical draws) or without (Gumbel top-k in
   sequential-draw order), exactly `wsiats.sampling.sample`.
2. The N patches are split over the M picked regions by `allocate`: n_m cells of region r_m, a
   function of the picked regions only (N // M each, the remainder to the first, at most a region's
   allowed cells without replacement). Inside region r_m, n_m cells drawn from a2(. | r_m), with or
   without replacement, independently for each m (a region drawn twice gets two independent draws).

Estimator (`expectation`), built from the one-level estimator of `wsiats.sampling.expectation`
(call it E_1[a_sampled, f_sampled]; its value and both gradients are unbiased, see that module):

    G_m = E_1[a2(i_mk | r_m), f(i_mk)]_{k < n_m}     inner, one per picked region
    F   = E_1[a1(r_m), G_m]_{m < M}                  outer, with G_m as the "features"

Value. Conditionally on the picked regions, each G_m is unbiased for G(r_m) (one-level result;
n_m is fixed given the regions). F is linear in the G_m with coefficients C_m that depend on the
regions only (C_m = 1/M with replacement, (pm_m + (M-1-m) a1_m)/M without), so
E[F | regions] = sum_m C_m G(r_m), and the one-level result over regions gives E[F] = sum_r a1(r)
G(r) = S. Unbiased for every combination of with/without replacement at the two levels. Written
out, F = sum_m sum_k C_m c_mk f(i_mk) (c_mk the inner coefficients; `weights`).

Gradients (autograd through the two custom backwards; g = dL/dF):
- Features: dF/df(i_mk) = C_m c_mk g. E[sum over the draws of i of C_m c_mk] = E[sum_m C_m
  a2(i | r_m) 1{r_m = r(i)}] (inner feature-gradient unbiasedness) = a1(r(i)) a2(i | r(i)) = a(i)
  (outer feature-gradient unbiasedness, with the "feature" h(r) = a2(i | r) 1{r = r(i)}).
- Fine attention a2 (the inner backward receives dL/dG_m = C_m g): E[inner attention gradient | r_m]
  = C_m (<g, f(i)> + kappa_m) for i in r_m, where kappa_m depends on r_m and n_m but not on i (the
  one-level estimator is unbiased up to such a constant; zero with replacement). So E[sum over the
  picks of r] = a1(r) <g, f(i)> + (a term constant over the cells of r); the true gradient is
  dS/da2(i | r) = a1(r) <g, f(i)>. Each region's a2 is a softmax over that region's cells, whose
  Jacobian kills a constant per region: the gradient of the fine network's parameters is unbiased.
  Regions not picked contribute zero, which the expectation counts.
- Coarse attention a1: the outer score-function gradient with features G_m, <g, G_m>(pm_m/(M a1_m)
  + (M-1-m)/M) without replacement, <g, G_m>/(M a1_m) with. It is linear in G_m with coefficients that
  depend on the regions only, so E[. | regions] replaces G_m by G(r_m), and the one-level result
  gives E = dS/da1(r) = <g, G(r)> up to a constant over regions, which a1's softmax kills: the
  gradient of the coarse network's parameters is unbiased.
tests/test_nested.py checks the value and the gradients of the region logits, the cell logits and
the features exactly, by enumerating every ordered sample at both levels, for all four
combinations of replacement.

What it is unbiased FOR: S under the product attention a = a1 a2 of the nested model. It is not an
estimate of the one-level model's S over the fine view (another attention). Each inner G_m is only
conditionally unbiased (for G(r_m), given r_m), which is what the outer estimator needs. Deliberately
NOT used: drawing the N patches from a restricted to the union of the picked regions, which is
unbiased only conditionally on the picked set, for sum over those regions (correcting it needs the
inclusion probability of each region under Gumbel top-k, which has no closed form).

Deterministic inference (`topk=True` in the pipeline): the M regions of highest a1, in each the n_m
cells of highest a2, both combined with the without-replacement weights (`estimate_topk`); not
unbiased, like `wsiats.sampling.estimate_topk`.

Entropy regulariser (`entropy`): H(a) = H(a1) + sum_r a1(r) H(a2 | r); the estimate
H(a1) + sum_m C_m H(a2 | r_m) is unbiased in value; its gradient reaches the coarse network through
H(a1) only (C_m detached), the fine network through the picked regions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from wsiats import sampling

__all__ = [
    "allocate",
    "entropy",
    "estimate_topk",
    "expectation",
    "region_weights",
    "sample_cells",
    "sample_regions",
    "topk_cells",
    "weights",
]


def allocate(n: int, capacity: Sequence[int]) -> list[int]:
    """How many of the n patches each of the M picked regions gets, in pick order.

    n // M each and the remainder to the first regions; a region gets at most `capacity[m]` (its
    cells with non-zero fine attention, when drawing without replacement), and what a full region
    cannot take goes to the next ones with room, in order. A function of the picked regions only,
    which the estimator's unbiasedness needs. Raises ValueError when n < M (a region without a patch
    has no estimate) or a capacity is below 1.
    """
    m = len(capacity)
    if m < 1 or n < m:
        raise ValueError(f"need at least one patch per picked region: {n} patch(es) for {m} region(s)")
    if min(capacity) < 1:
        raise ValueError("every picked region needs at least one cell to sample")
    counts = [min(n // m + (1 if k < n % m else 0), int(capacity[k])) for k in range(m)]
    left = n - sum(counts)
    for k in range(m):
        if left <= 0:
            break
        extra = min(left, int(capacity[k]) - counts[k])
        counts[k] += extra
        left -= extra
    return counts


def sample_regions(region_attention: Tensor, m: int, replace: bool,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """M regions from a1 [1, R]: (indices [1, M], a1 at them [1, M]), as `wsiats.sampling.sample`."""
    return sampling.sample(region_attention, m, replace, generator=generator)


def _cells(cell_attention: Tensor, counts: Sequence[int], pick: object) -> list[tuple[Tensor, Tensor]]:
    if cell_attention.ndim != 2 or cell_attention.shape[0] != len(counts):
        raise ValueError(f"cell_attention must be [M, C] with one row per count ({len(counts)}), "
                         f"got {tuple(cell_attention.shape)}")
    out = []
    for row, n in zip(cell_attention, counts):
        idx, a = pick(row[None], int(n))  # type: ignore[operator]
        out.append((idx[0], a[0]))
    return out


def sample_cells(cell_attention: Tensor, counts: Sequence[int], replace: bool,
                 generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """counts[m] cells drawn from row m of a2 [M, C] (each row sums to 1), independently per row.

    Returns, per row, (indices [n_m], a2 at them [n_m]) in sampled order; keeps autograd."""
    return _cells(cell_attention, counts, lambda a, n: sampling.sample(a, n, replace, generator=generator))


def topk_cells(cell_attention: Tensor, counts: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Deterministic: the counts[m] highest cells of each row of a2 [M, C], in descending order."""
    return _cells(cell_attention, counts, sampling.topk)


def _check(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor]) -> None:
    m = region_attention.shape[0] if region_attention.ndim == 1 else -1
    if m < 1 or len(cell_attention) != m or len(features) != m:
        raise ValueError(f"region_attention must be [M] with M cell-attention and feature entries, got "
                         f"{tuple(region_attention.shape)}, {len(cell_attention)} and {len(features)}")
    for a, f in zip(cell_attention, features):
        if a.ndim != 1 or f.ndim < 2 or f.shape[0] != a.shape[0] or a.shape[0] < 1:
            raise ValueError(f"each region needs cell attention [n_m] and features [n_m, D], got "
                             f"{tuple(a.shape)} and {tuple(f.shape)}")


def expectation(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor], *,
                replace_regions: bool, replace_cells: bool) -> Tensor:
    """Unbiased estimate of sum_i a1(r(i)) a2(i | r(i)) f(i), with unbiased gradients for both attentions.

    region_attention [M]: a1 at the picked regions, in pick order; cell_attention[m] [n_m] and
    features[m] [n_m, D]: a2 and the features of the cells drawn in region m, in sampled order ->
    [D] (module docstring: F = E_1[a1, (E_1[a2_m, f_m])_m]).
    """
    _check(region_attention, cell_attention, features)
    inner = [sampling.expectation(a[None], f[None], replace_cells)[0] for a, f in zip(cell_attention, features)]
    return sampling.expectation(region_attention[None], torch.stack(inner)[None], replace_regions)[0]


def estimate_topk(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
    """Deterministic inference: `wsiats.sampling.estimate_topk` at both levels (top-k order at both)."""
    _check(region_attention, cell_attention, features)
    inner = [sampling.estimate_topk(a[None], f[None])[0] for a, f in zip(cell_attention, features)]
    return sampling.estimate_topk(region_attention[None], torch.stack(inner)[None])[0]


def region_weights(region_attention: Tensor, replace: bool) -> Tensor:
    """C_m [M]: the coefficient of each picked region's inner estimate in F (sums to 1; detached)."""
    return sampling.estimate_weights(region_attention[None], replace)[0]


def weights(region_attention: Tensor, cell_attention: Sequence[Tensor], *, replace_regions: bool,
            replace_cells: bool) -> list[Tensor]:
    """C_m c_mk per region m: each sampled patch's coefficient in F (all of them sum to 1; detached)."""
    big = region_weights(region_attention, replace_regions)
    return [big[m] * sampling.estimate_weights(a[None], replace_cells)[0] for m, a in enumerate(cell_attention)]


def entropy(region_attention_full: Tensor, picked_cell_attention: Tensor, coefficients: Tensor) -> Tensor:
    """H(a1) + sum_m C_m H(a2 | r_m): a1 [R] over every region, a2 [M, C] of the picked regions, C [M] -> scalar."""
    coarse = sampling.entropy(region_attention_full[None])[0]
    fine = sampling.entropy(picked_cell_attention)
    return coarse + (coefficients.detach().to(fine.dtype) * fine).sum()
