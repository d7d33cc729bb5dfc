"""A model on TinyHH's held-out prompts, judged by the oracle: harmlessness, helpfulness, attack success,
and self-evaluation accuracy in the judge format RAIN uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from alignlab.generation import next_token_logprobs, option_token_id, sample
from alignlab.tinyhh.emitters import judge_answer, judge_prompt
from alignlab.tinyhh.oracle import judge


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a rate (well-behaved at 0 and 1 and for small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 or n successes the bound on that side is exactly the rate (floating point lands a hair inside it)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def self_eval_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Share of judgements (both option orders per row) where P(right letter) > P(wrong letter)."""
    texts, truth = [], []
    for row in rows:
        for harmless_first in (True, False):
            texts.append(judge_prompt(row["dialogue"], harmless_first))
            truth.append(judge_answer(row["harmful"], harmless_first))
    ids = [option_token_id(tokenizer, texts[0], letter) for letter in ("A", "B")]
    logp = next_token_logprobs(model, tokenizer, texts, ids, batch_size=batch_size)
    picked = ["A" if a > b else "B" for a, b in logp.tolist()]
    return sum(p == t for p, t in zip(picked, truth, strict=True)) / len(truth)


def evaluate(
    model,
    tokenizer,
    eval_sets: dict[str, list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    wrap: Callable[[str], str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Sample answers for eval_benign / eval_harmful / eval_attack rows; return (metrics, sample rows).

    wrap: what the model is shown instead of each prompt (e.g. the prompt behind a safety preprompt); the oracle
    always judges the answer against the prompt itself.
    """
    metrics: dict[str, float] = {}
    samples: list[dict] = []
    for name, rows in eval_sets.items():
        if name == "eval_selfeval":
            metrics["eval/self_eval_accuracy"] = self_eval_accuracy(model, tokenizer, rows)
            continue
        answers = sample(
            model,
            tokenizer,
            [wrap(r["prompt"]) if wrap else r["prompt"] for r in rows],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        judged = [judge(r["prompt"], a) for r, a in zip(rows, answers, strict=True)]
        kind = name.removeprefix("eval_")
        for r, a, j in zip(rows, answers, judged, strict=True):
            samples.append(
                {
                    "set": kind,
                    "prompt": r["prompt"],
                    "response": a,
                    "kind": j.kind,
                    "harmful": j.harmful,
                    "helpful": j.helpful,
                    "score": j.score,
                }
            )
        n = len(judged)
        if kind == "benign":
            k = sum(j.helpful for j in judged)
            metrics["eval/helpfulness"] = k / n
            metrics["eval/helpfulness_ci_low"], metrics["eval/helpfulness_ci_high"] = wilson_interval(k, n)
        elif kind == "harmful":
            k = sum(not j.harmful for j in judged)
            metrics["eval/harmlessness"] = k / n
            metrics["eval/harmlessness_ci_low"], metrics["eval/harmlessness_ci_high"] = wilson_interval(k, n)
        elif kind == "attack":
            k = sum(j.harmful for j in judged)
            metrics["eval/attack_success"] = k / n
            metrics["eval/attack_success_ci_low"], metrics["eval/attack_success_ci_high"] = wilson_interval(
                k, n
            )
        metrics[f"eval/{kind}_score"] = sum(j.score for j in judged) / n
    return metrics, samples


EVAL_SETS = ("eval_benign", "eval_harmful", "eval_attack", "eval_selfeval")
PROMPT_SETS = ("harmful", "benign", "attack")  # the answered sets: eval_<name>.jsonl


def tinyhh_prompts(data_dir: Path, sets, n: int) -> list[dict]:
    """[{set, prompt}]: the first n (0 = all) prompts of each named TinyHH eval set, in the order named."""
    from alignlab.data.loading import load_rows

    out = []
    for name in sets:
        if name not in PROMPT_SETS:
            raise ValueError(
                f"stage.prompt_sets: {name!r} is not a TinyHH eval set; choose from {list(PROMPT_SETS)}"
            )
        rows = load_rows(str(data_dir / f"eval_{name}.jsonl")).to_list()
        out += [{"set": name, "prompt": r["prompt"]} for r in (rows if n <= 0 else rows[:n])]
    return out


def judge_model_dir(
    model_dir: str | Path,
    data_dir: Path,
    n: int,
    max_new_tokens: int,
    device,
    seed: int,
    wrap: Callable[[str], str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Load a saved model (as a later stage would) and judge its answers to the first n prompts of each eval set."""
    from alignlab import models
    from alignlab.data.loading import load_rows

    model = models.load_causal_lm(str(model_dir)).to(device)
    tokenizer = models.load_tokenizer(str(model_dir))
    sets = {}
    for name in EVAL_SETS:
        rows = load_rows(str(data_dir / f"{name}.jsonl"))
        sets[name] = rows.select(range(min(n, len(rows)))).to_list()
    torch.manual_seed(seed)
    return evaluate(model, tokenizer, sets, max_new_tokens=max_new_tokens, wrap=wrap)
