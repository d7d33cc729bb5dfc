"""Reward-guided decoding, batched over prompts: ARGS (token-level) and blockwise best-of-K (controlled decoding).

Both compare, beside best-of-N and RAIN, what a reward model buys at inference time. The reward model comes in as
a plain callable `score_fn(sequences) -> Tensor [N]`: each sequence is a row's full token ids (prompt without
padding + answer so far, the candidate included, an EOS too where the candidate emits it, and nothing appended);
the caller decides what to append or combine. Every decoder returns `Guided`: response [B, T] padded after the
first EOS, mask [B, T] (1 up to and including the EOS), ended [B] (generate_tokens' convention), and the compute it
ran (DecodingCost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from alignlab.generation import _rollout_cache, generate_tokens, sample_token
from alignlab.tensors import pad_sequences
from alignlab.tensors import position_ids as real_positions

ScoreFn = Callable[[list[list[int]]], torch.Tensor]


class PrefixScorer(Protocol):
    """An incremental score_fn for ARGS (scoring.PrefixScores): the reward model keeps a KV cache of each row's
    prefix, so a step feeds it only the candidates, not k whole prefixes. Rows are indices into the prompts."""

    tokens: int  # positions the reward model(s) computed so far

    def begin(self, prompts: list[list[int]]) -> None: ...

    def candidates(
        self, rows: list[int], tokens: torch.Tensor
    ) -> torch.Tensor: ...  # [n, k] -> scores [n, k]

    def advance(self, rows: list[int], tokens: torch.Tensor) -> None: ...  # the chosen token of each row


MODES = ("greedy", "sample")


@dataclass
class DecodingCost:
    """What one decode ran, for compute accounting (FLOPs ~ 2 x params x tokens per model)."""

    policy_forwards: int = 0  # forward calls of the policy, each over a whole batch
    policy_tokens: int = 0  # positions the policy computed: left padding and re-encoded prefixes included
    reward_calls: int = 0  # calls of score_fn
    reward_sequences: int = 0  # sequences passed to score_fn
    # their summed lengths (as passed: what the caller appends is not counted), per reward model
    reward_tokens: int = 0


@dataclass
class Guided:
    response: torch.Tensor  # [B, T] answer ids, pad after the first EOS; T <= max_new_tokens
    response_mask: torch.Tensor  # [B, T] 1 up to and including the EOS
    ended: torch.Tensor  # [B] bool: the answer ended with EOS (else it ran out of max_new_tokens)
    cost: DecodingCost = field(default_factory=DecodingCost)


# ------------------------------------------------------------------ pure selection steps


def args_scores(logprobs_topk: torch.Tensor, rewards: torch.Tensor, w: float) -> torch.Tensor:
    """ARGS's candidate score log p(c | x) + w * r([x, c]): [B, k], [B, k] -> [B, k] (Khanov et al. 2024).

    The reference code (github.com/deeplearning-wisc/args) adds w * r to the raw logits; log p differs from them by
    a constant per row (the log-normaliser), so the argmax and softmax over the k candidates are the same.
    """
    return logprobs_topk + w * rewards


def args_pick(
    scores: torch.Tensor, mode: str = "greedy", temperature: float = 1.0, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """The chosen candidate of each row, [B, k] -> [B] indices into k.

    greedy (ARGS-greedy): the argmax, the lowest index on ties. sample (ARGS-stochastic): one draw from
    softmax(scores / temperature) over the k candidates, by inverse CDF with `uniform` [B, 1] (drawn if None).
    """
    if mode == "greedy":
        return scores.argmax(-1)  # torch returns the first maximal index
    return sample_token(scores, temperature, "inverse_cdf", uniform)


def best_of_block(scores: torch.Tensor) -> torch.Tensor:
    """The best of each row's K continuations, [B, K] -> [B]; ties go to the lowest index (deterministic)."""
    return scores.argmax(-1)


# ------------------------------------------------------------------ decoders


@torch.no_grad()
def args_decode(
    model,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    score_fn: ScoreFn | PrefixScorer,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    k: int = 10,
    w: float = 1.0,
    mode: str = "greedy",
    temperature: float = 1.0,
) -> Guided:
    """ARGS, Alignment as Reward-Guided Search (Khanov, Burapacheep, Li, ICLR 2024, arXiv 2402.01694).

    Each step, for every unfinished row: the policy's top-k next tokens c (by logit), each scored
    log p(c | x) + w * r([x, c]) with r = score_fn of the prefix with c appended (an EOS among the top-k is a
    candidate like any other); greedy takes the best, sample draws from softmax(score / temperature) over the k
    (the reference code's ARGS-stochastic defaults to temperature 0.7). Defaults k=10, w=1.0: the ARGS-greedy
    example of the authors' repository README (a stored output there is named greedy_rm_1.5; the paper varies w,
    larger w buying reward at the cost of fluency and diversity). w=0 is the policy's own top-k decoding (greedy:
    plain greedy decoding) and calls no reward.

    The policy runs incrementally on a KV cache (one token per row per step after the prompt). A plain score_fn
    scores the k candidate prefixes whole, one call per step for all unfinished rows; a PrefixScorer (as the
    reference code does) keeps the reward model's KV cache of each chosen prefix and is fed only the candidates,
    then the chosen token. reward_tokens counts what ran either way.
    A row that emitted EOS is done: pad afterwards, no more reward calls, and it leaves the batch (and the cache)
    where the cache allows. k above the vocabulary size means the whole vocabulary.
    """
    check_args(
        max_new_tokens=max_new_tokens, sampling=mode == "sample", temperature=temperature, k=k, w=w, mode=mode
    )
    cost = DecodingCost()
    policy = _CountingPolicy(model, cost)
    batch, width, device = len(query), query.shape[1], query.device
    prompts, answers = _prompt_ids(query, query_mask), [[] for _ in range(batch)]
    own_cache = past = _rollout_cache(model, width + max_new_tokens)
    incremental = hasattr(score_fn, "candidates")  # a PrefixScorer: the reward model keeps its own KV cache
    if incremental and w > 0:
        score_fn.begin(prompts)
        cost.reward_tokens += score_fn.tokens
    mask = query_mask.new_ones(batch, width + max_new_tokens, dtype=torch.long)
    mask[:, :width] = query_mask
    filled, positions, input_ids = width, real_positions(query_mask), query
    rows = torch.arange(batch, device=device)  # original row of each row still in the batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        out = policy(
            input_ids=input_ids,
            attention_mask=mask[:, :filled],
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        rewards = torch.zeros_like(top_lp)
        live = (~done).nonzero().squeeze(1)
        if w > 0 and incremental:
            before = score_fn.tokens
            rewards[live] = score_fn.candidates(rows[live].tolist(), top_ids[live]).to(rewards)
            cost.reward_calls += 1
            cost.reward_sequences += top_ids[live].numel()
            cost.reward_tokens += score_fn.tokens - before
        elif w > 0:
            ids, origin = top_ids.tolist(), rows.tolist()
            seqs = [prompts[origin[i]] + answers[origin[i]] + [c] for i in live.tolist() for c in ids[i]]
            rewards[live] = _score(score_fn, seqs, cost).to(rewards).view(len(live), -1)
        # One uniform per original row every step, as generate_tokens draws: leaving the batch shifts no draw.
        uniform = torch.rand(batch, 1, device=device)[rows] if mode == "sample" else None
        choice = args_pick(args_scores(top_lp, rewards, w), mode, temperature, uniform)
        token = top_ids.gather(1, choice[:, None]).squeeze(1).masked_fill(done, pad_id)
        for i, t in zip(rows[live].tolist(), token[live].tolist(), strict=True):
            answers[i].append(t)
        done = done | (token == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if w > 0 and incremental:  # the chosen tokens join the reward model's cached prefixes
            before, going = score_fn.tokens, ~done
            score_fn.advance(rows[going].tolist(), token[going])
            cost.reward_tokens += score_fn.tokens - before
        input_ids, filled, positions = token[:, None], filled + 1, positions[:, -1:] + 1
        # HF's own caches (sliding window, recurrent, ...) are shaped by HF: those keep their finished rows.
        if bool(done.any()) and (past is None or past is own_cache):
            keep = (~done).nonzero().squeeze(1)
            if past is not None:
                past.batch_select_indices(keep)
            rows, done, input_ids, positions, mask = (
                rows[keep],
                done[keep],
                input_ids[keep],
                positions[keep],
                mask[keep],
            )
    return _guided(answers, eos_id, pad_id, device, cost)


@torch.no_grad()
def blockwise_decode(
    model,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    score_fn: ScoreFn,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    num_candidates: int = 4,
    block_size: int = 8,
    temperature: float = 1.0,
    sampler: str = "inverse_cdf",
) -> Guided:
    """Blockwise best-of-K (Mudgal et al., "Controlled Decoding from Language Models", ICML 2024,
    arXiv 2310.17022: blockwise CD, with the reward model as the prefix scorer in place of a trained value).

    Until the answer ends or max_new_tokens: sample num_candidates (K) continuations of block_size (M) tokens from
    the current prefix by pure ancestral sampling at `temperature` (generate_tokens), score each prefix +
    continuation with score_fn, append the best (ties: the lowest index). A chosen continuation that emitted EOS
    ends the answer; the last block is cut to the remaining budget. K=1 is plain sampling and calls no reward.
    K=4, M=8 are our defaults for small models (the paper sweeps K and M; M=1 is tokenwise best-of-K, M as long
    as the answer is best-of-K).

    Each block re-encodes its K left-padded prefixes from scratch (counted in the cost): no cache is kept across
    blocks. Finished rows leave the next block; generate_tokens drops finished candidates within a block.
    With K=1 a single row draws exactly the tokens of one generate_tokens call from the same seed (both draw one
    uniform per row and step); in a batch that holds only until some row ends, since later blocks draw for fewer rows.
    """
    check_args(
        max_new_tokens=max_new_tokens,
        sampling=True,
        num_candidates=num_candidates,
        block_size=block_size,
        temperature=temperature,
    )
    cost = DecodingCost()
    policy = _CountingPolicy(model, cost)
    device, n_cand = query.device, num_candidates
    prompts = _prompt_ids(query, query_mask)
    answers: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # unfinished rows: their answers all have the same length
    while live and (n := min(block_size, max_new_tokens - len(answers[live[0]]))) > 0:
        prefixes = [prompts[r] + answers[r] for r in live for _ in range(n_cand)]
        ids, mask = pad_sequences(prefixes, pad_id, "left")
        response, response_mask, _ = generate_tokens(
            policy,
            ids.to(device),
            mask.to(device),
            max_new_tokens=n,
            temperature=temperature,
            eos_id=eos_id,
            pad_id=pad_id,
            sampler=sampler,
        )
        lengths = response_mask.sum(1).tolist()
        continuations = [row[:m] for row, m in zip(response.tolist(), lengths, strict=True)]
        best = [0] * len(live)
        if n_cand > 1:
            seqs = [p + c for p, c in zip(prefixes, continuations, strict=True)]
            best = best_of_block(_score(score_fn, seqs, cost).view(len(live), n_cand)).tolist()
        for j, r in enumerate(live):
            answers[r] += continuations[j * n_cand + best[j]]
        live = [r for r in live if answers[r][-1] != eos_id]
    return _guided(answers, eos_id, pad_id, device, cost)


def check_args(
    *,
    max_new_tokens: int,
    sampling: bool,
    temperature: float = 1.0,
    k: int = 1,
    w: float = 0.0,
    mode: str = "greedy",
    num_candidates: int = 1,
    block_size: int = 1,
) -> None:
    """One ValueError naming the first bad parameter and its fix (temperature matters only when sampling)."""
    problems = [
        (max_new_tokens < 1, f"max_new_tokens={max_new_tokens}: an answer needs at least 1 new token"),
        (k < 1, f"k={k}: ARGS scores at least 1 candidate token per step (the paper uses k=10)"),
        (not w >= 0, f"w={w}: the reward weight must be >= 0 (0 = the policy's own top-k decoding)"),
        (mode not in MODES, f"mode={mode!r}: choose one of {', '.join(MODES)}"),
        (num_candidates < 1, f"num_candidates={num_candidates}: best-of-K needs K >= 1 continuations"),
        (block_size < 1, f"block_size={block_size}: a block needs at least 1 token"),
        (sampling and not temperature > 0, f"temperature={temperature}: sampling needs temperature > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


# ------------------------------------------------------------------ plumbing


class _CountingPolicy:
    """The policy, counting its forward calls and the positions they compute. generate_tokens and args_decode
    reach a model only by calling it and through .config (for the KV cache), both passed through."""

    def __init__(self, model, cost: DecodingCost):
        self.model, self.cost = model, cost

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, *, input_ids: torch.Tensor, **kwargs):
        self.cost.policy_forwards += 1
        self.cost.policy_tokens += input_ids.numel()
        return self.model(input_ids=input_ids, **kwargs)


def _score(score_fn: ScoreFn, seqs: list[list[int]], cost: DecodingCost) -> torch.Tensor:
    scores = torch.as_tensor(score_fn(seqs), dtype=torch.float32).flatten()
    if len(scores) != len(seqs):
        raise ValueError(
            f"score_fn returned {len(scores)} scores for {len(seqs)} sequences; it must return one each"
        )
    cost.reward_calls += 1
    cost.reward_sequences += len(seqs)
    cost.reward_tokens += sum(len(s) for s in seqs)
    return scores


def _prompt_ids(query: torch.Tensor, query_mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(query.cpu(), query_mask.cpu(), strict=True)]


def _guided(answers: list[list[int]], eos_id: int, pad_id: int, device, cost: DecodingCost) -> Guided:
    """Answer lists (each ending at its EOS, if any) -> generate_tokens' padded tensors."""
    response, mask = pad_sequences(answers, pad_id, "right")
    ended = torch.tensor([bool(a) and a[-1] == eos_id for a in answers])
    return Guided(response.to(device), mask.to(device), ended.to(device), cost)
