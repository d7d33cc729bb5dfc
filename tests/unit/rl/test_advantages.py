"""Masked statistics, whitening and GAE over response tokens (spec invariants 7 and 8)."""

from __future__ import annotations

import pytest
import torch

from alignlab.rl.advantages import (
    explained_variance,
    gae,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

LENGTHS = [7, 3, 1, 5, 7]  # ragged rows: full, short, length 1, middle, full


def ragged(lengths=LENGTHS, T: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)
    return rewards, values, mask


def reference_gae(rewards, values, lengths, gamma, lam):
    """The textbook loop, row by row, over real tokens only: V = 0 after the episode's last token."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_reference_loop(gamma, lam):
    rewards, values, mask = ragged()
    # garbage on padding must be ignored
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 123.0))
    values = torch.where(mask.bool(), values, torch.full_like(values, -77.0))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = reference_gae(rewards, values, LENGTHS, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-12)
    pad = ~mask.bool()
    assert (adv[pad] == 0).all() and (ret[pad] == 0).all()


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = ragged(seed=1)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = sum_{u >= t} r_u - V_t over the real tokens of each row
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    expected = (to_go - values) * mask
    assert torch.allclose(adv, expected, atol=1e-12)
    # returns = A + V = reward-to-go
    assert torch.allclose(ret, to_go * mask, atol=1e-12)


def test_gae_single_token_episode():
    rewards = torch.tensor([[2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist() == [[1.5, 0.0, 0.0]]  # r - V, no bootstrap from the padding's values
    assert ret.tolist() == [[2.0, 0.0, 0.0]]


def test_gae_float32_and_integer_mask():
    rewards, values, mask = ragged(seed=2)
    adv64, _ = gae(rewards, values, mask, 1.0, 0.95)
    adv32, ret32 = gae(rewards.float(), values.float(), mask.long(), 1.0, 0.95)
    assert adv32.dtype == torch.float32 and ret32.dtype == torch.float32
    assert torch.allclose(adv32.double(), adv64, atol=1e-5)


def test_masked_sum_mean_var_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == 6.0
    assert masked_mean(x, mask).item() == 2.0
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 3.0]
    assert masked_sum(x, mask, dim=1).tolist() == [3.0, 3.0]
    # unbiased (Bessel): ((1-2)^2 + 0 + (3-2)^2) / 2 = 1; biased: 2/3
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    # all-padding row along dim: 0, not NaN
    assert masked_mean(x, torch.zeros_like(mask), dim=1).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("n_valid", [0, 1])
def test_masked_var_needs_two_valid_tokens(n_valid):
    x = torch.randn(2, 4)
    mask = torch.zeros(2, 4)
    mask.view(-1)[:n_valid] = 1
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, mask)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x, mask)


def test_whitening_mean_zero_var_one_pads_zero():
    torch.manual_seed(0)
    _, _, mask = ragged()
    x = 3.0 + 5.0 * torch.randn(mask.shape, dtype=torch.float64)
    x = torch.where(mask.bool(), x, torch.full_like(x, 1e3))  # padding values must not leak in
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask.bool()] == 0).all()


def test_whitening_without_mean_shift_keeps_the_mean():
    torch.manual_seed(1)
    _, _, mask = ragged()
    x = 3.0 + 5.0 * torch.randn(mask.shape, dtype=torch.float64)
    w = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-10)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask.bool()] == 0).all()


def test_explained_variance():
    torch.manual_seed(2)
    _, _, mask = ragged()
    targets = torch.randn(mask.shape, dtype=torch.float64)
    noise_on_pads = torch.where(mask.bool(), targets, torch.randn_like(targets))
    assert explained_variance(noise_on_pads, targets, mask) == pytest.approx(1.0)
    # a constant prediction at the mean explains nothing
    constant = torch.full_like(targets, masked_mean(targets, mask).item())
    assert explained_variance(constant, targets, mask) == pytest.approx(0.0, abs=1e-10)
    # constant targets: undefined
    ev = explained_variance(targets, torch.ones_like(targets), mask)
    assert ev != ev  # NaN
