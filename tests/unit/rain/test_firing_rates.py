"""stage=rain's summary of how often the two embedding thresholds fire (hand-computed values)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from alignlab.recipes.rain import firing_rates, pooled_dists

# the run's thresholds: sim 0.95, dynamic_var_coef 0.03 (so a set of length n has threshold 0.03 n)
PARAMS = SimpleNamespace(sim_threshold=0.95, dynamic_var_coef=0.03)


def test_rates_and_distributions_pooled_over_prompts():
    per_prompt = [  # var thresholds 0.03, 0.03 (sets of length 1) and 0.3 (length 10)
        {"sibling_cosines": [0.90, 0.96], "var_norms": [0.01, 0.05], "var_set_lengths": [1, 1]},
        {"sibling_cosines": [0.99, 0.50], "var_norms": [0.5], "var_set_lengths": [10]},
    ]
    dists = pooled_dists(PARAMS, [{"search_dists": d} for d in per_prompt])
    assert dists.sibling_cosines == [0.90, 0.96, 0.99, 0.50] and dists.var_set_lengths == [1, 1, 10]
    counts = [
        {"similarity_checks": 2, "similarity_updates": 1, "addition_checks": 2, "addition_triggers": 1},
        {"similarity_checks": 2, "similarity_updates": 1, "addition_checks": 1, "addition_triggers": 0},
    ]
    out = firing_rates(dists, counts)
    assert out["rain/similarity_update_rate"] == pytest.approx(2 / 4)
    assert out["rain/sibling_cos_p50"] == pytest.approx((0.90 + 0.96) / 2)  # the median of 4 cosines
    assert out["rain/addition_trigger_rate"] == pytest.approx(1 / 3)
    # norm / threshold: 1/3, 5/3, 5/3 -> one of three below 1
    assert out["rain/addition_var_rate"] == pytest.approx(1 / 3)
    assert out["rain/var_ratio_p50"] == pytest.approx(5 / 3)


def test_nothing_checked_gives_no_rates():
    empty = {"sibling_cosines": [], "var_norms": [], "var_set_lengths": []}
    zero = {"similarity_checks": 0, "similarity_updates": 0, "addition_checks": 0, "addition_triggers": 0}
    assert firing_rates(pooled_dists(PARAMS, [{"search_dists": empty}]), [zero]) == {}
    assert pooled_dists(PARAMS, [{"search_dists": empty}, {}]) is None  # a row without them (nothing pooled)
