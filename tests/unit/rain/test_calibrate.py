"""alignlab.rain.calibrate: thresholds for a new embedder that fire at a reference run's rates (hand values)."""

from __future__ import annotations

import pytest

from alignlab.rain.calibrate import SearchDists, calibrated_thresholds, firing_rates

# The reference (think MiniLM at the released 0.95 / 0.03): 2 of its 5 cosines reach 0.95; ||var|| / length is
# 0.01, 0.02, 0.05, 0.1 (norms 0.01, 0.04, 0.05, 0.4 over lengths 1, 2, 1, 4), so 2 of 4 fall below 0.03.
REFERENCE = SearchDists(
    sim_threshold=0.95,
    dynamic_var_coef=0.03,
    sibling_cosines=[0.90, 0.97, 0.99, 0.80, 0.94],
    var_norms=[0.01, 0.04, 0.05, 0.4],
    var_set_lengths=[1, 2, 1, 4],
)
# The new embedder's values sit lower: cosines 0.5 ... 0.9 (ten of them), ||var|| / length 0.1 ... 0.4.
TARGET = SearchDists(
    sim_threshold=0.95,
    dynamic_var_coef=0.03,
    sibling_cosines=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9],
    var_norms=[0.1, 0.4, 0.3, 1.6],
    var_set_lengths=[1, 2, 1, 4],
)


def test_rates_at_the_runs_own_thresholds_and_at_others():
    rates = firing_rates(REFERENCE)
    assert rates.similarity == pytest.approx(2 / 5) and rates.variance == pytest.approx(2 / 4)
    # at the released numbers the new embedder never fires: no cosine reaches 0.95, and its ||var|| / length
    # (0.1, 0.2, 0.3, 0.4) are all above 0.03
    assert firing_rates(TARGET) == type(rates)(similarity=0.0, variance=0.0)
    assert firing_rates(TARGET, sim_threshold=0.8, var_coef=0.25).similarity == pytest.approx(4 / 10)
    assert firing_rates(TARGET, sim_threshold=0.8, var_coef=0.25).variance == pytest.approx(2 / 4)


def test_calibrated_thresholds_fire_at_the_reference_rates():
    sim, coef = calibrated_thresholds(REFERENCE, TARGET)
    # 40% of the reference's cosines reach its threshold: the target's top 4 of 10 start at 0.8
    assert sim == pytest.approx(0.8)
    # 50% of the reference's checks pass: the target's per-token variances 0.1, 0.2 | 0.3, 0.4 -> below 0.3
    assert coef == pytest.approx(0.3)
    rates = firing_rates(TARGET, sim_threshold=sim, var_coef=coef)
    assert rates.similarity == pytest.approx(0.4) and rates.variance == pytest.approx(0.5)


def test_a_reference_that_never_or_always_fires_is_refused():
    never = SearchDists(0.999, 0.03, [0.9, 0.95], [0.01], [1])
    with pytest.raises(ValueError, match="similarity condition fired at rate 0"):
        calibrated_thresholds(never, TARGET)
    nothing = SearchDists(0.95, 0.03, [], [0.01], [1])
    with pytest.raises(ValueError, match="no sibling cosine"):
        calibrated_thresholds(nothing, TARGET)
    with pytest.raises(ValueError, match="one per check"):
        SearchDists(0.95, 0.03, [0.9], [0.01, 0.02], [1])


def test_json_round_trip():
    assert SearchDists.from_json(REFERENCE.to_json()) == REFERENCE


def test_null_thresholds_are_the_embedders_and_explicit_ones_win():
    from dataclasses import asdict

    from alignlab.rain.search import RainParams
    from alignlab.rain.stage_config import EMBEDDER_THRESHOLDS, RainConfig

    defaults = asdict(RainConfig())
    assert defaults["sim_threshold"] is None and defaults["dynamic_var_coef"] is None
    for embedder, (sim, coef) in EMBEDDER_THRESHOLDS.items():
        p = RainParams.from_fields(defaults | {"embedder": embedder})
        assert (p.sim_threshold, p.dynamic_var_coef) == (sim, coef)
    assert EMBEDDER_THRESHOLDS["sentence_transformers"] == (0.95, 0.03)  # the released code's (HH/nodes.py)
    p = RainParams.from_fields(defaults | {"embedder": "sentence_transformers", "sim_threshold": 0.9})
    assert (p.sim_threshold, p.dynamic_var_coef) == (0.9, 0.03)
    p = RainParams.from_fields(defaults, dynamic_var_coef=0.5)
    assert p.dynamic_var_coef == 0.5 and p.sim_threshold == EMBEDDER_THRESHOLDS["lm"][0]
