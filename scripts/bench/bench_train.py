"""SFT and reward-model training throughput: tokens/s and achieved FLOP/s against this machine's measured matmul
peak, for alignlab's stages as they run now and with the settings they ran with before (TRL's defaults).

    python scripts/bench/bench_train.py [--steps 40] [--threads 0]

Every row is `python -m alignlab stage=sft|rm ...` on TinyHH (the same data, model, batch 32 / micro-batch 16 and
step count), run one after another in this process's run; tokens/s is the median of the Trainer's log intervals
(train/num_tokens: real tokens, padding excluded) after the first, so start-up and the held-out evaluations are
not counted. Two more rows time the model's bare forward + backward on unpadded batches of the data's mean
length (no Trainer, optimizer or data loading), eager and torch.compile'd: the ceiling of any loop. FLOPs: 6 x matmul parameters per token + causal attention 6 x layers x hidden x t^2 per sequence
(scripts/bench/common.py), over the data's real sequence lengths; the peak is the best float32 matmul measured
here. Writes docs/benchmarks.md's `bench_train` section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    data_lengths,
    device,
    dtype_overrides,
    ensure_models,
    flops_per_token,
    machine,
    matmul_peak,
    median_tokens_per_s,
    publish,
    stage,
)

from alignlab import models  # noqa: E402

SFT = {
    "TRL's defaults: activation checkpointing + chunked LM-head kernel — before": [
        "stage.gradient_checkpointing=true",
        "stage.fused_lm_head=true",
    ],
    "activation checkpointing off (chunked kernel kept)": ["stage.fused_lm_head=true"],
    "**alignlab default**: no checkpointing, one log-softmax loss — after": [],
    "default + `stage.group_by_length=true` (less padding)": ["stage.group_by_length=true"],
    "default + micro-batch 32 (batch 64)": ["stage.micro_batch_size=32", "stage.batch_size=64"],
    "default + `group_by_length` + `stage.compile=true` (after a one-time ~35 s compile)": [
        "stage.group_by_length=true",
        "stage.compile=true",
    ],
}
RM = {
    "TRL's default: activation checkpointing — before": ["stage.gradient_checkpointing=true"],
    "**alignlab default**: no checkpointing — after": [],
    "default + micro-batch 32 (batch 64)": ["stage.micro_batch_size=32", "stage.batch_size=64"],
}


def raw_step(
    model_dir: Path,
    length: int,
    batch: int = 16,
    compiled: bool = False,
    reps: int = 20,
    dtype: str = "float32",
) -> float:
    """Tokens/s of the bare forward + backward of the answer loss on one unpadded batch (no Trainer, no
    optimizer, no data loading): the ceiling the stage's own loop works under. compiled: torch.compile first."""
    import time

    dev = device()
    model = models.load_causal_lm(str(model_dir), dtype=dtype).train().to(dev)
    fn = torch.compile(model, dynamic=True) if compiled else model
    ids = torch.randint(
        4, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)
    ).to(dev)

    def step():
        logits = fn(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).mean()
        loss.backward()

    for _ in range(3):  # warm-up (and the one-time compile)
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return batch * length * reps / (time.perf_counter() - t0)


def run_rows(name: str, variants: dict, common_args: list[str], workdir: Path, threads: int) -> dict:
    out = {}
    for label, extra in variants.items():
        print(f"{name}: {label} ...", flush=True)
        rows = stage([f"stage={name}", *common_args, *extra], workdir / f"{name}_{len(out)}", threads)
        out[label] = median_tokens_per_s(rows, f"{name} {label}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (log every 5)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    ap.add_argument(
        "--dtype", default="float32", help="float32 | bfloat16 (GPU): the stages' model.dtype, the peak's"
    )
    ap.add_argument("--section", default="bench_train", help="docs/benchmarks.md section ('': print only)")
    args = ap.parse_args()
    runs = ensure_models(("pretrain", "sft"))
    sft_len, rm_len = data_lengths(models.load_tokenizer(str(runs / "pretrain" / "model")))
    base = models.load_causal_lm(str(runs / "pretrain" / "model"))
    sft_fpt = flops_per_token(base, sft_len)
    # the RM trains the SFT model's backbone, the base model's shape; its 1-output head is negligible
    rm_fpt = flops_per_token(base, rm_len)

    common = [f"stage.steps={args.steps}", "stage.log_every=5", "stage.checkpoint_every=0"]
    common += dtype_overrides(args.dtype)
    with tempfile.TemporaryDirectory(prefix="alignlab-bench-") as tmp:
        work = Path(tmp)
        sft = run_rows("sft", SFT, [*common, "stage.sample_eval=0", "stage.eval_rows=16"], work, args.threads)
        rm = run_rows(
            "rm", RM, [*common, "stage.normalize_samples=0", "stage.eval_rows=16"], work, args.threads
        )
    torch.set_num_threads(args.threads or torch.get_num_threads())
    mean_len = round(statistics.mean(sft_len))
    print("bare forward + backward, eager and torch.compile ...", flush=True)
    ceiling = {
        "ceiling: the model's bare forward + backward, no Trainer (eager)": raw_step(
            runs / "pretrain" / "model", mean_len, dtype=args.dtype
        ),
        "ceiling: bare forward + backward, `torch.compile` (after a one-time compile)": raw_step(
            runs / "pretrain" / "model", mean_len, compiled=True, dtype=args.dtype
        ),
    }
    raw_fpt = flops_per_token(base, [mean_len])
    peak = matmul_peak(getattr(torch, args.dtype))
    lines = [
        f"Measured {args.dtype} matmul peak: **{peak / 1e9:.0f} GFLOP/s**. Model: TinyHH's Llama "
        f"({sft_fpt / 6 / 1e6:.2f}M FLOP-equivalent params per token incl. attention at the data's lengths); "
        f"SFT sequences {statistics.mean(sft_len):.0f} tokens on average, RM sequences "
        f"{statistics.mean(rm_len):.0f}. {args.steps} steps per row; {machine()}.",
        "",
        "| stage | configuration | tokens/s | vs before | GFLOP/s | % of matmul peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, res, fpt in (("sft", sft, sft_fpt), ("sft", ceiling, raw_fpt), ("rm", rm, rm_fpt)):
        before = next(iter(sft.values() if res is ceiling else res.values()))
        for label, tps in res.items():
            lines.append(
                f"| {name} | {label} | {tps:,.0f} | {tps / before:.2f}x | {tps * fpt / 1e9:.1f} | "
                f"**{100 * tps * fpt / peak:.0f}%** |"
            )
    publish(args.section, "SFT and reward-model training (`scripts/bench/bench_train.py`)", lines)


if __name__ == "__main__":
    main()
