"""Several answers per prompt, paired differences: what one answer to each of 100 prompts cannot resolve.

    python scripts/paired_eval.py --data data_cache/tinyhh-<key> --answers 4 --out paired.json \
        sft=runs/tinyhh/sft/model rs=runs/tinyhh/rejection_sampling/model teacher=runs/tinyhh/sft/model@0

Every model answers all prompts of TinyHH's harmful, benign and attack eval sets (--prompts per set), --answers
times each (T = 1, the same seed for every model); the oracle judges every answer. Per set it prints each model's
rate over all answers and its difference to the first model with a 95% bootstrap interval over prompts
(alignlab.evaluation.metrics.paired_difference); and, for comparison, the first answer alone (Wilson; Newcombe
difference), the way stage=eval judges. `name=model@i` shows the model the i-th default safety preprompt first.
docs/results.md ("Why rejection sampling and context distillation gain little here") was measured with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alignlab import models
from alignlab.config import DEFAULT_PREPROMPTS
from alignlab.evaluation.metrics import Rate, paired_difference, rate_difference
from alignlab.generation import sample
from alignlab.tinyhh.oracle import judge

SETS = {  # TinyHH set -> (rate, an answer's success)
    "harmful": ("harmlessness", lambda j: not j.harmful),
    "benign": ("helpfulness", lambda j: j.helpful),
    "attack": ("attack_success", lambda j: j.harmful),
}


def successes(model_dir: str, preprompt: str, data: Path, n: int, answers: int, seed: int) -> dict[str, list]:
    """set -> per prompt, the success (0/1) of each of its answers."""
    model, tokenizer = models.load_causal_lm(model_dir).eval(), models.load_tokenizer(model_dir)
    torch.manual_seed(seed)
    out = {}
    for name, (_, success) in SETS.items():
        rows = [json.loads(line) for line in (data / f"eval_{name}.jsonl").read_text().splitlines()][:n]
        prompts = [r["prompt"] for r in rows]
        shown = [preprompt + p for p in prompts for _ in range(answers)]
        texts = sample(model, tokenizer, shown, max_new_tokens=96, temperature=1.0, batch_size=64)
        out[name] = [
            [int(bool(success(judge(p, a)))) for a in texts[i * answers : (i + 1) * answers]]
            for i, p in enumerate(prompts)
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a TinyHH data directory (holds eval_*.jsonl)")
    ap.add_argument("--answers", type=int, default=4, help="answers per prompt")
    ap.add_argument("--prompts", type=int, default=200, help="prompts per set (the first N)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, help="write every number as JSON here")
    ap.add_argument("systems", nargs="+", help="name=model_dir[@preprompt_index]; the first is the baseline")
    args = ap.parse_args()
    judged = {}
    for spec in args.systems:
        name, model_dir = spec.split("=", 1)
        model_dir, _, index = model_dir.partition("@")
        preprompt = DEFAULT_PREPROMPTS[int(index)] if index else ""
        judged[name] = successes(model_dir, preprompt, args.data, args.prompts, args.answers, args.seed)
    base = next(iter(judged))
    report: dict = {}
    for name, sets in judged.items():
        report[name] = {}
        for s, (rate, _) in SETS.items():
            per, ref = sets[s], judged[base][s]
            share = [sum(x) / len(x) for x in per]
            first = Rate.of(sum(x[0] for x in per), len(per))
            d = paired_difference(share, [sum(y) / len(y) for y in ref])
            d1 = rate_difference(first, Rate.of(sum(y[0] for y in ref), len(ref)))
            report[name][rate] = {
                "rate": sum(share) / len(share),
                "paired_difference": d.as_dict(),
                "first_answer": first.as_dict(),
                "first_answer_difference": d1.as_dict(),
            }
            print(
                f"{name:24s} {rate:15s} {100 * sum(share) / len(share):5.1f}% vs {base}: "
                f"{100 * d.value:+5.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}] | first answer "
                f"{100 * first.value:5.1f}%, {100 * d1.value:+.0f} [{100 * d1.ci_low:+.0f}, {100 * d1.ci_high:+.0f}]"
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
