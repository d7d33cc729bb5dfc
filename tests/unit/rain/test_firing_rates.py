"""stage=rain's summary of how often the two embedding thresholds fire (hand-computed values)."""

from __future__ import annotations

import pytest

from alignlab.recipes.rain import firing_rates


def test_rates_and_distributions_pooled_over_prompts():
    dists = [
        {"sibling_cosines": [0.90, 0.96], "var_norms": [0.01, 0.05], "var_thresholds": [0.03, 0.03]},
        {"sibling_cosines": [0.99, 0.50], "var_norms": [0.5], "var_thresholds": [0.3]},
    ]
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
    empty = {"sibling_cosines": [], "var_norms": [], "var_thresholds": []}
    zero = {"similarity_checks": 0, "similarity_updates": 0, "addition_checks": 0, "addition_triggers": 0}
    assert firing_rates([empty], [zero]) == {}
