"""Tests of wsiats.nested: exact unbiasedness of the two-level estimator by enumeration.

For a few regions of a few cells, every ordered sample is enumerated at both levels with its
probability (prod a1(r_m) / pm_m for the regions without replacement, prod a1(r_m) with; the same
inside each picked region with a2), and the expectations of the estimate and of its gradients with
respect to the region logits, the cell logits and the features are compared with the true value
and gradients of <g, sum_i a1(r(i)) a2(i | r(i)) f(i)>. Gradients are taken through the smoothed
softmaxes, so a constant the score-function gradient adds per softmax is (correctly) invisible.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor

from wsiats import nested
from wsiats.sampling import smooth_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Allowed cells of the 3 regions (3, 2 and 1 cells): the allocation meets full regions.
MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])


def ordered(p: Tensor, n: int, replace: bool) -> Iterator[tuple[tuple[int, ...], float]]:
    """Every ordered sample of n locations from p [K] with its probability."""
    allowed = [int(i) for i in torch.nonzero(p > 0).flatten()]
    seqs = itertools.product(allowed, repeat=n) if replace else itertools.permutations(allowed, n)
    for seq in seqs:
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= float(p[i]) / (1.0 if replace else left)
            left -= 0 if replace else float(p[i])
        yield seq, prob


def problem(seed: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = (torch.randn(3, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()  # region logits
    v = (torch.randn(3, 3, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()  # cell logits
    f = torch.randn(3, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()  # features
    g = torch.randn(2, generator=gen, dtype=torch.float64)
    return u, v, f, g


def attentions(u: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    return smooth_attention(u[None], eps=0.05)[0], smooth_attention(v, mask=mask, eps=0.05)


Estimator = Callable[..., Tensor]


def enumerate_expectation(u: Tensor, v: Tensor, f: Tensor, g: Tensor, *, mask: Tensor | None, m: int, n: int,
                          replace_regions: bool, replace_cells: bool,
                          estimator: Estimator = nested.expectation) -> tuple[Tensor, list[Tensor]]:
    """(E[F], [E[dL/du], E[dL/dv], E[dL/df]]) over every ordered two-level sample, L = <g, F>."""
    a1, a2 = attentions(u, v, mask)
    value = torch.zeros(2, dtype=torch.float64)
    grads = [torch.zeros_like(t) for t in (u, v, f)]
    total = 0.0
    for regions, p_regions in ordered(a1.detach(), m, replace_regions):
        caps = [n] * m if replace_cells else [int((a2[r] > 0).sum()) for r in regions]
        counts = nested.allocate(n, caps)
        per_region = [list(ordered(a2[r].detach(), k, replace_cells)) for r, k in zip(regions, counts)]
        for combo in itertools.product(*per_region):
            prob = p_regions
            for _, p in combo:
                prob *= p
            idx = torch.tensor(regions)
            cells = [torch.tensor(c) for c, _ in combo]
            est = estimator(a1[idx], [a2[r][c] for r, c in zip(regions, cells)],
                            [f[r][c] for r, c in zip(regions, cells)],
                            replace_regions=replace_regions, replace_cells=replace_cells)
            out = torch.autograd.grad((est * g).sum(), (u, v, f), retain_graph=True)
            value += prob * est.detach()
            for acc, d in zip(grads, out):
                acc += prob * d
            total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    return value, grads


def truth(u: Tensor, v: Tensor, f: Tensor, g: Tensor, mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    a1, a2 = attentions(u, v, mask)
    s = (a1[:, None, None] * a2[:, :, None] * f).sum(dim=(0, 1))
    return s.detach(), list(torch.autograd.grad((s * g).sum(), (u, v, f)))


REPLACE = [(False, False), (False, True), (True, False), (True, True)]


@pytest.mark.parametrize("replace_regions, replace_cells", REPLACE)
@pytest.mark.parametrize("m, n, masked", [(2, 2, False), (2, 3, True)])
def test_value_and_both_gradients_unbiased_by_enumeration(replace_regions: bool, replace_cells: bool, m: int,
                                                          n: int, masked: bool) -> None:
    mask = MASK if masked else None
    u, v, f, g = problem(seed=7 + m + n)
    want_value, want_grads = truth(u, v, f, g, mask)
    value, grads = enumerate_expectation(u, v, f, g, mask=mask, m=m, n=n, replace_regions=replace_regions,
                                         replace_cells=replace_cells)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(("region logits", "cell logits", "features"), grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda s, name=name: f"{name}: {s}")


def test_peaked_attention_unbiased_without_replacement() -> None:
    """Without replacement at both levels, peaked attention: where a biased
    without-replacement gradient shows most (ATS_NOTES: ~190%)."""
    u, v, f, g = problem(seed=3)
    with torch.no_grad():
        u.mul_(4.0)
        v.mul_(4.0)
    want_value, want_grads = truth(u, v, f, g, MASK)
    value, grads = enumerate_expectation(u, v, f, g, mask=MASK, m=2, n=3, replace_regions=False, replace_cells=False)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _pooled_mean(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor],
                 **_: bool) -> Tensor:
    """A plausible wrong estimator: the plain mean of the N patches read from the picked regions."""
    return torch.cat(list(features)).mean(0) + 0 * region_attention.sum() + 0 * torch.cat(list(cell_attention)).sum()


def _flat_inner(region_attention: Tensor, cell_attention: Sequence[Tensor], features: Sequence[Tensor],
                **kw: bool) -> Tensor:
    """Another: the inner estimates averaged without the outer without-replacement weights."""
    from wsiats import sampling

    inner = [sampling.expectation(a[None], f[None], kw["replace_cells"])[0] for a, f in zip(cell_attention, features)]
    return sampling.expectation(region_attention[None], torch.stack(inner)[None], True)[0]


@pytest.mark.parametrize("wrong", [_pooled_mean, _flat_inner])
def test_enumeration_catches_a_biased_estimator(wrong: Estimator) -> None:
    u, v, f, g = problem(seed=11)
    want_value, want_grads = truth(u, v, f, g, None)
    value, grads = enumerate_expectation(u, v, f, g, mask=None, m=2, n=2, replace_regions=False,
                                         replace_cells=False, estimator=wrong)
    off = [float((got - want).abs().max()) for got, want in zip([value, *grads], [want_value, *want_grads])]
    assert max(off) > 1e-3, off


def test_inner_estimate_is_only_conditionally_unbiased() -> None:
    """Given the region, G_m is unbiased for G(r_m) = sum_{i in r_m} a2(i | r_m) f(i) (not for S)."""
    from wsiats import sampling

    u, v, f, g = problem(seed=5)
    _, a2 = attentions(u, v, None)
    for r in range(3):
        mean = torch.zeros(2, dtype=torch.float64)
        for cells, p in ordered(a2[r].detach(), 2, False):
            c = torch.tensor(cells)
            mean += p * sampling.expectation(a2[r][c][None], f[r][c][None], False)[0].detach()
        torch.testing.assert_close(mean, (a2[r, :, None] * f[r]).sum(0).detach())


def test_weights_are_the_feature_coefficients_and_sum_to_one() -> None:
    u, v, f, g = problem(seed=2)
    a1, a2 = attentions(u, v, None)
    idx, cells = torch.tensor([2, 0]), [torch.tensor([1, 0]), torch.tensor([2])]
    for rr, rc in REPLACE:
        est = nested.expectation(a1[idx], [a2[r][c] for r, c in zip(idx.tolist(), cells)],
                                 [f[r][c] for r, c in zip(idx.tolist(), cells)], replace_regions=rr, replace_cells=rc)
        w = nested.weights(a1[idx], [a2[r][c] for r, c in zip(idx.tolist(), cells)], replace_regions=rr,
                           replace_cells=rc)
        direct = sum((wm[:, None] * f[r][c]).sum(0) for wm, r, c in zip(w, idx.tolist(), cells))
        torch.testing.assert_close(est.detach(), direct.detach())
        assert float(torch.cat(w).sum()) == pytest.approx(1.0)


def test_estimate_topk_is_one_level_topk_at_each_level() -> None:
    u, v, f, g = problem(seed=4)
    a1, a2 = attentions(u, v, None)
    ridx, ra = nested.sample_regions(a1[None].detach(), 2, False)
    top = torch.topk(a1.detach(), 2).indices
    got = nested.topk_cells(a2[top].detach(), [2, 1])
    assert [len(i) for i, _ in got] == [2, 1]
    for (i, a), r in zip(got, top.tolist()):
        assert i.tolist() == torch.topk(a2[r].detach(), len(i)).indices.tolist()
    est = nested.estimate_topk(a1[top], [a for _, a in got], [f[r][i] for (i, _), r in zip(got, top.tolist())])
    assert est.shape == (2,)
    assert ridx.shape == ra.shape == (1, 2)


def test_sample_cells_draws_distinct_cells_of_each_row() -> None:
    a2 = smooth_attention(torch.randn(4, 9), mask=torch.rand(4, 9) > 0.3)
    gen = torch.Generator().manual_seed(0)
    for (idx, a), row in zip(nested.sample_cells(a2, [3, 1, 2, 2], False, generator=gen), a2):
        assert len(set(idx.tolist())) == len(idx)
        assert bool((row[idx] > 0).all())
        torch.testing.assert_close(a, row[idx])


@pytest.mark.parametrize("n, caps, want", [
    (4, [9, 9], [2, 2]),
    (5, [9, 9], [3, 2]),
    (4, [1, 9], [1, 3]),
    (4, [1, 1], [1, 1]),  # fewer cells than patches: fewer patches
    (3, [2, 2, 2], [1, 1, 1]),
])
def test_allocate(n: int, caps: list[int], want: list[int]) -> None:
    assert nested.allocate(n, caps) == want


def test_allocate_refuses_fewer_patches_than_regions() -> None:
    with pytest.raises(ValueError, match="at least one patch per picked region"):
        nested.allocate(1, [3, 3])
