"""KL estimators, per-token reward placement, score shaping and the KL controllers (spec invariants 6, 12, 13)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_controller,
    kl_per_token,
    last_token_index,
    shape_scores,
    token_rewards,
)

# ------------------------------------------------------------------ estimators


def test_k1_and_k3_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    k1 = kl_per_token(logp, ref, mask, "k1")
    assert k1.tolist() == [[0.5, -1.0, 0.0]]
    k3 = kl_per_token(logp, ref, mask, "k3")
    # rho = pi_ref / pi; k3 = (rho - 1) - log rho
    for t, (lp, lr) in enumerate(zip(logp[0].tolist(), ref[0].tolist(), strict=True)):
        rho = math.exp(lr - lp)
        assert k3[0, t].item() == pytest.approx((rho - 1) - math.log(rho), abs=1e-12)


def test_k3_non_negative_and_masked():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 9) - 2, torch.randn(4, 9) - 2
    mask = (torch.arange(9)[None] < torch.tensor([9, 5, 1, 3])[:, None]).float()
    k1 = kl_per_token(logp, ref, mask, "k1")
    k3 = kl_per_token(logp, ref, mask, "k3")
    assert (k3 >= 0).all()
    assert (k1 < 0).any()  # k1 is unbiased but can be negative per token
    pad = ~mask.bool()
    assert (k1[pad] == 0).all() and (k3[pad] == 0).all()
    assert torch.allclose(k1, (logp - ref) * mask)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_exactly_zero_when_logprobs_equal(estimator):
    torch.manual_seed(1)
    logp = torch.randn(3, 5) - 3
    k = kl_per_token(logp, logp.clone(), torch.ones(3, 5), estimator)
    assert torch.equal(k, torch.zeros(3, 5))


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="^estimator='k2'; choose one of k1, k3"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), "k2")


# ------------------------------------------------------------------ reward placement (invariant 6)


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0, 0]


def test_token_rewards_placement():
    beta = 0.1
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # EOS in the middle
            [1, 1, 1, 1, 1],  # EOS at the last column (or ran out of budget)
            [1, 0, 0, 0, 0],  # length 1
            [1, 1, 0, 0, 0],
        ]
    ).float()
    torch.manual_seed(2)
    kl = torch.randn(4, 5) * mask
    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rewards, non_score = token_rewards(scores, kl, mask, beta)
    assert torch.equal(non_score, -beta * kl * mask)
    ends = [2, 4, 0, 1]
    for b, t_end in enumerate(ends):
        for t in range(5):
            if t < t_end:
                expected = -beta * kl[b, t].item()
            elif t == t_end:
                expected = -beta * kl[b, t].item() + scores[b].item()
            else:
                expected = 0.0
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6), (b, t)
    # the score appears once per row: the row sums are score + non-score sums
    assert torch.allclose(rewards.sum(1), scores + non_score.sum(1), atol=1e-6)


def test_token_rewards_ignore_kl_on_padding():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.5, 0.25, 99.0]])  # unmasked garbage after t_end
    rewards, _ = token_rewards(torch.tensor([1.0]), kl, mask, beta=0.2)
    assert rewards.tolist()[0] == pytest.approx([-0.1, 1.0 - 0.05, 0.0])


# ------------------------------------------------------------------ score shaping (invariant 12)


def test_shape_scores_missing_eos_modes():
    scores = torch.tensor([2.0, 2.0, -0.5, 0.3])
    ended = torch.tensor([True, False, False, True])
    assert shape_scores(scores, ended, missing_eos="replace", missing_eos_penalty=1.0).tolist() == [
        2.0,
        -1.0,
        -1.0,
        pytest.approx(0.3),
    ]
    assert shape_scores(scores, ended, missing_eos="subtract", missing_eos_penalty=1.5).tolist() == [
        2.0,
        0.5,
        -2.0,
        pytest.approx(0.3),
    ]
    assert torch.equal(shape_scores(scores, ended, missing_eos="none"), scores)
    with pytest.raises(ValueError, match="^missing_eos='drop'; choose one of none, replace, subtract"):
        shape_scores(scores, ended, missing_eos="drop")


def test_shape_scores_clipping_after_penalty():
    scores = torch.tensor([12.0, -9.0, 3.0, -4.5])
    ended = torch.tensor([True, True, True, False])
    assert shape_scores(scores, ended, missing_eos="none", clip=5.0).tolist() == [5.0, -5.0, 3.0, -4.5]
    # penalty first, then clip: -4.5 - 2 = -6.5 -> -5
    assert shape_scores(
        scores, ended, missing_eos="subtract", missing_eos_penalty=2.0, clip=5.0
    ).tolist() == [
        5.0,
        -5.0,
        3.0,
        -5.0,
    ]
    # clip = 0 disables clipping
    assert torch.equal(
        shape_scores(scores, torch.ones(4, dtype=torch.bool), missing_eos="none", clip=0), scores
    )


# ------------------------------------------------------------------ KL controllers (invariant 13)


# beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al.): with target 6, horizon 10,000 and
# n = 512 episodes, n / horizon = 0.0512, so the change is at most +-1.024%; by hand for each kl:
@pytest.mark.parametrize(
    "kl, change",
    [
        (0.0, -0.01024),  # error -1, clipped to -0.2
        (3.0, -0.01024),  # error -0.5, clipped
        (5.9, -0.1 / 6 * 0.0512),  # error -1/60, inside the clip
        (6.0, 0.0),  # on target
        (6.3, 0.05 * 0.0512),  # error +0.05
        (12.0, 0.01024),  # error +1, clipped to +0.2
        (100.0, 0.01024),
    ],
)
def test_adaptive_kl_moves_beta_the_right_way_bounded(kl, change):
    ctl = kl_controller("adaptive", 0.1, 6.0, 10_000)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(kl, 512)
    assert ctl.value / 0.1 - 1 == pytest.approx(change, abs=1e-12)


def test_adaptive_kl_saturates_at_the_bound_and_converges_direction():
    ctl = AdaptiveKLController(0.05, target=1.0, horizon=100)
    values = [ctl.value]
    for _ in range(5):
        ctl.update(50.0, 10)  # far above target: +20% * 10/100 = +2% each time
        values.append(ctl.value)
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert ratios == pytest.approx([1.02] * 5)
    ctl.update(0.0, 10)  # far below: -2%
    assert ctl.value / values[-1] == pytest.approx(0.98)


def test_fixed_kl_controller_never_moves():
    ctl = kl_controller("fixed", 0.02, target=6.0, horizon=10_000)
    assert isinstance(ctl, FixedKLController)
    for kl in (0.0, 1.0, 1e6, -5.0):
        ctl.update(kl, 512)
        assert ctl.value == 0.02


def test_kl_controller_bad_arguments():
    # a pure module names its own arguments, never a config key (the recipe's business)
    with pytest.raises(ValueError, match="kind='pid'; choose one of fixed, adaptive") as e:
        kl_controller("pid", 0.1, 6.0, 10_000)
    assert "stage." not in str(e.value)
    with pytest.raises(ValueError, match=r"target > 0 .* got 0.0, 10000"):
        kl_controller("adaptive", 0.1, 0.0, 10_000)
    with pytest.raises(ValueError, match=r"horizon > 0.* got 6.0, 0"):
        kl_controller("adaptive", 0.1, 6.0, 0)
