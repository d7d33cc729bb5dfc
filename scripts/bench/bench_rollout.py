"""Rollout generation throughput: alignlab's PPO rollout (alignlab.rollout.sample_rollout) against the plain
`model.generate` loop a user would otherwise write, same model, prompts, batch size and lengths, in one run.

    python scripts/bench/bench_rollout.py [--model runs/tinyhh/sft/model] [--batch 64] [--new 96] [--repeats 5]

Rows (interleaved repeats, each from the same seed):
  plain generate      model.generate(do_sample=True, top_k=0, top_p=1): the baseline;
  previous loop       alignlab's loop before the optimisations (HF's dynamic cache, torch.multinomial): "before";
  exact mode          generate_tokens(sampler="multinomial", compact=False): preallocated KV cache only; must
                      draw exactly generate's tokens (checked);
  two rows with one of the next two optimisations each, then
  alignlab rollout    the default: preallocated cache, finished rows dropped, inverse-CDF sampling (same
                      distribution, other random numbers: compared by mean length and EOS rate).
Tokens are answer tokens up to and including the EOS. Writes docs/benchmarks.md's `bench_rollout` section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device, ensure_models, machine, publish  # noqa: E402

from alignlab import models  # noqa: E402
from alignlab.data.loading import load_rows  # noqa: E402
from alignlab.generation import generate_tokens, truncate_after_eos  # noqa: E402
from alignlab.rollout import tokenize_prompts  # noqa: E402
from alignlab.tensors import pad_sequences, position_ids  # noqa: E402
from alignlab.tinyhh.emitters import Sizes, ensure  # noqa: E402


def answers(response: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in response.tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t == eos:
                break
        rows.append(kept)
    return rows


def plain_generate(model, q, qm, new, eos, pad):
    out = model.generate(
        input_ids=q,
        attention_mask=qm,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return answers(out[:, q.shape[1] :], eos)


@torch.no_grad()
def previous_loop(model, q, qm, new, eos, pad):
    """alignlab's rollout loop as it was before this benchmark (HF's DynamicCache, which concatenates every step)."""
    mask, done, tokens = qm.long(), torch.zeros(len(q), dtype=torch.bool, device=q.device), []
    pos, ids, past = position_ids(mask), q, None
    for _ in range(new):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
        )
        past = out.past_key_values
        token = (
            torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1)
            .squeeze(1)
            .masked_fill(done, pad)
        )
        tokens.append(token)
        done = done | (token == eos)
        if bool(done.all()):
            break
        ids, pos = token[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(q), 1)], dim=1)
    response, _ = truncate_after_eos(torch.stack(tokens, 1), eos, pad)
    return answers(response, eos)


def ours(model, q, qm, new, eos, pad, **kw):
    response, mask, _ = generate_tokens(
        model, q, qm, max_new_tokens=new, temperature=1.0, eos_id=eos, pad_id=pad, **kw
    )
    return [r[m.bool()].tolist() for r, m in zip(response, mask, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: runs/tinyhh/sft/model (trained first if missing)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (GPU)")
    ap.add_argument(
        "--section", default="bench_rollout", help="docs/benchmarks.md section to write ('': print only)"
    )
    args = ap.parse_args()
    path = args.model or str(ensure_models(("pretrain", "sft")) / "sft" / "model")
    dev = device()
    model = models.load_causal_lm(path, dtype=args.dtype).eval().to(dev)
    tok = models.load_tokenizer(path)
    rows = load_rows(str(ensure(ROOT / "data_cache", Sizes()) / "rl_prompts.jsonl")).to_list()[: args.batch]
    q, qm = pad_sequences(tokenize_prompts(tok, rows, 256).ids, tok.pad_token_id, side="left")
    q, qm = q.to(dev), qm.to(dev)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    methods = {
        "plain `model.generate` loop (baseline)": plain_generate,
        "alignlab's previous loop (HF dynamic cache) — before": previous_loop,
        "exact mode: preallocated KV cache (`sampler=multinomial, compact=False`)": lambda *a: ours(
            *a, sampler="multinomial", compact=False
        ),
        "preallocated cache + finished rows dropped (multinomial draw)": lambda *a: ours(
            *a, sampler="multinomial"
        ),
        "preallocated cache + inverse-CDF draw (no rows dropped)": lambda *a: ours(*a, compact=False),
        "**alignlab rollout** (preallocated cache + finished rows dropped + inverse-CDF draw) — after": ours,
    }
    stats = {k: {"t": 0.0, "tokens": 0, "ended": 0, "out": []} for k in methods}
    for fn in methods.values():  # warm-up
        fn(model, q, qm, 4, eos, pad)
    for r in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for name, fn in methods.items():
            torch.manual_seed(r)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(model, q, qm, args.new, eos, pad)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            st = stats[name]
            st["t"] += time.perf_counter() - t0
            st["tokens"] += sum(map(len, out))
            st["ended"] += sum(bool(a) and a[-1] == eos for a in out)
            st["out"].append(out)
    names = list(methods)
    base = stats[names[0]]
    base_tps = base["tokens"] / base["t"]
    n = args.batch * args.repeats
    lines = [
        "| implementation | tokens/s | vs plain generate | mean answer tokens | EOS within budget |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        st = stats[name]
        tps = st["tokens"] / st["t"]
        lines.append(
            f"| {name} | {tps:,.0f} | **{tps / base_tps:.2f}x** | {st['tokens'] / n:.1f} | "
            f"{100 * st['ended'] / n:.0f}% |"
        )
    same = lambda k: sum(  # noqa: E731
        a == b for x, y in zip(base["out"], stats[k]["out"], strict=True) for a, b in zip(x, y, strict=True)
    )
    n_params = models.count_parameters(model)
    lines.append(
        f"\nModel `{Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path}` "
        f"({n_params / 1e6:.2f}M params, {args.dtype}), batch {args.batch}, up to {args.new} new tokens, "
        f"{args.repeats} interleaved repeats; {machine()}. Same answers as plain generate from the same seed: "
        f"previous loop {same(names[1])}/{n}, exact mode {same(names[2])}/{n} (the default draws other random "
        f"numbers from the same distribution: {same(names[-1])}/{n})."
    )
    publish(args.section, "Rollout generation (`scripts/bench/bench_rollout.py`)", lines)


if __name__ == "__main__":
    main()
