"""Tests of wsiats.sampling: exact unbiasedness by enumeration, sampler statistics, edge cases.

The estimator's unbiasedness is checked EXACTLY: for small K and n every ordered sample is
enumerated with its probability (prod_k a_{i_k} / pm_k without replacement, prod_k a_{i_k} with),
and the expectations of the forward value and of the gradients are compared with the true
value and gradients of <g, sum_i a_i f_i>. The same check is shown to catch the published
estimators' bugs (the official biased attention gradient, the PyTorch port's inclusive cumsum,
and naive autograd through the forward), which are re-implemented here only as references.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import wsiats.sampling as sampling_mod
from wsiats.sampling import (
    SPARSE_ABOVE,
    effective_mask,
    entropy,
    estimate_topk,
    estimate_weights,
    expectation,
    sample,
    smooth_attention,
    topk,
    uniform_attention,
)

stats = pytest.importorskip("scipy.stats")

Estimator = Callable[[Tensor, Tensor, bool], Tensor]


# ---------------------------------------------------------------------------------------------
# Reference (wrong) estimators, kept here to prove the enumeration check catches them
# ---------------------------------------------------------------------------------------------


def _excl_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, dim=1) - x


def _published_estimator(cumsum: Callable[[Tensor], Tensor]) -> type[torch.autograd.Function]:
    """The published without-replacement estimator, with its attention gradient, over `cumsum`.

    With the exclusive cumsum this is idiap/attention-sampling `_expected_without_replacement`
    (its d/da is biased); with torch.cumsum, which is INCLUSIVE, it is the sara-nl PyTorch port
    (forward unchanged, since the a_k f_k terms cancel, but both gradients biased).
    """

    class _Published(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, a: Tensor, f: Tensor) -> Tensor:  # type: ignore[override]
            n = a.shape[1]
            pm = 1 - cumsum(a)
            fest = cumsum(a[..., None] * f) + pm[..., None] * f
            ctx.save_for_backward(a, f, pm, fest)
            return fest.sum(1) / n

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
            a, f, pm, fest = ctx.saved_tensors
            n = a.shape[1]
            k = torch.arange(n, dtype=a.dtype)
            probs = a / pm
            ga = (g[:, None] * (fest / probs[..., None] + cumsum(f) - k[None, :, None] * f)).sum(-1) / n
            gf = ((pm + (n - 1 - k) * a) / n)[..., None] * g[:, None]
            return ga, gf

    return _Published


_OfficialBiased = _published_estimator(_excl_cumsum)
_InclusivePort = _published_estimator(lambda x: torch.cumsum(x, dim=1))


def official_biased(a: Tensor, f: Tensor, replace: bool) -> Tensor:
    assert not replace
    return _OfficialBiased.apply(a, f)


def inclusive_port(a: Tensor, f: Tensor, replace: bool) -> Tensor:
    assert not replace
    return _InclusivePort.apply(a, f)


def naive_autograd(a: Tensor, f: Tensor, replace: bool) -> Tensor:
    """The without-replacement forward differentiated by autograd (inclusive cumsum, as the port
    writes it; the value equals the exclusive one, so autograd gives the same biased gradient)."""
    assert not replace
    pm = 1 - torch.cumsum(a, 1)
    fest = torch.cumsum(a[..., None] * f, 1) + pm[..., None] * f
    return fest.mean(1)


# ---------------------------------------------------------------------------------------------
# Exact enumeration
# ---------------------------------------------------------------------------------------------


def _enumerate(a: Tensor, n: int, replace: bool) -> tuple[Tensor, Tensor]:
    """Every ordered sample of n locations from a [K] (float64) and its probability."""
    support = [int(i) for i in torch.nonzero(a > 0).flatten()]
    rows, probs = [], []
    combos = itertools.product(support, repeat=n) if replace else itertools.permutations(support, n)
    for combo in combos:
        p, pm = 1.0, 1.0
        for i in combo:
            p *= float(a[i]) / (1.0 if replace else pm)
            pm -= float(a[i])
        rows.append(combo)
        probs.append(p)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(probs, dtype=torch.float64)


def _enumeration_errors(
    logits: Tensor,
    feats: Tensor,
    g: Tensor,
    n: int,
    replace: bool,
    *,
    eps: float = 0.0,
    mask: Tensor | None = None,
    estimator: Estimator = expectation,
) -> dict[str, float]:
    """Max abs errors of the exact expectations of the estimator's value and gradients."""
    lg = logits.clone().requires_grad_(True)
    fl = feats.clone().requires_grad_(True)
    m = None if mask is None else mask[None]
    att = smooth_attention(lg[None], mask=m, eps=eps)[0]
    a0 = att.detach()
    idx, prob = _enumerate(a0, n, replace)
    prob = prob.to(a0.dtype)
    # each enumerated sample is one row of the batch; rows are independent, so one backward of
    # sum_s p_s <g, out_s> gives the exact expectation of every per-sample gradient
    out = estimator(att[idx], fl[idx], replace)
    mean_out = (prob[:, None] * out).sum(0)
    grad_att, grad_logits, grad_f = torch.autograd.grad(mean_out @ g, [att, lg, fl])
    mean_out = mean_out.detach()

    lg2 = logits.clone().requires_grad_(True)
    true_att = smooth_attention(lg2[None], mask=m, eps=eps)[0]
    (true_grad_logits,) = torch.autograd.grad((true_att @ feats) @ g, [lg2])

    support = a0 > 0
    shift = (grad_att - feats @ g)[support]  # must be one constant (it vanishes in the softmax)
    return {
        "prob_sum": abs(float(prob.sum()) - 1.0),
        "value": float((mean_out - a0 @ feats).abs().max()),
        "features": float((grad_f - a0[:, None] * g[None, :]).abs().max()),
        "logits": float((grad_logits - true_grad_logits).abs().max()),
        "logits_rel": float((grad_logits - true_grad_logits).abs().max() / true_grad_logits.abs().max()),
        "shift": float(shift.max() - shift.min()),
    }


def _problem(k: int, d: int, seed: int, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen, dtype=torch.float64)
    if kind == "peaked":
        logits = 3.0 * logits
        logits[0] += 5.0  # most of the mass on one location
    feats = torch.randn(k, d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    return logits, feats, g


_CASES = [
    (k, n, replace, kind)
    for k in (2, 4, 6, 7)
    for n in (1, 2, 3)
    for replace in (False, True)
    for kind in ("random", "peaked")
    if replace or n <= k
]


@pytest.mark.parametrize(("k", "n", "replace", "kind"), _CASES)
def test_expectation_is_exactly_unbiased(k: int, n: int, replace: bool, kind: str) -> None:
    logits, feats, g = _problem(k, 4, seed=100 * k + 10 * n + int(replace), kind=kind)
    errors = _enumeration_errors(logits, feats, g, n, replace)
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("eps", [1e-4, 0.1])
def test_unbiased_through_smoothing_and_mask(replace: bool, eps: float) -> None:
    logits, feats, g = _problem(7, 4, seed=7, kind="random")
    mask = torch.tensor([True, False, True, True, False, True, True])
    errors = _enumeration_errors(logits, feats, g, 3, replace, eps=eps, mask=mask)
    assert max(errors.values()) < 1e-10, errors
    # masked locations get no gradient at all
    lg = logits.clone().requires_grad_(True)
    att = smooth_attention(lg[None], mask=mask[None], eps=eps)
    idx, a_k = sample(att, 3, replace, generator=torch.Generator().manual_seed(0))
    assert mask[idx].all()
    expectation(a_k, feats[idx], replace).sum().backward()
    assert lg.grad is not None
    assert (lg.grad[~mask] == 0).all()


def test_unbiased_in_float32() -> None:
    logits, feats, g = _problem(6, 4, seed=3, kind="random")
    errors = _enumeration_errors(logits.float(), feats.float(), g.float(), 3, False)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("estimator", [official_biased, inclusive_port, naive_autograd])
def test_published_estimators_fail_the_same_check(kind: str, estimator: Estimator) -> None:
    logits, feats, g = _problem(6, 4, seed=11, kind=kind)
    errors = _enumeration_errors(logits, feats, g, 3, False, estimator=estimator)
    # the forward value is right in every variant: only the gradients are biased
    assert errors["value"] < 1e-10
    # biased logit gradients: tens of percent of the true gradient's size, and d/da - <f, g> is
    # far from constant across locations (ours: both below 1e-10)
    assert errors["logits_rel"] > 5e-2, errors
    assert errors["shift"] > 1e-1, errors
    if estimator is inclusive_port:
        assert errors["features"] > 1e-2, errors
    else:
        assert errors["features"] < 1e-10, errors
    ours = _enumeration_errors(logits, feats, g, 3, False)
    assert ours["logits"] < 1e-10


# ---------------------------------------------------------------------------------------------
# Sampler statistics
# ---------------------------------------------------------------------------------------------

_ATT = torch.softmax(torch.tensor([0.5, -0.3, 1.0, 0.0, -1.0, 0.2]), dim=0)
_DRAWS = 200_000  # rows of the same attention in one call: expected cell counts >= ~150


def _chisquare_p(observed: Tensor, expected: Tensor) -> float:
    expected = expected * observed.sum() / expected.sum()
    return float(stats.chisquare(observed.double().numpy(), expected.double().numpy()).pvalue)


def _assert_pair_law(first: torch.Tensor, second: torch.Tensor, a: torch.Tensor, replace: bool) -> None:
    """The first two draws (index tensors over 0..k-1) follow the law of `sample` over attention a [k]:
    a_i a_j with replacement (repeats happen), a_i a_j / (1 - a_i) for j != i without (never a repeat)."""
    k = a.numel()
    a = a.double()
    obs = torch.bincount(first * k + second, minlength=k * k)
    repeats = int(obs[[i * k + i for i in range(k)]].sum())
    if replace:
        assert _chisquare_p(obs, torch.outer(a, a).flatten()) > 1e-3
        assert repeats > 0  # repeats do happen
        return
    assert repeats == 0
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    exp2 = torch.tensor([a[i] * a[j] / (1 - a[i]) for i, j in pairs])
    assert _chisquare_p(obs[[i * k + j for i, j in pairs]], exp2) > 1e-3


def test_without_replacement_follows_sequential_draws() -> None:
    k = _ATT.numel()
    att = _ATT.expand(_DRAWS, k)
    idx, a_k = sample(att, 3, False, generator=torch.Generator().manual_seed(1234))
    assert idx.shape == (_DRAWS, 3) and idx.dtype == torch.long
    torch.testing.assert_close(a_k, att.gather(1, idx))
    a = _ATT.double()
    # P(first = i) = a_i
    assert _chisquare_p(torch.bincount(idx[:, 0], minlength=k), a) > 1e-3
    # P(first = i, second = j) = a_i a_j / (1 - a_i), j != i
    _assert_pair_law(idx[:, 0], idx[:, 1], _ATT, replace=False)
    # P(third = l | first = i, second = j) = a_l / (1 - a_i - a_j)
    triples = list(itertools.permutations(range(k), 3))
    code = (idx[:, 0] * k + idx[:, 1]) * k + idx[:, 2]
    obs3 = torch.bincount(code, minlength=k**3)[[(i * k + j) * k + m for i, j, m in triples]]
    assert int(obs3.sum()) == _DRAWS
    exp3 = torch.tensor([a[i] * a[j] / (1 - a[i]) * a[m] / (1 - a[i] - a[j]) for i, j, m in triples])
    assert _chisquare_p(obs3, exp3) > 1e-3


def test_with_replacement_draws_are_independent_categorical() -> None:
    k = _ATT.numel()
    idx, _ = sample(_ATT.expand(_DRAWS, k), 2, True, generator=torch.Generator().manual_seed(99))
    _assert_pair_law(idx[:, 0], idx[:, 1], _ATT, replace=True)


@pytest.mark.parametrize("replace", [False, True])
def test_a_long_sparse_row_is_drawn_among_its_non_zero_entries_with_the_same_law(
        replace: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sample` on one long, mostly-zero row draws among the non-zero entries: same pair law, never a zero."""
    monkeypatch.setattr(sampling_mod, "SPARSE_ABOVE", 8)
    k = _ATT.numel()
    row = torch.zeros(1, 4 * k)
    where = torch.arange(k) * 4 + 1  # a quarter of the row is non-zero: the sparse path
    row[0, where] = _ATT
    gen = torch.Generator().manual_seed(7)
    draws = 20_000
    idx = torch.cat([sample(row, 2, replace, generator=gen)[0] for _ in range(draws)])
    assert torch.isin(idx, where).all()
    pos = torch.searchsorted(where, idx)  # back to 0..k-1
    _assert_pair_law(pos[:, 0], pos[:, 1], _ATT, replace=replace)
    last, a_k = sample(row, 2, replace, generator=gen)
    torch.testing.assert_close(a_k, row.gather(1, last))


def test_sampling_rejects_a_wrong_sampler() -> None:
    """The chi-square check has power: uniform draws fail it."""
    k = _ATT.numel()
    first = torch.randint(0, k, (_DRAWS,), generator=torch.Generator().manual_seed(0))
    assert _chisquare_p(torch.bincount(first, minlength=k), _ATT.double()) < 1e-3


# ---------------------------------------------------------------------------------------------
# Sampler edge cases
# ---------------------------------------------------------------------------------------------


def _masked_attention() -> tuple[Tensor, Tensor]:
    mask = torch.tensor([[True, False, True, True, False, True, False, True]] * 64)
    mask[1] = False  # one row with no tissue: falls back to all locations
    logits = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5))
    return smooth_attention(logits, mask=mask, eps=1e-4), mask


@pytest.mark.parametrize("replace", [False, True])
def test_sample_never_picks_masked_and_never_repeats(replace: bool) -> None:
    att, mask = _masked_attention()
    att = att[[0, 2, 3]]  # rows with 5 allowed locations
    idx, _ = sample(att.repeat(1000, 1), 5, replace, generator=torch.Generator().manual_seed(3))
    allowed = torch.tensor([0, 2, 3, 5, 7])
    assert torch.isin(idx, allowed).all()
    if not replace:
        # n equal to the number of allowed locations: each row is a permutation of them
        assert (idx.sort(dim=1).values == allowed).all()


def test_sample_raises_when_n_exceeds_nonzero_locations() -> None:
    att, _ = _masked_attention()
    with pytest.raises(ValueError, match=r"cannot pick 6 distinct.*row 0.*only 5"):
        sample(att, 6, False)
    with pytest.raises(ValueError, match="cannot pick 6 distinct"):
        topk(att, 6)
    idx, _ = sample(att, 6, True)  # with replacement, repeats are the point
    assert idx.shape == (64, 6)
    with pytest.raises(ValueError, match="all zero"):
        sample(torch.zeros(2, 4), 1, True)
    with pytest.raises(ValueError, match=">= 1"):
        sample(att, 0, False)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        sample(att[0], 2, False)
    for bad in (-0.1, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite and non-negative"):
            sample(torch.tensor([[0.5, bad, 0.6]]), 1, False)


@pytest.mark.parametrize("replace", [False, True])
def test_generator_makes_sampling_reproducible(replace: bool) -> None:
    att, _ = _masked_attention()
    first, _ = sample(att, 4, replace, generator=torch.Generator().manual_seed(42))
    again, _ = sample(att, 4, replace, generator=torch.Generator().manual_seed(42))
    other, _ = sample(att, 4, replace, generator=torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampled_attention_keeps_autograd() -> None:
    logits = torch.randn(3, 10, requires_grad=True)
    att = smooth_attention(logits)
    idx, a_k = sample(att, 4, False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a_k, att.gather(1, idx))
    a_k.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_topk_is_descending_and_deterministic() -> None:
    att, mask = _masked_attention()
    idx, a_k = topk(att, 4)
    assert (a_k[:, :-1] >= a_k[:, 1:]).all()
    torch.testing.assert_close(a_k, att.sort(dim=1, descending=True).values[:, :4])
    assert torch.equal(idx, topk(att, 4)[0])
    assert mask.gather(1, idx)[[0, 2, 3]].all()


@pytest.mark.parametrize("k", [10, 33, 64, 100])
def test_blocked_top_indices_equal_torch_topk(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long rows are ranked block by block (memory); the indices must be torch.topk's, in order."""
    monkeypatch.setattr(sampling_mod, "TOPK_BLOCK", 4)
    gen = torch.Generator().manual_seed(k)
    x = torch.rand(3, k, generator=gen)
    x[1, -3:] = 2.0 + torch.arange(3.0)  # the winners in the last, partial block
    x[2, :2] = torch.tensor([6.0, 5.0])  # and in the first
    for n in (1, 3, 4):
        assert torch.equal(sampling_mod._top_indices(x, n), torch.topk(x, n).indices)
    att = smooth_attention(torch.randn(2, k, generator=gen))
    a = sample(att, 4, False, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sampling_mod, "TOPK_BLOCK", 1 << 16)
    b = sample(att, 4, False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(topk(att, 4)[0], torch.topk(att, 4).indices)


def test_inference_shortcuts_equal_the_differentiable_formulas() -> None:
    """Without autograd, smoothing and entropy run in place / fused; the numbers must not change."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(4, 50, generator=torch.Generator().manual_seed(4)) < 0.6
    mask[1] = False
    for eps in (0.0, 1e-4, 0.3):
        graph = smooth_attention(logits.clone().requires_grad_(True), mask=mask, eps=eps)
        with torch.no_grad():
            plain = smooth_attention(logits, mask=mask, eps=eps)
        assert torch.equal(plain, graph.detach())
        torch.testing.assert_close(entropy(plain), entropy(graph).detach(), rtol=1e-6, atol=0)
    assert float(entropy(torch.tensor([[0.0, 0.25, 0.75]]))) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


# ---------------------------------------------------------------------------------------------
# Attention distributions and entropy
# ---------------------------------------------------------------------------------------------


def test_smooth_attention_properties() -> None:
    att, mask = _masked_attention()
    eff, fell_back = effective_mask(mask)
    assert fell_back.tolist() == [i == 1 for i in range(64)]
    assert eff[1].all() and torch.equal(eff[0], mask[0])
    torch.testing.assert_close(att.sum(1), torch.ones(64))
    floor = 1e-4 / eff.sum(1, keepdim=True)  # eps / K_allowed
    assert ((att >= floor * (1 - 1e-6)) | ~eff).all()
    assert (att[~eff] == 0).all()  # exactly zero, not just small
    logits = torch.randn(2, 5)
    torch.testing.assert_close(smooth_attention(logits, eps=0.0), torch.softmax(logits, 1))
    torch.testing.assert_close(smooth_attention(logits, eps=0.5), 0.5 * torch.softmax(logits, 1) + 0.1)
    none = torch.zeros(2, 5, dtype=torch.bool)
    torch.testing.assert_close(smooth_attention(logits, mask=none), smooth_attention(logits))
    assert smooth_attention(logits.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="eps"):
        smooth_attention(logits, eps=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        smooth_attention(logits, mask=none[:, :3])


def test_smooth_attention_of_a_large_view_on_its_tissue_is_the_masked_softmax() -> None:
    """Inference on a row of more than SPARSE_ABOVE cells, mostly off the mask, takes the softmax over the allowed
    cells alone: the same attention as the masked softmax over the row (exact zeros off the mask, rows sum to
    1); with gradient, or a row mostly on the mask, the masked softmax itself."""
    k = SPARSE_ABOVE * 3
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, k, generator=gen) * 3
    mask = torch.rand(1, k, generator=gen) < 0.2
    expected = (1 - 1e-4) * torch.softmax(logits.masked_fill(~mask, -math.inf), -1) + 1e-4 / mask.sum()
    expected = expected.masked_fill(~mask, 0.0)
    with torch.no_grad():
        att = smooth_attention(logits, mask=mask)
    torch.testing.assert_close(att, expected, rtol=1e-5, atol=1e-12)
    assert (att[~mask] == 0).all() and float(att.sum()) == pytest.approx(1.0, abs=1e-5)
    with_grad = smooth_attention(logits.clone().requires_grad_(), mask=mask)
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-12)
    dense = torch.rand(1, k, generator=gen) < 0.9
    with torch.no_grad():
        torch.testing.assert_close(smooth_attention(logits, mask=dense).sum(), torch.tensor(1.0))


def test_uniform_attention() -> None:
    torch.testing.assert_close(uniform_attention(None, (2, 4)), torch.full((2, 4), 0.25))
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    att = uniform_attention(mask, mask.shape)
    torch.testing.assert_close(att, torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25] * 4]))
    with pytest.raises(ValueError, match="differs"):
        uniform_attention(mask, (2, 5))


def test_entropy() -> None:
    mask = torch.tensor([[True] * 3 + [False] * 5, [True] * 8])
    att = uniform_attention(mask, mask.shape).requires_grad_(True)
    torch.testing.assert_close(entropy(att), torch.tensor([math.log(3), math.log(8)]))
    entropy(att).sum().backward()
    assert att.grad is not None and torch.isfinite(att.grad).all()
    assert float(entropy(torch.tensor([[0.0, 1.0, 0.0]]))[0]) == 0.0
    logits = torch.randn(2, 8, requires_grad=True)
    att2 = smooth_attention(logits, mask=mask, eps=0.0)
    entropy(att2).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# Estimators: gradients, shapes, AMP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replace", [False, True])
def test_feature_gradient_is_the_true_derivative(replace: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    att = smooth_attention(torch.randn(3, 9, generator=gen, dtype=torch.float64))
    _, a_k = sample(att, 4, replace, generator=gen)
    f = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: expectation(a_k, x, replace), (f,))


@pytest.mark.parametrize("replace", [False, True])
def test_attention_gradient_is_a_score_function_not_the_derivative(replace: bool) -> None:
    """d/da is the unbiased score-function gradient, deliberately not d(forward)/da, so
    gradcheck w.r.t. the attention must fail; with replacement it equals autograd of the
    surrogate mean_k (a_k / stopgrad(a_k)) f_k."""
    gen = torch.Generator().manual_seed(1)
    att = smooth_attention(torch.randn(3, 9, generator=gen, dtype=torch.float64))
    _, a_k = sample(att, 4, replace, generator=gen)
    a_k = a_k.detach().requires_grad_(True)
    f = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    assert not torch.autograd.gradcheck(lambda x: expectation(x, f, replace), (a_k,), raise_exception=False)
    if replace:
        g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        (ours,) = torch.autograd.grad((expectation(a_k, f, True) * g).sum(), a_k)
        surrogate = ((a_k / a_k.detach())[..., None] * f).mean(1)
        (ref,) = torch.autograd.grad((surrogate * g).sum(), a_k)
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("replace", [False, True])
def test_expectation_shapes_and_weights_sum_to_one(replace: bool) -> None:
    att, _ = _masked_attention()
    _, a_k = sample(att, 3, replace, generator=torch.Generator().manual_seed(2))
    v = torch.randn(2, 7)
    const = v.expand(64, 3, 2, 7)  # trailing dims are kept; constant features -> the constant
    out = expectation(a_k, const, replace)
    assert out.shape == (64, 2, 7)
    torch.testing.assert_close(out, v.expand(64, 2, 7))
    with pytest.raises(ValueError, match="features must have shape"):
        expectation(a_k, torch.randn(64, 4, 7), replace)
    with pytest.raises(ValueError, match=r"\[B, n\]"):
        expectation(a_k[0], torch.randn(3, 7), replace)


def test_estimate_topk() -> None:
    att, _ = _masked_attention()
    _, a_k = topk(att, 3)
    f = torch.randn(64, 3, 6)
    out = estimate_topk(a_k, f)
    torch.testing.assert_close(out, expectation(a_k, f, False))
    a = a_k.double()
    pm = torch.stack([torch.ones(64, dtype=torch.float64), 1 - a[:, 0], 1 - a[:, 0] - a[:, 1]], 1)
    fest = [pm[:, 0, None] * f[:, 0], a[:, :1] * f[:, 0] + pm[:, 1, None] * f[:, 1]]
    fest.append(a[:, :1] * f[:, 0] + a[:, 1:2] * f[:, 1] + pm[:, 2, None] * f[:, 2])
    torch.testing.assert_close(out.double(), sum(fest) / 3, rtol=1e-5, atol=1e-6)
    assert torch.equal(estimate_topk(a_k, f), out)  # deterministic


@pytest.mark.parametrize("replace", [False, True])
def test_expectation_under_cpu_autocast(replace: bool) -> None:
    torch.manual_seed(0)
    att_net = torch.nn.Linear(16, 12)
    feat_net = torch.nn.Linear(8, 5)
    view = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = att_net(view)
        assert logits.dtype == torch.bfloat16
        att = smooth_attention(logits, eps=1e-4)
        idx, a_k = sample(att, 3, replace, generator=torch.Generator().manual_seed(0))
        feats = feat_net(torch.randn(2, 3, 8))
        assert feats.dtype == torch.bfloat16
        out = expectation(a_k, feats, replace)
        loss = out.square().sum() - 1e-2 * entropy(att).sum()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    loss.backward()
    for p in [*att_net.parameters(), *feat_net.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0



@pytest.mark.parametrize("replace", [True, False])
def test_estimate_weights_are_the_feature_coefficients(replace: bool) -> None:
    """The weight reported next to each patch is d estimate / d f_k (a scalar per patch), sums to 1."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(3, 12, dtype=torch.float64), -1)
    idx, a_k = sample(a, 4, replace, generator=torch.Generator().manual_seed(1))
    f = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    expectation(a_k, f, replace).sum().backward()
    w = estimate_weights(a_k, replace)
    torch.testing.assert_close(f.grad, w[..., None].expand_as(f))
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64))
