"""Rollout generation throughput: alignlab's PPO rollout (alignlab.rollout.sample_rollout) against the plain
`model.generate` loop a user would otherwise write, same model, prompts, batch size and lengths, in one run.

    python scripts/bench/bench_rollout.py [--model runs/tinyhh/sft/model] [--batch 64] [--new 96] [--repeats 5]

Both sample with temperature 1, top_k=0, top_p=1 from the same seed; the script also checks that the two produce
the same tokens (the rollout loop is a faster implementation, not a different sampler). Prints a markdown table
and writes it into docs/benchmarks.md between the `bench_rollout` markers.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

import torch

from alignlab import models
from alignlab.data.loading import load_rows
from alignlab.rollout import sample_rollout, tokenize_prompts
from alignlab.tinyhh.emitters import Sizes, ensure

ROOT = Path(__file__).resolve().parents[2]


def plain_generate(model, tokenizer, prompts: list[str], new: int) -> tuple[list[list[int]], float]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    t0 = time.perf_counter()
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    elapsed = time.perf_counter() - t0
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t == tokenizer.eos_token_id:
                break
        rows.append(kept)
    return rows, elapsed


def alignlab_rollout(model, tokenizer, prompts, new: int) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    ro = sample_rollout(model, tokenizer, prompts, max_new_tokens=new, temperature=1.0, device="cpu")
    elapsed = time.perf_counter() - t0
    return [r[m.bool()].tolist() for r, m in zip(ro.response, ro.response_mask, strict=True)], elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs/tinyhh/sft/model"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", default=str(ROOT / "docs/benchmarks.md"))
    args = ap.parse_args()
    model = models.load_causal_lm(args.model).eval()
    tokenizer = models.load_tokenizer(args.model)
    rows = load_rows(str(ensure(ROOT / "data_cache", Sizes()) / "rl_prompts.jsonl")).to_list()[: args.batch]
    prompts = tokenize_prompts(tokenizer, rows, 256)
    ours_t, base_t, ours_n, base_n, same = 0.0, 0.0, 0, 0, 0
    alignlab_rollout(model, tokenizer, prompts, 4)  # warm-up
    plain_generate(model, tokenizer, prompts.texts, 4)
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        torch.manual_seed(r)
        base, t_base = plain_generate(model, tokenizer, prompts.texts, args.new)
        torch.manual_seed(r)
        ours, t_ours = alignlab_rollout(model, tokenizer, prompts, args.new)
        base_t, ours_t = base_t + t_base, ours_t + t_ours
        base_n, ours_n = base_n + sum(map(len, base)), ours_n + sum(map(len, ours))
        same += sum(a == b for a, b in zip(base, ours, strict=True))
    base_tps, ours_tps = base_n / base_t, ours_n / ours_t
    n_params = models.count_parameters(model)
    table = (
        f"| implementation | tokens/s | ratio |\n|---|---|---|\n"
        f"| plain `model.generate` loop | {base_tps:,.0f} | 1.00x |\n"
        f"| alignlab rollout (`sample_rollout`, PPO's path) | {ours_tps:,.0f} | **{ours_tps / base_tps:.2f}x** |\n\n"
        f"Model {args.model} ({n_params / 1e6:.2f}M params), batch {args.batch}, up to {args.new} new tokens, "
        f"{args.repeats} interleaved repeats, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Identical sampled answers (same seed): {same} of {args.batch * args.repeats}."
    )
    print(table)
    path = Path(args.write)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"<!-- bench_rollout -->\n{table}\n<!-- /bench_rollout -->"
    if "<!-- bench_rollout -->" in text:
        text = re.sub(r"<!-- bench_rollout -->.*?<!-- /bench_rollout -->", lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Rollout generation (`scripts/bench/bench_rollout.py`)\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
