"""A PPO iteration on TinyHH: where the time goes (generate / score / reference / train) and how it scales with the
rollout batch size and the response length.

    python scripts/bench/bench_ppo.py [--iterations 4] [--threads 0]

Every row is `python -m alignlab stage=ppo ...` (SFT actor, RM critic and scorer, the stage's defaults otherwise),
run one after another in this process's run; each row averages iterations 2.. (the first warms up). The phases
are the stage's own timers (metrics `time/*_s`): generate = sampling the answers (alignlab.rollout), score = the
reward model on the decoded text, reference = old log-probs, reference log-probs and values (three no-grad
forwards), train = ppo_epochs x minibatches of policy and critic updates. Writes docs/benchmarks.md's `bench_ppo`
section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dtype_overrides, ensure_models, machine, publish, stage  # noqa: E402

PHASES = ("generate", "score", "reference", "train")


def ppo_row(batch: int, new: int, iterations: int, work: Path, threads: int, extra: tuple = ()) -> dict:
    args = [
        "stage=ppo",
        f"stage.iterations={iterations}",
        f"stage.rollout_batch_size={batch}",
        f"stage.minibatch_size={min(32, batch)}",
        f"stage.max_new_tokens={new}",
        "stage.eval_prompts=16",
        "stage.sample_eval=0",
        "stage.samples_every=0",
        "stage.log_every=1",
        *extra,
    ]
    print(f"ppo: rollout batch {batch}, max_new_tokens {new} ...", flush=True)
    rows = [r for r in stage(args, work / f"ppo_{batch}_{new}", threads) if "time/generate_s" in r]
    rows = [r for r in rows if r["step"] >= 2]
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    out = {p: mean(f"time/{p}_s") for p in PHASES}
    out["total"] = sum(out[p] for p in PHASES)
    out["samples_per_s"] = batch / out["total"]
    out["length"] = mean("ppo/response_length")
    out["gen_tps"] = mean("perf/tokens_per_s_generate")
    return out


def row(label: str, r: dict) -> str:
    shares = " | ".join(f"{r[p]:.2f} ({100 * r[p] / r['total']:.0f}%)" for p in PHASES)
    return f"| {label} | {r['length']:.0f} | {shares} | {r['total']:.2f} | {r['samples_per_s']:.1f} | {r['gen_tps']:,.0f} |"


HEADER = (
    "| {what} | mean answer tokens | generate s | score s | reference s | train s | iteration s | samples/s "
    "| generate tokens/s |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--batches", default="16,32,64,128", help="rollout batch sizes (max_new_tokens 96)")
    ap.add_argument("--lengths", default="24,48,96", help="max_new_tokens values (rollout batch 64)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (GPU): the stages' model.dtype")
    ap.add_argument("--section", default="bench_ppo", help="docs/benchmarks.md section ('': print only)")
    args = ap.parse_args()
    ensure_models(("pretrain", "sft", "rm"))
    batches = [int(x) for x in args.batches.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    extra = tuple(dtype_overrides(args.dtype))
    with tempfile.TemporaryDirectory(prefix="alignlab-bench-") as tmp:
        work = Path(tmp)
        by_batch = {b: ppo_row(b, 96, args.iterations, work, args.threads, extra) for b in batches}
        by_len = {
            n: by_batch[64]
            if n == 96 and 64 in by_batch
            else ppo_row(64, n, args.iterations, work, args.threads, extra)
            for n in lengths
        }
    lines = [
        f"PPO iterations {args.iterations} per row (iteration 1 excluded), 2 PPO epochs, minibatch min(32, batch), "
        f"micro-batch 16; {args.dtype}; {machine()}.",
        "",
        "By rollout batch size (max_new_tokens 96):",
        "",
        HEADER.format(what="rollout batch"),
        *(row(str(b), r) for b, r in by_batch.items()),
        "",
        "By response budget (rollout batch 64):",
        "",
        HEADER.format(what="max_new_tokens"),
        *(row(str(n), r) for n, r in by_len.items()),
    ]
    publish(args.section, "A PPO iteration (`scripts/bench/bench_ppo.py`)", lines)


if __name__ == "__main__":
    main()
