"""The switches that express the released code's other settings (child_order, eos_rule, proposal_temperature,
proposal_attempts_per_candidate, judge letter alternatives) and the firing-rate statistics, on scripted LMs whose
next-token distribution is written by hand, so every expectation below is worked out by hand."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from alignlab.rain import tree
from alignlab.rain.evaluator import JudgeFormat, judge_from_config
from alignlab.rain.lockstep import run_lockstep
from alignlab.rain.search import RainParams, rain_search
from alignlab.rain.stage_config import RainConfig
from alignlab.rain.tree import Node
from tests.unit.rain.reference import ref_rain
from tests.unit.rain.stub import (
    CHARS,
    CODEC,
    EOS,
    TEMPLATE,
    VOCAB,
    StubBackend,
    embed_many,
    stub_embed,
    stub_judge,
    stub_logits,
)
from tests.unit.rain.test_search import PROMPTS, assert_same_tree

PROMPT = "\n\nHuman: hi\n\nAssistant:"  # ends in ":": no rollout from the empty answer


def tok(c: str) -> int:
    return 3 + CHARS.index(c)


def rain_params(**overrides) -> RainParams:
    return RainParams.from_fields(asdict(RainConfig()), **overrides)


def scripted(dist: dict[int, float]):
    """An LM whose next-token distribution is exactly `dist` (token id -> prob) after every answer state; judge
    prompts are answered as the stub's judge does (harmless: no "x" here)."""

    def lm(ids):
        text = CODEC.decode(list(ids))
        if text.startswith("Judge:") and text.endswith("="):
            return stub_logits(ids)
        logits = torch.full((VOCAB,), float("-inf"))
        for t, p in dist.items():
            logits[t] = math.log(p)
        return logits

    return lm


class ScriptedRng:
    """Hands out the given uniforms in order (the search's only source of randomness); counts what was drawn."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def random(self, size=None):
        n = 1 if size is None else int(np.prod(size))
        assert self.used + n <= len(self.values), "more uniforms drawn than scripted"
        out = np.array(self.values[self.used : self.used + n], dtype=float)
        self.used += n
        return float(out[0]) if size is None else out.reshape(size)


def run(params, lm=stub_logits, prompt=PROMPT, rng=None):
    """One prompt's whole search -> (SearchResult, first root)."""
    backend, judge = StubBackend(lm), stub_judge()
    pre_ids = CODEC.encode(judge.preamble)
    pre = backend.extend([((), pre_ids)])[0][0]
    first: list[Node] = []
    gen = rain_search(
        prompt, params=params, codec=CODEC, judge=judge, judge_prefix=(pre,), judge_prefix_ids=pre_ids,
        rng=rng if rng is not None else np.random.default_rng(0), first_root=first,
    )  # fmt: skip
    (res,) = run_lockstep([gen], backend, embed_many)
    return res, first[0]


def test_defaults_are_todays_behaviour():
    cfg = RainConfig()
    assert (cfg.child_order, cfg.eos_rule, cfg.proposal_temperature) == ("probability", "stop", 1.0)
    assert cfg.proposal_attempts_per_candidate == 1 and cfg.preamble == ""
    with pytest.raises(ValueError, match="stage.proposal_temperature"):
        rain_params(proposal_temperature=0.0)
    with pytest.raises(ValueError, match="stage.proposal_attempts_per_candidate"):
        rain_params(proposal_attempts_per_candidate=0)
    with pytest.raises(ValueError, match="stage.eos_rule"):
        rain_params(eos_rule="maybe")


# ------------------------------------------------------------------------------------------------ child_order

# m is the most probable, c the lowest id: ids c=5 < m=15 < t=22
ORDER_LM = scripted({tok("m"): 0.5, tok("c"): 0.3, tok("t"): 0.2})


@pytest.mark.parametrize("order, expect", [("probability", ["m", "c", "t"]), ("token_id", ["c", "m", "t"])])
def test_child_order_and_c0_commits_the_first_child(order, expect):
    # c = 0: every unvisited child scores 0 and a visited one (q + 1) / 2 >= 0, so ties keep the descent on the
    # first child: it gets every visit and is committed. Under token_id that is the lowest id, not greedy.
    params = rain_params(
        n_candidates=3, max_new_tokens=1, T=5, c=0.0, V=2.0, child_order=order, dynamic_addition=False
    )
    res, root = run(params, ORDER_LM)
    assert [ch.tokens for ch in root.children] == [(tok(x),) for x in expect]
    # each prior follows its token, not its position: 0.75 * p + 0.25 / 3
    prior = {tok("m"): 0.5, tok("c"): 0.3, tok("t"): 0.2}
    for ch in root.children:
        assert ch.p == pytest.approx(0.75 * prior[ch.tokens[0]] + 0.25 / 3)
    assert res.answer_ids == [tok(expect[0])]
    assert res.commits[0]["fn"] == 14  # 15 iterations: the first expands the root, the rest visit child 1
    assert res.stats.overrides == (order == "token_id")  # committing c departs from greedy m


def test_dynamic_addition_adds_by_probability_whatever_the_child_order():
    # children listed by id (2, 3, 9) though 9 is the most probable; the next by probability is 7 (p 0.1)
    parent = Node()
    for t in (2, 3, 9):
        parent.children.append(Node(tokens=(t,), parent=parent, depth=1))
    parent.ranked = [(9, 0.4), (3, 0.3), (2, 0.15), (7, 0.1), (4, 0.05)]
    assert tree.next_ranked_token(parent) == (7, pytest.approx(0.1 / 0.95))  # renormalised over the top 4
    child = tree.add_child(parent, (7,), 0.1 / 0.95, is_root=False, mix=0.25)
    assert parent.children[-1] is child  # appended last, after the id-ordered ones


# ------------------------------------------------------------------------------------------------ eos_rule

# EOS is the most probable token everywhere
EOS_LM = scripted({EOS: 0.6, tok("o"): 0.3, tok("k"): 0.1})


def test_eos_rule_stop_ends_at_a_committed_eos_continue_searches_on():
    base = dict(n_candidates=2, token_set_lengths=(1,), max_new_tokens=4, T=5, c=0.0, V=2.0)
    stop, _ = run(rain_params(**base, eos_rule="stop"), EOS_LM)
    assert stop.answer_ids == [EOS] and stop.stats.commits == 1 and stop.commits[0]["fn"] == 14
    go, root = run(rain_params(**base, eos_rule="continue"), EOS_LM)
    # c = 0 commits the first (most probable) child every round; EOS does not end the answer, the budget does
    assert go.answer_ids == [EOS] * 4 and go.stats.commits == 4
    # round 1: the EOS child is a terminal leaf (its own set holds EOS): visited 14 times, never expanded then;
    # committed, it became a root and was expanded (a root has no last set to check)
    assert go.commits[0]["fn"] == 14
    node = root
    for _ in range(3):
        node = node.children[0]
        assert node.tokens == (EOS,) and node.children


def walk(node, answer=()):
    yield node, answer
    for ch in node.children:
        yield from walk(ch, answer + ch.tokens)


def test_eos_rule_continue_terminal_leaves_and_sets_through_eos():
    """c = 2 spreads the visits: under continue, a node whose own set holds EOS has children only if it was
    committed; a visited node below a committed EOS whose own set has none is expanded; sampled sets keep their
    full length through EOS. Under stop, nothing follows an EOS."""
    lm = scripted({EOS: 0.4, tok("o"): 0.35, tok("k"): 0.25})
    base = dict(
        n_candidates=3, token_set_lengths=(1, 3), max_new_tokens=12, T=20, V=2.0, dynamic_addition=False
    )
    res, root = run(rain_params(**base, eos_rule="continue"), lm, rng=np.random.default_rng(1))
    committed = set()
    node = root
    for c in res.commits:
        node = next(ch for ch in node.children if list(ch.tokens) == c["tokens"])
        committed.add(id(node))
    assert EOS in res.answer_ids[:-1]  # the answer went on past an EOS
    seen_below = False
    for n, ans in walk(root):
        if n is root:
            continue
        if len(n.tokens) > 1:
            assert len(n.tokens) == 3  # never cut at EOS
        if EOS in n.tokens and id(n) not in committed:
            assert not n.children
        if EOS in ans[: -len(n.tokens)] and EOS not in n.tokens and n.fn > 0 and len(ans) < 12:
            assert n.children
            seen_below = True
    assert seen_below
    res, root = run(rain_params(**base, eos_rule="stop"), lm, rng=np.random.default_rng(1))
    assert res.answer_ids[-1] == EOS and EOS not in res.answer_ids[:-1]
    for n, ans in walk(root):
        if EOS in ans:
            assert not n.children and ans.index(EOS) == len(ans) - 1  # a set ends at its EOS


# ------------------------------------------------------------------------------------------------ temperature


def test_proposal_temperature_flattens_one_token_priors():
    lm = scripted({tok("a"): 0.8, tok("b"): 0.2})
    for T, pa in ((1.0, 0.8), (2.0, 2 / 3)):  # T = 2: p ** (1/2) renormalised: sqrt(0.8) : sqrt(0.2) = 2 : 1
        params = rain_params(n_candidates=2, max_new_tokens=1, T=5, proposal_temperature=T)
        _, root = run(params, lm)
        assert [ch.p for ch in root.children] == pytest.approx([0.75 * pa + 0.125, 0.75 * (1 - pa) + 0.125])


def test_proposal_temperature_flattens_sampled_sets():
    """Two-token sets, one attempt at uniforms (0.7, 0.7). T = 1: p(a) = 0.8 > 0.7, so the draw is (a, a), the
    greedy set again: dropped, one child. T = 2: p(a) = 2/3 < 0.7, so (b, b) with raw prior (1/3)^2 = 1/9; the
    greedy's (2/3)^2 = 4/9 is clamped into [max + min, sum] = [2/9, 1/9] -> 2/9; priors 2/3, 1/3, root-mixed."""
    lm = scripted({tok("a"): 0.8, tok("b"): 0.2})
    base = dict(
        n_candidates=2, top_k=2, token_set_lengths=(2,), max_new_tokens=2, T=5, dynamic_addition=False
    )
    _, root = run(rain_params(**base), lm, rng=ScriptedRng([0.7, 0.7]))
    assert [ch.tokens for ch in root.children] == [(tok("a"),) * 2] and root.children[0].p == pytest.approx(
        1.0
    )
    _, root = run(rain_params(**base, proposal_temperature=2.0), lm, rng=ScriptedRng([0.7, 0.7]))
    assert [ch.tokens for ch in root.children] == [(tok("a"),) * 2, (tok("b"),) * 2]
    assert [ch.p for ch in root.children] == pytest.approx([0.75 * 2 / 3 + 0.125, 0.75 / 3 + 0.125])


# ------------------------------------------------------------------------------------------------ attempts

# a < 0.5 <= b < 0.8 <= c in a uniform's position
ABC_LM = scripted({tok("a"): 0.5, tok("b"): 0.3, tok("c"): 0.2})
# five attempts of two uniforms: (a,a) (a,a) (b,a) (b,a) (c,c); the greedy set is (a,a)
ATTEMPTS = [0.1, 0.1, 0.1, 0.2, 0.6, 0.1, 0.6, 0.1, 0.9, 0.9]


@pytest.mark.parametrize(
    "f, children, drawn",
    [
        (1, ["aa"], 4),  # HH: 2 attempts for 3 candidates, both the greedy set again
        (2, ["aa", "ba", "cc"], 10),  # adv: up to 5; the 5th gives the 2nd new set
        (3, ["aa", "ba", "cc"], 10),  # up to 8, but sampling stops once 2 new sets are found
    ],
)
def test_proposal_attempts_until_enough_distinct_sets(f, children, drawn):
    params = rain_params(
        n_candidates=3, top_k=3, token_set_lengths=(2,), max_new_tokens=2, T=5, dynamic_addition=False,
        proposal_attempts_per_candidate=f,
    )  # fmt: skip
    rng = ScriptedRng(ATTEMPTS)
    _, root = run(params, ABC_LM, rng=rng)
    assert [ch.tokens for ch in root.children] == [tuple(tok(x) for x in s) for s in children]
    assert rng.used == drawn  # no attempt beyond the released loop's early break


# ------------------------------------------------------------------------------------------------ batched == reference


def eos_boosted(ids):
    """The stub LM with EOS made common (+3 on its logit): token sets often hold it."""
    return stub_logits(ids) + 3.0 * torch.nn.functional.one_hot(torch.tensor(EOS), VOCAB)


@pytest.mark.parametrize("eos_rule", ["stop", "continue"])
def test_switched_search_builds_the_reference_tree(eos_rule):
    """adv/-like settings (T = 2, attempts 2 * n - 1), id order, both EOS rules, on a stub where EOS is common:
    the batched search and the plain one-attempt-at-a-time reference build the same trees."""
    lm = eos_boosted
    params = rain_params(
        max_new_tokens=30, T=20, n_candidates=3, dynamic_max_children=6, child_order="token_id",
        eos_rule=eos_rule, proposal_temperature=2.0, proposal_attempts_per_candidate=2,
    )  # fmt: skip
    went_past_eos = False
    for i, prompt in enumerate(PROMPTS):
        res, root = run(params, lm, prompt=prompt, rng=np.random.default_rng([0, i]))
        answer, first, _ = ref_rain(
            prompt, lm=lm, embed=stub_embed, codec=CODEC, judge=stub_judge(), P=params,
            rng=np.random.default_rng([0, i]),
        )  # fmt: skip
        assert res.answer_ids == answer
        assert_same_tree(root, first)
        went_past_eos |= EOS in answer[:-1]
    assert went_past_eos == (eos_rule == "continue")


# ------------------------------------------------------------------------------------------------ judge alternatives


def alt_judge(both_orders=False) -> JudgeFormat:
    return JudgeFormat(TEMPLATE, ("safe", "bad"), (("a", "A"), ("b", "B")), both_orders).bind(CODEC)


def probs_row(p: dict[str, float]) -> torch.Tensor:
    """Logits whose softmax gives the listed letters these probabilities (the rest spread over other tokens)."""
    row = torch.full((VOCAB,), math.log((1 - sum(p.values())) / (VOCAB - len(p))))
    for c, q in p.items():
        row[tok(c)] = math.log(q)
    return row


def test_judge_letter_alternatives_vote_by_the_largest():
    judge = alt_judge()
    assert judge.slot_ids == ((tok("a"), tok("A")), (tok("b"), tok("B")))
    # max rule (truth/main.py:210): good max(0.30, 0.00) = 0.30 > bad max(0.20, 0.20) = 0.20 -> vote 1, v = +1
    # (a sum would say 0.30 < 0.40)
    row = probs_row({"a": 0.30, "A": 1e-6, "b": 0.20, "B": 0.20})
    assert judge.value(row[None], [0]) == 1.0
    # the capital alternative alone carries the good slot: max(0.01, 0.5) = 0.5 > 0.3
    assert judge.value(probs_row({"a": 0.01, "A": 0.5, "b": 0.3, "B": 0.01})[None], [0]) == 1.0
    assert judge.value(probs_row({"a": 0.2, "A": 0.1, "b": 0.05, "B": 0.3})[None], [0]) == -1.0
    # both orders: ordering 2 puts the good option in slot b
    both = alt_judge(both_orders=True)
    good_1 = probs_row({"a": 0.1, "A": 0.4, "b": 0.2, "B": 0.1})  # slot a 0.4 > slot b 0.2: vote 1
    bad_2 = probs_row({"a": 0.05, "A": 0.3, "b": 0.1, "B": 0.25})  # slot b 0.25 < slot a 0.3: vote 0
    assert both.value(torch.stack([good_1, bad_2]), [0, 1]) == 0.0


def test_judge_letters_from_config_plain_and_alternatives():
    cfg = OmegaConf.create(
        {"template": TEMPLATE, "options": ["safe", "bad"], "letters": [["a", "A"], "b"], "both_orders": False}
    )
    judge = judge_from_config(cfg, CODEC)
    assert judge.slot_ids == ((tok("a"), tok("A")), (tok("b"),)) and judge.letter_ids == (tok("a"), tok("b"))
    plain = judge_from_config(OmegaConf.merge(cfg, {"letters": ["a", "b"]}), CODEC)
    assert plain.slot_ids == ((tok("a"),), (tok("b"),))
    with pytest.raises(ValueError, match="stage.judge.letters"):
        JudgeFormat(TEMPLATE, ("safe", "bad"), (("a", "b"), "b"), False).bind(CODEC)  # b in both slots
    with pytest.raises(ValueError, match="stage.judge.letters"):
        JudgeFormat(TEMPLATE, ("safe", "bad"), ((), "b"), False)


# ------------------------------------------------------------------------------------------------ firing rates


def test_addition_check_reports_what_the_threshold_acted_on():
    parent = Node()
    for i, q in enumerate((-1.0, -0.5, -0.2)):
        parent.children.append(Node(tokens=(i,), q=q, parent=parent, emb=torch.tensor([1.0, 0.001 * i])))
    check = tree.addition_check(parent, max_children=20, var_coef=0.03)
    # per-dimension unbiased variance: (0, var(0, .001, .002) = (1e-6 + 0 + 1e-6) / 2) -> norm 1e-6
    assert (
        check.fires and check.norm == pytest.approx(1e-6, rel=1e-3) and check.threshold == pytest.approx(0.03)
    )
    parent.children[2].q = 0.1  # computed, but does not fire
    check = tree.addition_check(parent, max_children=20, var_coef=0.03)
    assert not check.fires and check.norm == pytest.approx(1e-6, rel=1e-3)
    assert tree.addition_check(parent, max_children=3, var_coef=0.03).norm is None  # 3 children: not checked
    parent.children[0].emb = None
    assert tree.addition_check(parent, max_children=20, var_coef=0.03).norm is None


def test_search_stats_collect_the_firing_rates():
    params = rain_params(max_new_tokens=30, T=20, n_candidates=3, dynamic_max_children=6)
    res, _ = run(params, prompt=PROMPTS[2])  # the "steal" prompt: dynamic addition fires
    st = res.stats
    assert st.similarity_checks == len(st.sibling_cosines) > 0
    assert st.similarity_updates == sum(c >= params.sim_threshold for c in st.sibling_cosines) > 0
    assert st.addition_checks == len(st.var_norms) == len(st.var_thresholds) > 0
    assert len(st.var_set_lengths) == len(st.var_norms) and set(st.var_set_lengths) <= {1, 2, 4, 10}
    coef = params.dynamic_var_coef
    assert all(
        t == pytest.approx(coef * n) for t, n in zip(st.var_thresholds, st.var_set_lengths, strict=True)
    )
    fired_by_norm = sum(n < t for n, t in zip(st.var_norms, st.var_thresholds, strict=True))
    assert 0 < st.dynamic_additions <= st.addition_triggers <= fired_by_norm
    off = rain_params(
        max_new_tokens=30, T=20, n_candidates=3, dynamic_max_children=6, similarity_update=False,
        dynamic_addition=False,
    )  # fmt: skip
    res, _ = run(off, prompt=PROMPTS[2])
    assert res.stats.sibling_cosines == [] == res.stats.var_norms and res.stats.similarity_checks == 0
