"""The presets that reproduce the authors' released settings (SafeAILab/RAIN: HH/, adv/, truth/) compose onto
stage=rain and set what the released code does; the few-shot judge and the chat preamble keep the structure of the
authors' prompts in our wording; stage=eval holds the paper's greedy vanilla as a system."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from tests.config.test_compose import compose_cfg
from tests.conftest import ROOT

# What the released code runs (file:line in each preset's comments): T_m, proposal temperature and attempts, EOS
# rule, child order; the judge's pass count and vote.
RELEASED = {
    "hh": dict(T=50, T_m=6, V=0.8, proposal_temperature=1.0, proposal_attempts_per_candidate=1, eos_rule="continue",
               child_order="token_id"),
    "adv": dict(T=50, T_m=5, V=0.8, proposal_temperature=2.0, proposal_attempts_per_candidate=2, eos_rule="stop",
                child_order="token_id"),
    "truth": dict(T=50, T_m=16, V=0.8, proposal_temperature=1.0, proposal_attempts_per_candidate=1, eos_rule="stop",
                  child_order="token_id"),
}  # fmt: skip


def test_every_preset_is_tested():
    assert {p.stem for p in (ROOT / "conf" / "rain_preset").glob("*.yaml")} == set(RELEASED)


@pytest.mark.parametrize("preset", sorted(RELEASED))
@pytest.mark.parametrize("experiment", ["tinyhh", "quick"])
def test_preset_composes_and_sets_the_released_values(preset, experiment):
    cfg = compose_cfg("stage=rain", f"+rain_preset={preset}", f"experiment={experiment}")
    s = OmegaConf.to_container(cfg, resolve=True)["stage"]
    assert {k: s[k] for k in RELEASED[preset]} == RELEASED[preset]
    assert s["name"] == "rain" and s["preamble"] == ""  # search settings only: runs on TinyHH as it is


def test_preset_keeps_the_other_keys_and_command_line_wins():
    default = compose_cfg("stage=rain").stage
    adv = compose_cfg("stage=rain", "+rain_preset=adv", "stage.T_m=7").stage
    assert adv.T_m == 7 and adv.proposal_temperature == 2.0
    assert (adv.c, adv.gamma, adv.judge, adv.max_new_tokens) == (
        default.c,
        default.gamma,
        default.judge,
        default.max_new_tokens,
    )


def test_truth_preset_judges_once_with_either_spelling_of_yes_and_no():
    judge = compose_cfg("stage=rain", "+rain_preset=truth").stage.judge
    assert judge.both_orders is False
    assert OmegaConf.to_container(judge.letters) == [[" Yes", "Yes"], [" No", "No"]]
    assert "truthful" in judge.template and judge.options == ["truthful", "untruthful"]
    # another judge template with the truth settings: the group is chosen without +
    other = compose_cfg("stage=rain", "+rain_preset=truth", "rain_judge=harmless").stage
    assert other.judge.options == ["harmless", "harmful"] and other.T_m == 16


def test_fewshot_judge_has_the_authors_structure():
    judge = compose_cfg("stage=rain", "+rain_preset=hh", "+rain_judge=hh_fewshot").stage.judge
    t = judge.template
    head, tail = t.split("{dialogue}")
    # worked examples: dialogue, both options, the answer, a one-line explanation; balanced answers
    examples = head.split("\n\nHuman:")[1:]
    assert len(examples) == 6 and all("\n\nAssistant:" in e and "\nExplanation: " in e for e in examples)
    answers = re.findall(r"The answer is: \(([AB])\) The assistant's reply is (harmful|harmless)\.", head)
    assert len(answers) == 6
    assert (
        sorted(a for a, _ in answers) == list("AAABBB")
        and sorted(w for _, w in answers).count("harmful") == 3
    )
    for e in examples:  # every answer names the option its letter stands for in that example
        (letter, word) = re.search(r"The answer is: \(([AB])\) The assistant's reply is (\w+)", e).groups()
        assert f"({letter}) The assistant's reply is {word}." in e.split("The answer is")[0]
    # then the judged exchange and the two options, ending where the next token is the letter
    assert tail.startswith("\nOptions:\n(A) The assistant's reply is {option_a}.\n(B)")
    assert t.endswith("The answer is: (")
    filled = t.format(dialogue="\n\nHuman: hi\n\nAssistant: hello", option_a="harmless", option_b="harmful")
    assert filled.endswith("Assistant: hello\nOptions:\n(A) The assistant's reply is harmless.\n"
                           "(B) The assistant's reply is harmful.\nThe answer is: (")  # fmt: skip
    assert (judge.options, judge.letters, judge.both_orders) == (["harmless", "harmful"], ["A", "B"], True)


def test_chat_preamble_is_four_exchanges_before_the_prompt():
    s = compose_cfg("stage=rain", "+rain_preset=hh", "+rain_preamble=chat4").stage
    p = s.preamble
    intro, *turns = p.split("\n\nHuman:")
    assert intro and "\n" not in intro and len(turns) == 4
    assert all(t.count("\n\nAssistant: ") == 1 for t in turns)
    # an HH prompt ("\n\nHuman: ...") follows directly; the judged exchange is still the prompt's own
    assert not p.endswith("\n") and s.judge.turn_marker == "\n\nHuman:"


def test_eval_systems_hold_the_papers_greedy_vanilla():
    systems = OmegaConf.to_container(compose_cfg("stage=eval").stage.systems)
    assert {"base", "base_greedy", "rain"} <= set(systems)
    assert systems["base_greedy"]["decoding"] == "greedy" and systems["base"]["decoding"] == "sample"
    assert systems["rain"]["compare_to"] == ["base_greedy", "base"]
    dropped = compose_cfg("stage=eval", "~stage.systems.base_greedy", "stage.systems.rain.compare_to=[base]")
    assert "base_greedy" not in dropped.stage.systems and dropped.stage.systems.rain.compare_to == ["base"]
