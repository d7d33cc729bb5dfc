"""Where a training step's time goes at a scale-ladder size: torch.profiler over the SFT model's bare forward +
backward + AdamW step on a batch shaped like SFT's (micro-batch 16 padded to the batch's longest row), grouped into
matmuls, attention, the loss's softmax over the vocabulary, other elementwise work and the optimizer.

    python scripts/bench/profile_step.py --size 40m [--steps 5]

The model is the trained SFT model widened to the rung's shape (bench_scale.py's workload). The matmul share
and the matmuls' own achieved FLOP/s (against the peak measured in this run) say how far a step can get: a step
cannot exceed (matmul share x the matmuls' rate). Writes docs/benchmarks.md's `profile_<size>` section.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import rung_arch, rung_models  # noqa: E402
from common import data_lengths, ensure_models, machine, matmul_params, matmul_peak, publish  # noqa: E402

from alignlab import models  # noqa: E402

GROUPS = {
    "matmuls (linear layers, LM head)": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
    ),
    "attention (sdpa)": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "softmax / log-softmax (loss)": ("softmax", "log_softmax", "nll_loss", "gather"),
    "optimizer (AdamW)": ("adam", "_foreach", "Optimizer"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other elementwise and copies (norms, rotary, SiLU, casts, views)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="40m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro", type=int, default=16)
    args = ap.parse_args()
    runs = ensure_models(("pretrain", "sft", "rm"))
    lengths, _ = data_lengths(models.load_tokenizer(str(runs / "sft" / "model")))
    with tempfile.TemporaryDirectory(prefix="alignlab-profile-") as tmp:
        dirs, _ = rung_models(runs, rung_arch(args.size), Path(tmp))
        model = models.load_causal_lm(str(dirs["sft"])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    batches = []
    for _ in range(args.steps + 2):
        rows = rng.sample(lengths, args.micro)
        width = max(rows)
        ids = torch.randint(4, model.config.vocab_size, (args.micro, width))
        mask = (torch.arange(width)[None] < torch.tensor(rows)[:, None]).long()
        batches.append((ids, mask, sum(rows)))

    def step(ids, mask):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids, mask, _ in batches[:2]:  # warm-up
        step(ids, mask)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids, mask, _ in batches[2:]:
            step(ids, mask)
    # self time per op (no double counting of nested ops), grouped
    by_group, flops = defaultdict(float), 0.0
    total = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6
        total += t
        by_group[group_of(ev.key)] += t
    real = sum(n for *_, n in batches[2:])
    padded = sum(ids.numel() for ids, *_ in batches[2:])
    n = matmul_params(model)
    flops = 6 * n * padded  # the matmuls' FLOPs run on every position, padding included
    peak = matmul_peak()
    mm = by_group["matmuls (linear layers, LM head)"]
    c = model.config
    lines = [
        f"SFT model widened to the {args.size} rung ({models.count_parameters(model) / 1e6:.1f}M parameters, "
        f"{c.hidden_size} x {c.num_hidden_layers}), micro-batch {args.micro} rows of SFT's lengths padded to the "
        f"longest ({100 * real / padded:.0f}% of positions are real tokens), forward + backward + AdamW, "
        f"{args.steps} profiled steps; float32 matmul peak {peak / 1e9:.0f} GFLOP/s; {machine()}.",
        "",
        "| where | self time s | share |",
        "|---|---|---|",
    ]
    for g, t in sorted(by_group.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {g} | {t:.2f} | {100 * t / total:.0f}% |")
    lines += [
        "",
        f"The linear layers' matmuls ran at **{flops / mm / 1e9:.0f} GFLOP/s ({100 * flops / mm / peak:.0f}% of the "
        f"peak)** on all positions; the whole step reached {6 * n * real / total / 1e9:.0f} GFLOP/s on real tokens "
        f"(**{100 * 6 * n * real / total / peak:.0f}% of the peak**), of which padding costs "
        f"{100 * (1 - real / padded):.0f}% of the matmul work and everything but the matmuls "
        f"{100 * (1 - mm / total):.0f}% of the time.",
    ]
    publish(
        f"profile_{args.size}",
        f"Profile of a training step at {args.size} (`scripts/bench/profile_step.py`)",
        lines,
    )


if __name__ == "__main__":
    main()
