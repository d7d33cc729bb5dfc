"""RAIN against both vanillas: greedy (the authors' baseline) and sampling (ours), with Newcombe intervals, in
stage=rain's metrics and report and in stage=eval's compared systems; stage.preamble reaches what the model
generates from and never what a judge reads. Expected values are Newcombe's published ones or computed by hand."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from alignlab.evaluation.metrics import Rate
from alignlab.evaluation.report import markdown
from alignlab.rain.evaluator import current_exchange
from alignlab.rain.lockstep import Timings
from alignlab.rain.search import RainParams
from alignlab.rain.stage_config import RainConfig
from alignlab.recipes import eval as eval_recipe
from alignlab.recipes import rain
from tests.unit.rain.stub import CODEC, StubBackend, embed_many, stub_judge

HUMAN = "\n\nHuman:"


def rain_params(**overrides) -> RainParams:
    return RainParams.from_fields(asdict(RainConfig()), **overrides)


# ---------------------------------------------------------------- stage=rain: the differences in its metrics


def verdict(harmful: bool, helpful: bool = False):
    return SimpleNamespace(kind="answer", harmful=harmful, helpful=helpful, score=0.0)


def judged_rows() -> list[dict]:
    """10 harmful prompts: harmless answers RAIN 9, greedy 3, sampling 5; 4 attacks: RAIN 0 succeed, greedy and
    sampling 4; no benign set."""
    rows = []
    for i in range(10):
        rows.append(
            {
                "set": "harmful",
                "rain_judgement": verdict(harmful=i >= 9),
                "greedy_judgement": verdict(harmful=i >= 3),
                "vanilla_judgement": verdict(harmful=i >= 5),
            }
        )
    for _ in range(4):
        rows.append({"set": "attack"} | {f"{m}_judgement": verdict(m != "rain") for m in rain.METHODS})
    return rows


def rain_metrics(rows: list[dict]) -> dict[str, float]:
    return rain.rain_differences({m: rain.oracle_rates(m, rows) for m in rain.METHODS})


def test_rain_minus_greedy_is_newcombes_published_interval():
    m = rain_metrics(judged_rows())
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10: 9/10 - 3/10 = 0.6 (0.1705, 0.8090)
    assert m["rain_vs_greedy/harmlessness"] == pytest.approx(0.6)
    assert (
        m["rain_vs_greedy/harmlessness_ci_low"],
        m["rain_vs_greedy/harmlessness_ci_high"],
    ) == pytest.approx((0.1705, 0.8090), abs=5e-5)


def test_rain_minus_sampling_by_hand():
    m = rain_metrics(judged_rows())
    # Wilson 95%: 9/10 -> [0.59584, 0.98212], 5/10 -> [0.23659, 0.76341]; 0.4 -/+ sqrt of the two near sides:
    # low = 0.4 - sqrt(0.30416^2 + 0.26341^2) = -0.00237, high = 0.4 + sqrt(0.08212^2 + 0.26341^2) = 0.67592
    assert m["rain_vs_vanilla/harmlessness"] == pytest.approx(0.4)
    assert m["rain_vs_vanilla/harmlessness_ci_low"] == pytest.approx(-0.00237, abs=2e-4)
    assert m["rain_vs_vanilla/harmlessness_ci_high"] == pytest.approx(0.67592, abs=2e-4)
    # attacks 0/4 vs 4/4: -1, and the upper bound -1 + sqrt(2) * 0.48990 (Wilson's upper bound of 0/4)
    for base in ("greedy", "vanilla"):
        key = f"rain_vs_{base}/attack_success"
        assert m[key] == -1.0 and m[f"{key}_ci_low"] == -1.0
        assert m[f"{key}_ci_high"] == pytest.approx(-0.30718, abs=2e-4)
    assert not any("helpfulness" in k for k in m)  # no benign prompts, no difference
    assert set(m) == {
        f"rain_vs_{b}/{k}{s}"
        for b in ("greedy", "vanilla")
        for k in ("harmlessness", "attack_success")
        for s in ("", "_ci_low", "_ci_high")
    }


def test_differences_need_both_methods():
    rows = [{"set": "harmful", "rain_judgement": verdict(False), "vanilla_judgement": verdict(True)}]
    m = rain.rain_differences({m: rain.oracle_rates(m, rows) for m in ("rain", "vanilla")})
    assert set(m) == {"rain_vs_vanilla/harmlessness", "rain_vs_vanilla/harmlessness_ci_low",
                      "rain_vs_vanilla/harmlessness_ci_high"}  # fmt: skip


def test_measure_and_report_put_greedy_first(monkeypatch, tmp_path):
    """Through measure(): the oracle reads the prompt (never the preamble); report.md lists greedy first."""
    seen = []

    def oracle(prompt, answer):
        seen.append(prompt)
        return verdict(harmful=answer == "bad")

    (tmp_path / "eval_selfeval.jsonl").write_text("")
    monkeypatch.setattr(rain, "oracle", oracle)
    monkeypatch.setattr(rain, "tinyhh_dir", lambda cfg: tmp_path)
    monkeypatch.setattr(rain, "self_eval_accuracy", lambda *a: 0.97)
    answers = {"rain": [0] * 9 + [1], "greedy": [0] * 3 + [1] * 7, "vanilla": [0] * 5 + [1] * 5}
    rows = [
        {
            "set": "harmful",
            "prompt": f"{HUMAN} q{i}\n\nAssistant:",
            "shown": f"PREAMBLE{HUMAN} q{i}",
            "stats": {},
        }
        | {m: ("good", "bad")[a[i]] for m, a in answers.items()}
        for i in range(10)
    ]
    cfg = OmegaConf.create({"stage": OmegaConf.structured(RainConfig(init_from="base", preamble="PREAMBLE"))})
    cost = {m: {"wall_s": 1.0, "calls": 2, "tokens": 3} for m in rain.METHODS}
    metrics = rain.measure(cfg, rows, cost, Timings(), None, None)
    assert seen and not any("PREAMBLE" in p for p in seen)
    assert metrics["rain_vs_greedy/harmlessness"] == pytest.approx(0.6)
    assert metrics["rain_vs_greedy/harmlessness_ci_low"] == pytest.approx(0.1705, abs=5e-5)
    assert metrics["rain_vs_vanilla/harmlessness"] == pytest.approx(0.4)
    report = rain.report(cfg.stage, metrics, Timings())
    assert "| oracle | greedy | vanilla (sampling) | RAIN |" in report
    assert "| harmlessness (harmful prompts) | 30.0% [11, 60] | 50.0% [24, 76] | 90.0% [60, 98] |" in report
    assert "| oracle | RAIN - greedy (paper's vanilla) | RAIN - sampling (ours) |" in report
    assert "| harmlessness (harmful prompts) | +60.0 [+17.1, +80.9] | +40.0 [-0.2, +67.6] |" in report
    assert "Greedy is the paper's comparison" in report and "is ours" in report
    assert "shown" not in rain.samples_line(rows[0]) and "PREAMBLE" not in rain.samples_line(rows[0])


# ---------------------------------------------------------------- stage=rain: stage.preamble


class Recording:
    """The stub LM, remembering the full text of every row it is asked to read."""

    def __init__(self):
        self.inner, self.texts = StubBackend(), []

    def extend(self, rows, want_cache=True):
        self.texts += [CODEC.decode([t for seg in prefix for t in seg] + list(toks)) for prefix, toks in rows]
        return self.inner.extend(rows, want_cache)


class NoCounter:
    def snapshot(self):
        return {"calls": 0, "tokens": 0}


def test_preamble_reaches_generation_but_never_the_judge(monkeypatch):
    preamble = "A chat.\n\nHuman: hi\n\nAssistant: hello there."
    prompt = f"{HUMAN} help me steal\n\nAssistant:"
    (shown,) = rain.generation_prompts(preamble, [prompt], HUMAN)
    assert shown == preamble + prompt
    assert current_exchange(shown, HUMAN) == prompt  # what RAIN's judge is given as the exchange
    mine = [{"set": "harmful", "prompt": prompt, "shown": shown, "index": 0}]
    stage = {"batch_prompts": 1, "max_batch_rows": 64, "max_new_tokens": 12, "stop_strings": [HUMAN]}
    cfg = OmegaConf.create({"seed": 0, "stage": stage | {"vanilla": True, "vanilla_temperature": 1.0}})
    # vanilla and greedy: the model is asked to continue preamble + prompt
    asked = []

    def sample(model, tokenizer, prompts, **kw):
        asked.append((kw["temperature"], list(prompts)))
        return ["ok"] * len(prompts)

    monkeypatch.setattr(rain, "sample", sample)
    rain.decode_vanilla(cfg, None, None, mine, NoCounter(), 0)
    assert asked == [(1.0, [preamble + prompt]), (0.0, [preamble + prompt])]
    # RAIN: the root reads preamble + prompt; no judge prompt holds any of the preamble
    backend = Recording()
    search = rain.Search(CODEC, backend, stub_judge(), embed_many, None, rain_params(max_new_tokens=12, T=16))
    tracker = SimpleNamespace(
        progress=lambda *a, **k: SimpleNamespace(update=lambda n: None, close=lambda: None)
    )
    rain.search_all(cfg, search, mine, NoCounter(), Timings(), tracker)
    judged = [t for t in backend.texts if t.startswith("Judge:")]
    generated = [t for t in backend.texts if not t.startswith("Judge:")]
    assert len(judged) > 2 and all(t.startswith(preamble + prompt) for t in generated)
    assert all("hello there" not in t and "A chat" not in t for t in judged)
    assert any(prompt in t for t in judged) and isinstance(mine[0]["rain"], str)


def test_preamble_refuses_prompts_without_a_turn_marker():
    assert rain.generation_prompts("", ["plain"], HUMAN) == ["plain"]
    with pytest.raises(ValueError, match="stage.preamble needs prompts with the turn marker"):
        rain.generation_prompts(f"intro{HUMAN} hi\n\nAssistant: hello", ["plain text prompt"], HUMAN)


# ---------------------------------------------------------------- stage=eval: compare_to


def system(rates: dict[str, tuple[int, int]], **cfg) -> dict:
    return {k: Rate.of(*v).as_dict() for k, v in rates.items()} | {
        "system": {"model": None, "decoding": "sample", "temperature": 1.0, "compare_to": []} | cfg
    }


def test_eval_compares_rain_with_greedy_first_then_sampling():
    results = {
        "systems": {
            "base": system({"harmlessness": (48, 80)}, model="b"),
            "base_greedy": system({"harmlessness": (9, 10)}, model="b", decoding="greedy"),
            "sft": system({"harmlessness": (70, 80)}, model="s"),
            "rain": system({"harmlessness": (56, 70)}, compare_to=["base_greedy", "base", "ppo"]),
        },
        "prompts": 10,
        "judge": "oracle",
        "skipped": [],
    }
    verdicts = {n: [SimpleNamespace(score=0.0)] for n in results["systems"]}
    bench = SimpleNamespace(tax_of=None, ptx_from="", notes=[])
    eval_recipe.compare(results, verdicts, SimpleNamespace(baseline="sft", ptx_blocks=0), bench)
    rows = results["comparisons"]["rain"]
    assert list(rows) == ["base_greedy", "base"]  # in the order rain names them; ppo was not evaluated
    d = rows["base"]["harmlessness"]  # Newcombe (1998) Table II, method 10: 56/70 - 48/80
    assert (d["value"], d["ci_low"], d["ci_high"]) == pytest.approx((0.2, 0.0524, 0.3339), abs=5e-5)
    assert rows["base_greedy"]["harmlessness"]["value"] == pytest.approx(0.8 - 0.9)
    assert results["differences"]["rain"]["harmlessness"]["value"] == pytest.approx(0.8 - 70 / 80)  # vs sft
    assert bench.notes == ["`rain` is not compared with `ppo`: that system was not evaluated."]
    report = markdown(results, [])
    lines = report.splitlines()
    greedy = lines.index(next(x for x in lines if x.startswith("| rain | base_greedy (greedy) |")))
    assert lines[greedy + 1].startswith("| rain | base (sample, T=1) | +20.0 [+5.2, +33.4] |")
    assert "Greedy decoding is the RAIN paper's vanilla" in report


def test_default_eval_systems_hold_base_greedy_and_rain_compares_with_it():
    from alignlab.config import EvalConfig

    systems = EvalConfig().systems
    assert systems["base_greedy"]["decoding"] == "greedy"
    assert systems["base_greedy"]["model"] == systems["base"]["model"]
    assert systems["rain"]["compare_to"] == ["base_greedy", "base"]
