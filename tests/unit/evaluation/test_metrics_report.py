"""The evaluation harness's metrics (rates, win rates) and its report: the numbers in report.md are results.json's."""

from __future__ import annotations

import re

import pytest

from alignlab.evaluation.metrics import Rate, rate_difference, win_rate
from alignlab.evaluation.report import RATES, smooth, write_report
from alignlab.evaluation.tinyhh import wilson_interval

PNG = b"\x89PNG\r\n\x1a\n"


def test_win_rate_counts_wins_losses_and_ties():
    a = [1.0, 0.5, 0.2, 0.9, 0.3]
    b = [0.5, 0.5, 0.4, 0.1, 0.3]
    w = win_rate(a, b)
    assert (w.wins, w.losses, w.ties) == (2, 1, 2)
    assert w.rate == pytest.approx(2 / 3)
    # the 95% Wilson score interval of 2 wins in 3 decided prompts, by hand: centre (2/3 + z^2/6) / (1 + z^2/3)
    # = 0.5731, half-width z * sqrt(2/27 + z^2/36) / (1 + z^2/3) = 0.3654
    assert (w.ci_low, w.ci_high) == pytest.approx((0.2077, 0.9385), abs=1e-3)
    mirror = win_rate(b, a)
    assert (mirror.wins, mirror.losses, mirror.ties) == (1, 2, 2) and mirror.rate == pytest.approx(1 / 3)


def test_win_rate_without_decided_prompts_is_a_half_and_needs_equal_lengths():
    assert win_rate([0.5, 0.5], [0.5, 0.5]).rate == 0.5
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([1.0], [1.0, 2.0])


def test_rate_is_the_share_with_its_wilson_interval():
    r = Rate.of(166, 200)
    assert r.value == pytest.approx(0.83) and r.n == 200
    assert r.ci_low == pytest.approx(0.7719, abs=1e-3) and r.ci_high == pytest.approx(0.8755, abs=1e-3)


def test_rate_difference_is_newcombes_interval():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10
    d = rate_difference(Rate.of(56, 70), Rate.of(48, 80))
    assert (d.value, d.ci_low, d.ci_high) == pytest.approx((0.2, 0.0524, 0.3339), abs=5e-5)
    d = rate_difference(Rate.of(9, 10), Rate.of(3, 10))
    assert (d.ci_low, d.ci_high) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    d = rate_difference(Rate.of(10, 10), Rate.of(0, 10))  # bounds stay inside [-1, 1]
    assert d.value == 1.0 and 0.5 < d.ci_low < 1.0 and d.ci_high == 1.0
    # Wilson intervals that overlap can still support an ordering (83/100 vs 95/100)
    a, b = Rate.of(95, 100), Rate.of(83, 100)
    assert a.ci_low < b.ci_high and rate_difference(a, b).ci_low > 0


def test_wilson_bounds_at_zero_and_all_are_exact_and_such_rates_plot(tmp_path):
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(0, 100)[0] == 0.0
    results = fake_results()
    # a bound a rounding error inside the rate (as computed before the fix) must not break the error bars
    results["systems"]["ppo"]["harmlessness"] = {
        "value": 1.0,
        "ci_low": 0.963,
        "ci_high": 0.9999999999999999,
        "n": 100,
    }
    assert {p.name for p in write_report(results, tmp_path)} >= {"rates.png", "report.md"}


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]


def fake_results():
    systems = {}
    for name, (h, u, a) in {"base": (74, 160, 195), "sft": (166, 147, 184), "ppo": (197, 162, 31)}.items():
        systems[name] = {
            "harmlessness": Rate.of(h, 200).as_dict(),
            "helpfulness": Rate.of(u, 200).as_dict(),
            "attack_success": Rate.of(a, 200).as_dict(),
            "rm_score": {"base": -0.9, "sft": -0.1, "ppo": 0.66}[name],
            "kl": {"base": 1.7, "sft": 0.0, "ppo": 0.7}[name],
            "ptx_loss": 0.14,
            "inference_flops_per_answer": {"base": 2.5e8, "sft": 2.5e8, "ppo": 3.1e8}[name],
            "training_flops": {"base": 0.0, "sft": 4.2e11, "ppo": 1.3e13}[name],
        }
        m = systems[name]
        m["total_flops"] = m["training_flops"] + 10_000 * m["inference_flops_per_answer"]
    scores = {"base": [0.1, 0.2, 0.9], "sft": [0.5, 0.2, 0.3], "ppo": [0.9, 0.9, 0.9]}
    win = {a: {b: win_rate(scores[a], scores[b]).as_dict() for b in scores if b != a} for a in scores}
    return {
        "systems": systems,
        "prompts": 600,
        "judge": "oracle",
        "served_answers": 10_000,
        "skipped": ["rain"],
        "win_rates": win,
        "baseline": "sft",
        "differences": {
            name: {k: rate_difference(Rate(**m[k]), Rate(**systems["sft"][k])).as_dict() for k, _ in RATES}
            for name, m in systems.items()
            if name != "sft"
        },
    }


# fake_results' counts out of 200 (harmlessness, helpfulness, attack success) as the report must print them: the
# rate and its 95% Wilson interval in percent, computed by hand (z = 1.96), not with the report's own helpers
EXPECTED_RATE_CELLS = {
    "base": ["37.0% [30.6, 43.9]", "80.0% [73.9, 85.0]", "97.5% [94.3, 98.9]"],
    "sft": ["83.0% [77.2, 87.6]", "73.5% [67.0, 79.1]", "92.0% [87.4, 95.0]"],
    "ppo": ["98.5% [95.7, 99.5]", "81.0% [75.0, 85.8]", "15.5% [11.1, 21.2]"],
}


def test_report_numbers_are_the_results_and_plots_render(tmp_path):
    results = fake_results()
    written = write_report(results, tmp_path)
    names = {p.name for p in written}
    assert names == {
        *("report.md", "rates.png", "tradeoff.png", "win_rates.png", "reward_kl.png", "cost.png"),
        "total_cost.png",
    }
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    text = (tmp_path / "report.md").read_text()
    for name, m in results["systems"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1 : 1 + len(RATES)] == EXPECTED_RATE_CELLS[name]
        assert float(cells[-6]) == pytest.approx(m["rm_score"], abs=5e-4)
        assert float(cells[-5]) == pytest.approx(m["kl"], abs=5e-4)
        assert float(cells[-3]) == m["inference_flops_per_answer"]
        assert float(cells[-2]) == pytest.approx(m["training_flops"], rel=1e-2)  # 3 significant digits
        assert float(cells[-1]) == pytest.approx(m["total_flops"], rel=1e-2)
        wr = results["win_rates"].get(name, {}).get("sft")
        if wr:
            assert cells[1 + len(RATES)].startswith(f"{100 * wr['rate']:.1f}%")
    # every percentage printed is one of results.json's numbers
    printed = {float(x) for x in re.findall(r"(\d+\.\d)%", text)}
    known = set()
    for m in results["systems"].values():
        for k, _ in RATES:
            known |= {round(100 * m[k][f], 1) for f in ("value", "ci_low", "ci_high")}
    for row in results["win_rates"].values():
        for w in row.values():
            known |= {round(100 * w[f], 1) for f in ("rate", "ci_low", "ci_high")}
    assert printed <= known
    assert "Skipped (model or answers missing): rain." in text
    assert "total FLOPs at 10,000 answers" in text
    d = results["differences"]["ppo"]["harmlessness"]
    assert f"| ppo | {100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] |" in text
    assert "![rates](rates.png)" in text


def test_report_without_rates_or_kl_skips_those_plots(tmp_path):
    results = {
        "systems": {"a": {"rm_score": 0.1, "kl": None}, "b": {"rm_score": 0.2, "kl": None}},
        "prompts": 2,
        "judge": "rm",
        "skipped": [],
        "win_rates": {
            "a": {"b": win_rate([0.1], [0.2]).as_dict()},
            "b": {"a": win_rate([0.2], [0.1]).as_dict()},
        },
        "baseline": "a",
    }
    names = {p.name for p in write_report(results, tmp_path)}
    assert names == {"report.md", "win_rates.png"}
