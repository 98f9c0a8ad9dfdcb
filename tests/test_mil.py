"""Tests of the needle-finding pieces: gated attention pooling, the exploration mixture, informative
selection and the view-attention distillation target (wsiats/mil.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from wsiats import mil, sampling


def test_gated_pool_weights_sum_to_one_and_pool_is_their_mix() -> None:
    torch.manual_seed(0)
    pool = mil.GatedAttentionPool(8, hidden=4)
    f = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    z, alpha = pool(f)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0))
    torch.testing.assert_close(z, alpha @ f)
    torch.testing.assert_close(alpha, torch.softmax(pool.score(f), 0))


def test_gated_pool_lets_one_patch_dominate() -> None:
    """A head that scores one feature direction high gives that patch almost all the weight."""
    pool = mil.GatedAttentionPool(2, hidden=1)
    with torch.no_grad():
        pool.value.weight.copy_(torch.tensor([[10.0, 0.0]]))
        pool.value.bias.zero_()
        pool.gate.weight.zero_()
        pool.gate.bias.fill_(10.0)
        pool.out.weight.fill_(10.0)
        pool.out.bias.zero_()
    f = torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 19)
    with torch.no_grad():
        z, alpha = pool(f)
    assert float(alpha[0]) > 0.99
    assert float(z[0]) > 0.99


def test_gated_pool_rejects_empty() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        mil.GatedAttentionPool(3)(torch.zeros(0, 3))


def test_mixture_is_a_distribution_zero_off_tissue() -> None:
    mask = torch.tensor([[True, True, False, True]])
    a = sampling.smooth_attention(torch.tensor([[3.0, 0.0, 9.0, -1.0]]), mask=mask)
    q = mil.exploration_mixture(a, mask, 0.25)
    torch.testing.assert_close(q.sum(-1), torch.ones(1))
    assert float(q[0, 2]) == 0.0
    # every tissue cell keeps at least rho / K_tissue
    assert bool((q[0, mask[0]] >= 0.25 / 3 - 1e-7).all())
    torch.testing.assert_close(mil.exploration_mixture(a, mask, 0.0), a)
    with pytest.raises(ValueError, match="rho"):
        mil.exploration_mixture(a, mask, 1.5)


def test_candidates_from_the_mixture_are_an_exact_draw_without_replacement() -> None:
    """Gumbel top-k on log q draws an ordered sample without replacement from q: the empirical frequency
    of each ordered pair matches its exact probability q_i q_j / (1 - q_i), enumerated."""
    mask = torch.tensor([[True, True, True, False, True]])
    a = sampling.smooth_attention(torch.tensor([[2.0, 0.0, -1.0, 5.0, 1.0]]), mask=mask)
    q = mil.exploration_mixture(a, mask, 0.3)[0].double()
    exact = {}
    for i, j in itertools.permutations(range(5), 2):
        exact[(i, j)] = float(q[i] * q[j] / (1 - q[i])) if q[i] > 0 and q[j] > 0 else 0.0
    assert abs(sum(exact.values()) - 1.0) < 1e-6  # q comes from float32 attention
    g = torch.Generator().manual_seed(0)
    draws = 40000
    counts: dict[tuple[int, int], int] = {}
    qb = q.float()[None].expand(draws, -1).contiguous()
    idx, _ = sampling.sample(qb, 2, False, generator=g)
    for i, j in idx.tolist():
        counts[(i, j)] = counts.get((i, j), 0) + 1
    for pair, p in exact.items():
        se = (p * (1 - p) / draws) ** 0.5
        assert abs(counts.get(pair, 0) / draws - p) <= 5 * se + 1e-4, pair


def test_distinct_patches_keeps_the_first_of_each_content_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    texture = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    blank = torch.zeros(3, 8, 8, dtype=torch.uint8)
    one_off = blank.clone()
    one_off[1, 4, 4] = 1  # a single value apart: distinct
    patches = torch.stack([blank, texture[0], blank, texture[1], one_off, texture[0], blank, texture[2]])
    assert mil.distinct_patches(patches).tolist() == [0, 1, 3, 4, 7]
    assert mil.distinct_patches(texture).tolist() == [0, 1, 2]
    assert mil.distinct_patches(patches.float() / 255).tolist() == [0, 1, 3, 4, 7]  # any dtype
    assert mil.distinct_patches(patches[:0]).tolist() == []
    # large patches are first told apart on a strided sample of their values: two that agree there but
    # differ at one value off the sample (flat index 1) are still both kept; exact copies are not
    big = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    big[1].view(-1)[1] = 7
    big[3] = big[1]
    assert mil.distinct_patches(big).tolist() == [0, 1]


def test_select_informative_takes_the_highest_scores_first() -> None:
    s = torch.tensor([0.1, 3.0, -2.0, 2.5, 0.0])
    assert mil.select_informative(s, 2).tolist() == [1, 3]
    assert sorted(mil.select_informative(s, 10).tolist()) == [0, 1, 2, 3, 4]


def test_distillation_gradient_raises_attention_where_scores_are_high() -> None:
    logits = torch.zeros(1, 6, requires_grad=True)
    a = sampling.smooth_attention(logits)
    cand = torch.tensor([0, 2, 4])
    scores = torch.tensor([5.0, 0.0, -5.0])
    loss = mil.distillation_loss(a[0, cand], scores, top=1)
    loss.backward()
    g = logits.grad[0]
    assert float(g[0]) < 0 < float(g[4])  # descent raises cell 0, lowers cell 4
    assert float(g[2]) > 0
    assert float(g[1]) == pytest.approx(0.0, abs=1e-6)  # not a candidate: softmax over candidates only


def test_distillation_target_is_the_top_scores_weighted_by_their_contrast() -> None:
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    scores = torch.tensor([3.0, -1.0, 2.0, 0.0])
    want = -(torch.log(a[[0, 2]] / a.sum())).mean() * mil.score_contrast(scores)
    torch.testing.assert_close(mil.distillation_loss(a, scores, top=2), want)
    # scores 100x sharper: only the best still stands out (softmax weight >= 1/M), and it weighs more
    sharper_scores = mil.distillation_loss(a, 100 * scores, top=2) / mil.score_contrast(100 * scores)
    torch.testing.assert_close(sharper_scores, -torch.log(a[0] / a.sum()))
    assert float(mil.score_contrast(100 * scores)) > float(mil.score_contrast(scores))
    # lower when the attention is on the top candidates, and it keeps falling as it concentrates
    on_top = mil.distillation_loss(torch.tensor([0.45, 0.05, 0.45, 0.05]), scores, top=2)
    sharper = mil.distillation_loss(torch.tensor([0.495, 0.005, 0.495, 0.005]), scores, top=2)
    assert float(sharper) < float(on_top) < float(mil.distillation_loss(a, scores, top=2))
    with pytest.raises(ValueError, match="top must be >= 1"):
        mil.distillation_loss(a, scores, top=0)


def test_flat_scores_teach_the_attention_nothing() -> None:
    """A slide where nothing stands out (flat instance scores) gives no distillation loss and no gradient."""
    logits = torch.randn(1, 50, requires_grad=True)
    a = sampling.smooth_attention(logits)
    loss = mil.distillation_loss(a[0, :20], torch.zeros(20), top=4)
    assert abs(loss.item()) < 1e-6  # float32 rounding of 1 - H/log M
    loss.backward()
    assert float(logits.grad.abs().max()) < 1e-6
    assert float(mil.score_contrast(torch.zeros(7))) == pytest.approx(0.0, abs=1e-6)
    assert float(mil.score_contrast(torch.tensor([50.0] + [0.0] * 9))) == pytest.approx(1.0, abs=1e-6)
    mid = float(mil.score_contrast(torch.tensor([2.0] + [0.0] * 9)))
    assert 0.0 < mid < 1.0


def test_stratified_uniform_gives_each_group_equal_mass() -> None:
    import numpy as np

    strata = np.array([[0, 0, 0, 1], [-1, 2, 0, 0]], np.int16)
    p = mil.stratified_uniform(strata)
    assert p.dtype == np.float32 and p.shape == strata.shape
    assert abs(float(p.sum()) - 1.0) < 1e-6
    assert float(p[1, 0]) == 0.0
    for label in (0, 1, 2):
        assert abs(float(p[strata == label].sum()) - 1 / 3) < 1e-6
    assert len(set(p[strata == 0].tolist())) == 1  # uniform inside a group
    assert float(mil.stratified_uniform(np.full((2, 2), -1, np.int16)).sum()) == 0.0


def test_exploration_prior_explores_rare_tissue_as_much_as_common() -> None:
    """A purple aggregate covering 1% of the tissue gets a share of the exploration that does not
    depend on its area (at least 1/k), while uniform exploration would give it 1%."""
    import numpy as np

    rng = np.random.default_rng(0)
    image = np.empty((100, 100, 3), np.uint8)
    image[:] = (230, 160, 190)
    image[:, :50] = (215, 140, 180)
    image[40:50, 40:50] = (130, 80, 160)  # 100 of 10,000 cells
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    mask = np.ones((100, 100), bool)
    mask[:, 95:] = False
    prior = mil.exploration_prior(image, mask)
    assert abs(float(prior.sum()) - 1.0) < 1e-5
    assert float(prior[~mask].sum()) == 0.0
    assert float(prior[40:50, 40:50].sum()) >= 1 / 8 - 1e-6
    again = mil.exploration_prior(image, mask)
    assert np.array_equal(prior, again)  # deterministic


def test_distillation_target_holds_only_the_candidates_that_stand_out() -> None:
    """One informative candidate among flat ones: the target is that one, not `top` cells of background.

    (A fixed count of targets pulled a needle run's attention back to uniform once it had learnt.)"""
    a = torch.full((8,), 1 / 8)
    scores = torch.tensor([0.0, 0.1, 8.0, 0.2, 0.0, 0.1, 0.0, 0.3])
    only_the_needle = -torch.log(a[2] / a.sum()) * mil.score_contrast(scores)
    torch.testing.assert_close(mil.distillation_loss(a, scores, top=4), only_the_needle)
    logits = torch.zeros(1, 8, requires_grad=True)
    mil.distillation_loss(sampling.smooth_attention(logits)[0], scores, top=4).backward()
    assert float(logits.grad[0, 2]) < 0  # raised
    assert all(float(logits.grad[0, i]) > 0 for i in range(8) if i != 2)  # every background cell lowered
    # two that stand out and two that do not: the target is the two
    scores = torch.tensor([5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    two = -torch.log(a[[0, 1]] / a.sum()).mean() * mil.score_contrast(scores)
    torch.testing.assert_close(mil.distillation_loss(a, scores, top=4), two)


def test_instance_loss_teaches_the_label_on_the_patches_most_telling_of_it() -> None:
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], requires_grad=True)
    loss = mil.instance_loss(logits, 1, top=2)
    logp = torch.log_softmax(logits.detach(), dim=-1)
    assert torch.isclose(loss, -(logp[0, 1] + logp[2, 1]) / 2)  # patches 0 and 2 score highest for class 1
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[[1, 3]].abs().sum() == 0 and logits.grad[[0, 2]].abs().sum() > 0  # only the chosen learn
    assert logits.grad[0, 1] < 0 and logits.grad[2, 1] < 0  # descent raises their label's logit


def test_instance_loss_weights_by_class_and_takes_all_patches_when_fewer_than_top() -> None:
    logits = torch.randn(1, 2)
    plain = mil.instance_loss(logits, 0, top=2)
    assert torch.isclose(plain, -torch.log_softmax(logits, -1)[0, 0])
    assert torch.isclose(mil.instance_loss(logits, 0, top=2, weight=torch.tensor([3.0, 1.0])), 3 * plain)
    with pytest.raises(ValueError):
        mil.instance_loss(torch.randn(0, 2), 0)


def test_select_for_gradient_takes_the_best_then_other_candidates_at_random() -> None:
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 0.0, 3.0, 0.4])
    gen = torch.Generator().manual_seed(0)
    draws = [mil.select_for_gradient(scores, 4, 0.5, generator=gen) for _ in range(400)]
    for keep in draws:
        assert keep[:2].tolist() == [1, 3] and len(set(keep.tolist())) == 4  # the two best, highest first
    rest = torch.cat([k[2:] for k in draws])
    counts = torch.bincount(rest, minlength=8)
    assert counts[[1, 3]].sum() == 0  # the random share is drawn from the OTHER candidates
    others = counts[[0, 2, 4, 5, 6, 7]].float()
    assert (others / others.sum() - 1 / 6).abs().max() < 0.05  # uniformly (800 draws: sd ~0.013)
    assert torch.equal(mil.select_for_gradient(scores, 3, 0.0), mil.select_informative(scores, 3))
    assert sorted(mil.select_for_gradient(scores, 20, 0.5, generator=gen).tolist()) == list(range(8))
    with pytest.raises(ValueError):
        mil.select_for_gradient(scores, 2, 1.5)
