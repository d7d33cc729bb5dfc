"""PPO's clipped policy / value losses, entropy and the PPO-ptx LM term (spec invariants 9, 10 and 11)."""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.rl.advantages import masked_mean
from alignlab.rl.losses import entropy_from_logits, lm_loss, policy_loss, value_loss

# ------------------------------------------------------------------ policy loss (invariant 10)


def ragged_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    torch.manual_seed(0)
    mask = ragged_mask([5, 2, 4], 5)
    old = torch.randn(3, 5, dtype=torch.float64) - 2
    logprobs = old.clone().requires_grad_(True)
    adv = torch.randn(3, 5, dtype=torch.float64)
    out = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-12)
    assert out.clipfrac.item() == 0.0
    assert out.approxkl.item() == 0.0
    assert out.ratio_mean.item() == 1.0
    out.loss.backward()
    # d loss / d logp_t = -A_t / n at rho = 1
    assert torch.allclose(logprobs.grad, -adv * mask / mask.sum(), atol=1e-15)


def test_policy_loss_hand_computed_and_zero_grad_where_clipped():
    eps = 0.2
    rho = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 0.9]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, -3.0]], dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.float64)
    old = torch.full((1, 6), -1.0, dtype=torch.float64)
    logprobs = (old + rho.log()).requires_grad_(True)
    out = policy_loss(logprobs, old, adv, mask, clip_range=eps)
    # per token: max(-A rho, -A clip(rho, 0.8, 1.2))
    #  A>0, rho>1+eps: max(-1.5, -1.2) = -1.2   clipped (zero grad)
    #  A>0, rho<1-eps: max(-0.5, -0.8) = -0.5   unclipped
    #  A<0, rho<1-eps: max(0.5, 0.8)   = 0.8    clipped (zero grad)
    #  A<0, rho>1+eps: max(1.5, 1.2)   = 1.5    unclipped
    #  inside:         -2.2 and 2.7             unclipped
    per_token = [-1.2, -0.5, 0.8, 1.5, -2.2, 2.7]
    assert out.loss.item() == pytest.approx(sum(per_token) / 6, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(2 / 6)
    assert out.approxkl.item() == pytest.approx(0.5 * (rho.log() ** 2).mean().item(), abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx(rho.mean().item(), abs=1e-12)
    out.loss.backward()
    grad = logprobs.grad[0]
    clipped = torch.tensor([True, False, True, False, False, False])
    assert (grad[clipped] == 0).all()
    assert (grad[~clipped] != 0).all()
    # unclipped tokens: d/dlogp (-A rho) / n = -A rho / n
    expected = (-adv * rho / 6)[0]
    assert torch.allclose(grad[~clipped], expected[~clipped], atol=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.3])
def test_policy_loss_zero_grad_exactly_on_clipped_tokens_random(eps):
    torch.manual_seed(1)
    mask = ragged_mask([8, 8, 6, 3], 8)
    old = torch.randn(4, 8, dtype=torch.float64) - 2
    log_ratio = 0.6 * torch.randn(4, 8, dtype=torch.float64)
    adv = torch.randn(4, 8, dtype=torch.float64)
    logprobs = (old + log_ratio).requires_grad_(True)
    out = policy_loss(logprobs, old, adv, mask, clip_range=eps)
    out.loss.backward()
    rho = log_ratio.exp()
    valid = mask.bool()
    clipped = ((adv > 0) & (rho > 1 + eps)) | ((adv < 0) & (rho < 1 - eps))
    assert clipped[valid].any() and (~clipped)[valid].any()  # both kinds present
    assert (logprobs.grad[clipped & valid] == 0).all()
    assert (logprobs.grad[~clipped & valid] != 0).all()
    assert (logprobs.grad[~valid] == 0).all()
    assert out.clipfrac.item() == pytest.approx((clipped & valid).sum().item() / valid.sum().item())


def test_policy_loss_ignores_padding_values():
    """Invariant 11: whatever sits at pad positions changes neither the loss nor the gradients."""
    torch.manual_seed(2)
    mask = ragged_mask([6, 3, 1], 6)
    pad = ~mask.bool()
    old = torch.randn(3, 6, dtype=torch.float64) - 2
    new = old + 0.5 * torch.randn(3, 6, dtype=torch.float64)
    adv = torch.randn(3, 6, dtype=torch.float64)

    def run(new, old, adv):
        logprobs = new.clone().requires_grad_(True)
        out = policy_loss(logprobs, old, adv, mask)
        out.loss.backward()
        return out, logprobs.grad

    a, grad_a = run(new, old, adv)
    junk = lambda x, v: torch.where(pad, torch.full_like(x, v), x)
    b, grad_b = run(junk(new, 30.0), junk(old, -40.0), junk(adv, 1e4))
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(grad_a, grad_b)
    assert (grad_a[pad] == 0).all()
    for f in ("clipfrac", "approxkl", "ratio_mean"):
        assert torch.equal(getattr(a, f), getattr(b, f))


# ------------------------------------------------------------------ value loss (invariant 9)


def test_value_loss_hand_computed():
    V = torch.tensor([[1.0, 0.5, 0.9, -1.0]], dtype=torch.float64, requires_grad=True)
    V_old = torch.tensor([[0.5, 0.4, 0.0, 0.0]], dtype=torch.float64)
    R = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    out = value_loss(V, V_old, R, mask, clip_range_value=0.2)
    # clipped V = [0.7, 0.5, 0.2, -0.2]; errors unclipped [1, .25, .01, 1], clipped [.49, .25, .64, .04]
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 0.25 + 0.64 + 1.0) / 4, abs=1e-12)
    assert out.clipfrac.item() == pytest.approx(1 / 4)
    out.loss.backward()
    # the clipped error is the active one at t=2 and its clip is saturated: no gradient there
    assert V.grad[0, 2].item() == 0.0
    expected = (V - R).detach() / 4  # d/dV 0.5 (V - R)^2 / n
    for t in (0, 1, 3):
        assert V.grad[0, t].item() == pytest.approx(expected[0, t].item(), abs=1e-12)


def test_value_loss_equals_unclipped_within_clip_range():
    torch.manual_seed(3)
    mask = ragged_mask([7, 4, 2], 7)
    V_old = torch.randn(3, 7, dtype=torch.float64)
    V = V_old + 0.2 * (2 * torch.rand(3, 7, dtype=torch.float64) - 1)  # |V - V_old| <= 0.2
    R = torch.randn(3, 7, dtype=torch.float64)
    out = value_loss(V, V_old, R, mask, clip_range_value=0.2)
    assert out.loss.item() == pytest.approx(0.5 * masked_mean((V - R) ** 2, mask).item(), abs=1e-12)
    assert out.clipfrac.item() == 0.0


def test_value_loss_matches_formula_random():
    torch.manual_seed(4)
    mask = ragged_mask([7, 4, 2], 7)
    V_old = torch.randn(3, 7, dtype=torch.float64)
    V = V_old + torch.randn(3, 7, dtype=torch.float64)
    R = torch.randn(3, 7, dtype=torch.float64)
    out = value_loss(V, V_old, R, mask, clip_range_value=0.3)
    clipped = torch.minimum(torch.maximum(V, V_old - 0.3), V_old + 0.3)
    per_token = torch.maximum((V - R) ** 2, (clipped - R) ** 2)
    expected = 0.5 * (per_token * mask).sum() / mask.sum()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_value_loss_ignores_padding_values():
    torch.manual_seed(5)
    mask = ragged_mask([5, 2, 1], 5)
    pad = ~mask.bool()
    V_old, R = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    V = V_old + 0.5 * torch.randn(3, 5, dtype=torch.float64)

    def run(V, V_old, R):
        v = V.clone().requires_grad_(True)
        out = value_loss(v, V_old, R, mask)
        out.loss.backward()
        return out, v.grad

    a, grad_a = run(V, V_old, R)
    junk = lambda x, v: torch.where(pad, torch.full_like(x, v), x)
    b, grad_b = run(junk(V, 50.0), junk(V_old, -3.0), junk(R, 1e3))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.clipfrac, b.clipfrac)
    assert torch.equal(grad_a, grad_b)
    assert (grad_a[pad] == 0).all()


# ------------------------------------------------------------------ entropy and the LM term


def test_entropy_of_uniform_logits_is_log_vocab():
    for V in (2, 17, 1000):
        ent = entropy_from_logits(torch.full((2, 3, V), 4.2))
        assert torch.allclose(ent, torch.full((2, 3), math.log(V)), atol=1e-5)


def test_entropy_matches_categorical():
    torch.manual_seed(6)
    logits = 3 * torch.randn(2, 4, 11)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), expected, atol=1e-5)
    # bf16 input is computed in float32
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_lm_loss_is_per_token_mean_nll_with_ignored_labels():
    torch.manual_seed(7)
    B, L, V = 3, 6, 13
    logits = torch.randn(B, L, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L))
    labels[0, 4:] = -100  # padding
    labels[1, 0] = -100  # first position never predicted anyway
    labels[2, 2] = -100
    logp = torch.log_softmax(logits, -1)
    nll = [
        -logp[b, t, labels[b, t + 1]].item()
        for b in range(B)
        for t in range(L - 1)
        if labels[b, t + 1] != -100
    ]
    assert lm_loss(logits, labels).item() == pytest.approx(sum(nll) / len(nll), abs=1e-6)
    # per-token mean (not per-sequence): a long row weighs more than a short one
    assert len(nll) == 3 + 5 + 4
