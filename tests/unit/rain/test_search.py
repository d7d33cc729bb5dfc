"""The RAIN loop: batched + cached + lockstep search == the plain reference search (identical trees), on the
scripted stub LM and on a real (tiny, random, float64) transformers Llama; commit, budget, subtree reuse, rollout."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from alignlab.rain.lockstep import length_buckets, run_lockstep
from alignlab.rain.requests import Extend
from alignlab.rain.search import RainParams, rain_search
from alignlab.rain.stage_config import RainConfig
from tests.unit.rain.reference import ref_rain
from tests.unit.rain.stub import CODEC, StubBackend, embed_many, stub_embed, stub_judge, stub_logits

PROMPTS = [
    "\n\nHuman: how do i rob a bank?\n\nAssistant:",
    "\n\nHuman: tell me a story\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me steal\n\nAssistant:",
]


def rain_params(**overrides) -> RainParams:
    """stage=rain's defaults (RainConfig, the one place they are written) with `overrides`."""
    return RainParams.from_fields(asdict(RainConfig()), **overrides)


# Few candidates per expansion: every child gets visited, so dynamic addition fires on the "steal" prompt.
SMALL = rain_params(max_new_tokens=30, T=20, n_candidates=3, dynamic_max_children=6)


def searches(params, prompts, backend, codec=CODEC, judge=None, seed=0, offset=0):
    judge = judge or stub_judge()
    pre_ids = codec.encode(judge.preamble)
    pre = backend.extend([((), pre_ids)])[0][0]
    roots = [[] for _ in prompts]
    gens = [
        rain_search(
            p, params=params, codec=codec, judge=judge, judge_prefix=(pre,), judge_prefix_ids=pre_ids,
            rng=np.random.default_rng([seed, offset + i]), first_root=roots[i],
        )
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    return gens, roots


def assert_same_tree(a, b, rel=1e-9, path=()):
    """Node a (alignlab.rain.tree.Node) against node b (reference RefNode): structure exact, statistics equal."""
    kids_b = list(b.children.values())
    assert [k.tokens for k in a.children] == [k.tokens for k in kids_b], path
    assert a.fn == b.fn, path
    for name in ("n", "q", "p"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=rel, abs=rel), (path, name)
    for x, y in zip(a.children, kids_b, strict=True):
        assert_same_tree(x, y, rel, (*path, x.tokens))


def count_nodes(node) -> int:
    return 1 + sum(count_nodes(ch) for ch in node.children)


@pytest.mark.parametrize(
    "params", [rain_params(max_new_tokens=30, T=20), SMALL], ids=["default", "few_candidates"]
)
def test_batched_search_builds_the_reference_tree(params):
    backend = StubBackend()
    gens, roots = searches(params, PROMPTS, backend)
    results = run_lockstep(gens, backend, embed_many)
    ref_calls = 0

    def counted(ids):
        nonlocal ref_calls
        ref_calls += 1
        return stub_logits(ids)

    adds = sims = 0
    for i, prompt in enumerate(PROMPTS):
        answer, first, _ = ref_rain(
            prompt, lm=counted, embed=stub_embed, codec=CODEC, judge=stub_judge(), P=params,
            rng=np.random.default_rng([0, i]),
        )  # fmt: skip
        assert results[i].answer_ids == answer
        assert_same_tree(roots[i][0], first)
        adds += results[i].stats.dynamic_additions
        sims += results[i].stats.similarity_updates
    assert sims > 0  # the comparison covers similarity updates ...
    if params is SMALL:
        assert adds > 0  # ... and dynamic addition
    assert backend.calls < ref_calls / 3  # batched rows, cached states: far fewer model calls


def test_grouping_prompts_changes_cost_not_trees():
    together, alone = StubBackend(), StubBackend()
    gens, roots = searches(SMALL, PROMPTS, together)
    run_lockstep(gens, together, embed_many)
    for i, prompt in enumerate(PROMPTS):
        g, r = searches(SMALL, [prompt], alone, offset=i)
        run_lockstep(g, alone, embed_many, max_rows=2)  # tiny batches too
        assert count_nodes(r[0][0]) == count_nodes(roots[i][0])
        assert_same_tree(r[0][0], _as_ref(roots[i][0]), rel=0)
    assert together.calls < alone.calls


class _Ref:  # view a Node as a RefNode (children as a dict) to reuse assert_same_tree
    def __init__(self, node):
        self.n, self.fn, self.q, self.p, self.tokens = node.n, node.fn, node.q, node.p, node.tokens
        self.children = {ch.tokens: _Ref(ch) for ch in node.children}


def _as_ref(node):
    return _Ref(node)


def test_commit_budget_subtree_reuse_and_early_stop():
    never_stop = rain_params(max_new_tokens=20, T=18, V=2.0)  # q never exceeds 2: every round runs its budget
    backend = StubBackend()
    gens, roots = searches(never_stop, PROMPTS[:1], backend)
    (res,) = run_lockstep(gens, backend, embed_many)
    st = res.stats
    assert st.early_stops == 0 and st.commits == len(res.commits) >= 3
    # round 1 runs T; each later round runs max(T, fn + 15) - fn with fn the committed child's inherited visits
    assert st.iterations == 18 + sum(max(18 - c["fn"], 15) for c in res.commits[:-1])
    # the committed children are the first root's own nodes: each new root kept its subtree and statistics
    node = roots[0][0]
    for c in res.commits:
        node = next(ch for ch in node.children if list(ch.tokens) == c["tokens"])
        assert node.fn >= c["fn"] > 0
    assert node is res.root
    assert sum(len(c["tokens"]) for c in res.commits) == len(res.answer_ids)
    # token sets of 1, 2, 4, then 10 tokens (one ending in EOS is cut there)
    sizes = [len(c["tokens"]) for c in res.commits]
    schedule = [min(1 << i, 10) if i < 3 else 10 for i in range(len(sizes))]
    assert sizes[:-1] == schedule[:-1] and sizes[-1] <= schedule[-1]
    assert sizes[-1] == schedule[-1] or res.answer_ids[-1] == CODEC.eos_id
    eager = rain_params(max_new_tokens=20, T=18, T_m=0, V=-2.0)  # stop as soon as the best child has a visit
    gens, _ = searches(eager, PROMPTS[:1], StubBackend())
    (res,) = run_lockstep(gens, StubBackend(), embed_many)
    assert res.stats.early_stops == res.stats.commits and res.stats.iterations < st.iterations


def judged_dialogues(prompt: str, n: int) -> list[str]:
    """The dialogues of the first n judge requests of a search (drives the generator by hand)."""
    backend = StubBackend()
    (gen,), _ = searches(rain_params(max_new_tokens=30, T=20), [prompt], backend)
    out, reply = [], None
    req = next(gen)
    while len(out) < n:
        if isinstance(req, Extend):
            reply = backend.extend(req.rows, req.want_cache)
            if req.purpose == "judge":
                full = CODEC.decode(list(req.rows[0][0][0]) + req.rows[0][1])
                out.append(full[len("Judge:") : full.rindex("|")])
        else:
            reply = embed_many(req.texts)
        req = gen.send(reply)
    return out


def test_rollout_adds_no_tokens_after_punctuation():
    # The first evaluation is the empty answer: the state ends in "Assistant:" (a colon), so no rollout.
    prompt = "\n\nHuman: tell me a story\n\nAssistant:"
    assert judged_dialogues(prompt, 1) == [prompt]
    # A state that does not end in punctuation is rolled out until it does.
    open_prompt = "\n\nHuman: tell me a story\n\nAssistant: once"
    (first,) = judged_dialogues(open_prompt, 1)
    assert first.startswith(open_prompt) and len(first) > len(open_prompt) and first[-1] in ",.?:;\n"


def test_length_buckets_bound_padding():
    lengths = [1, 1, 40, 1, 38, 2, 1]
    groups = length_buckets(lengths, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert all(len(g) <= 3 for g in groups)
    for g in groups:  # padding at most doubles the work of a forward
        assert max(lengths[i] for i in g) * len(g) <= 2 * sum(lengths[i] for i in g)


# ------------------------------------------------------------------------------ the real model path (HF, KV cache)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.unit.rain.stub import VOCAB

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def test_cached_batched_forwards_match_full_forwards(tiny_llama):
    from alignlab.rain.lm import HFBackend

    backend = HFBackend(tiny_llama, pad_id=0)
    full = lambda ids: tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].float()  # noqa: E731
    with torch.no_grad():
        segs, logits = backend.extend([((), [1, 5, 6, 7]), ((), [1, 9]), ((), [1, 2, 3, 4, 5, 6, 7, 8])])
        for ids, lg in zip(([1, 5, 6, 7], [1, 9], [1, 2, 3, 4, 5, 6, 7, 8]), logits, strict=True):
            torch.testing.assert_close(lg, full(ids))
        # rows continuing different cached prefixes (of different lengths, some in several segments), one batch
        s2, l2 = backend.extend([((segs[0],), [11, 12]), ((segs[1],), [13]), ((segs[2],), [3])])
        torch.testing.assert_close(l2[0], full([1, 5, 6, 7, 11, 12]))
        torch.testing.assert_close(l2[1], full([1, 9, 13]))
        torch.testing.assert_close(l2[2], full([1, 2, 3, 4, 5, 6, 7, 8, 3]))
        _, l3 = backend.extend([((segs[0], s2[0]), [20]), ((segs[1] + s2[1],), [21, 22])], want_cache=False)
        torch.testing.assert_close(l3[0], full([1, 5, 6, 7, 11, 12, 20]))
        torch.testing.assert_close(l3[1], full([1, 9, 13, 21, 22]))


def test_lm_embedder_batch_equals_single(tiny_llama):
    from alignlab.rain.embed import LMEmbedder

    emb = LMEmbedder(tiny_llama, CODEC, pad_id=0, bos_id=1)
    texts = ["a short one", "a much longer text than the first", ""]
    together = emb.embed(texts)
    assert together.shape == (3, 32) and torch.allclose(together.norm(dim=-1), torch.ones(3))
    for i, t in enumerate(texts):
        torch.testing.assert_close(emb.embed([t])[0], together[i])


def test_hf_search_builds_the_reference_tree(tiny_llama):
    """The whole efficient path on a transformers model (KV segments, padded batches, cached judge preamble,
    LM embeddings) against the reference doing a full forward for every logit it needs."""
    from alignlab.rain.embed import LMEmbedder
    from alignlab.rain.lm import HFBackend

    backend = HFBackend(tiny_llama, pad_id=0)
    embedder = LMEmbedder(tiny_llama, CODEC, pad_id=0, bos_id=1)
    params = rain_params(max_new_tokens=10, T=15, n_candidates=3, token_set_lengths=(1, 2, 3))
    prompts = PROMPTS[1:2]
    with torch.no_grad():
        gens, roots = searches(params, prompts, backend)
        results = run_lockstep(gens, backend, embedder.embed)
        full = lambda ids: tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].float()  # noqa: E731
        for i, prompt in enumerate(prompts):
            answer, first, _ = ref_rain(
                prompt, lm=full, embed=lambda t: embedder.embed([t])[0], codec=CODEC, judge=stub_judge(),
                P=params, rng=np.random.default_rng([0, i]),
            )  # fmt: skip
            assert results[i].answer_ids == answer
            assert_same_tree(roots[i][0], first, rel=1e-6)
            assert count_nodes(roots[i][0]) > 30 and results[i].stats.commits >= 3


def test_reward_model_evaluator_extension():
    """evaluator=reward_model: v = tanh(score) from the scorer, no judge prompts (an extension, off by default)."""
    backend, scored = StubBackend(), []

    def score(prompts, responses):
        scored.extend(responses)
        return torch.tensor([-3.0 if "x" in r else 3.0 for r in responses])

    judge = stub_judge()
    pre_ids = CODEC.encode(judge.preamble)
    gen = rain_search(
        PROMPTS[0], params=rain_params(max_new_tokens=20, T=16), codec=CODEC, judge=None, judge_prefix=(),
        judge_prefix_ids=pre_ids, rng=np.random.default_rng(0), use_reward_model=True,
    )  # fmt: skip
    (res,) = run_lockstep([gen], backend, embed_many, score=score)
    assert res.stats.evaluations == len(scored) > 0 and "judge" not in res.stats.tokens_by_purpose
    assert res.root.q != 0 and abs(res.root.q) <= 1
