"""Memory and time of one PPO iteration on a 7B model on GPUs: an estimate to plan a first run, not a measurement.

    python scripts/bench/estimate_7b.py                                  # 8 x H100 80GB, the defaults below
    python scripts/bench/estimate_7b.py --gpus 16 --gpu H200 --gpu-memory 141 --bandwidth 4800

It follows what alignlab's `stage=ppo` holds and runs (alignlab/recipes/ppo.py, build_engines):
  - the actor and the critic (initialised from the RM, the same size) are DeepSpeed engines with AdamW;
    with model.lora.enabled only their adapters train and the base weights are frozen inside the engines;
  - the reference (without LoRA) and the reward scorer are plain frozen modules, a full copy on every rank
    (not partitioned by ZeRO-3); with LoRA the reference is the actor with its adapters switched off;
  - an iteration: generate (sampling, KV cache; under ZeRO-3 on several ranks every decoding step gathers the
    partitioned weights), score (the RM), reference (three no-grad forwards: old log-probs, reference log-probs,
    values), train (ppo_epochs passes of actor and critic forward + backward).

Memory per GPU: bfloat16 weights 2 bytes per parameter; a fully trained model adds bf16 gradients (2) and fp32
master weights + Adam moments (12): ZeRO-2 partitions gradients and optimizer state over the GPUs, ZeRO-3 the
weights too. Activations of a training micro-batch: 34 x hidden bytes per token per layer (Korthikanti et al.
2022, without the attention-matrix term: sdpa/flash attention does not store it) plus the fp32 logits and their
gradient (8 x vocabulary bytes per token); KV cache 4 x layers x hidden bytes per token.

Time: the compute phases as FLOPs (2N per token forward, 6N forward + backward) at a fraction of the GPU's peak.
That fraction is the model FLOP utilisation of SFT training (--mfu), scaled per phase by how fast the phase ran
relative to SFT training, per token, at the largest size of the scale sweep (--scale-json from
`bench_scale.py --json`): the measured per-token costs, carried to the GPU as ratios. Decoding is bounded by memory
bandwidth on a GPU (each step reads all weights and the KV cache; a CPU sweep cannot measure this), so it is
estimated from the roofline: max(compute at --mfu, bytes / --bandwidth), plus under ZeRO-3 an all-gather of the
weights per step over --link, plus --step-overhead per step for an eager decoder's kernel launches (no CUDA graphs). Writes docs/benchmarks.md's `estimate_7b` section.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A dense decoder: Llama 2 7B by default (meta-llama/Llama-2-7b-hf's config)."""

    name: str = "Llama 2 7B"
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    vocab: int = 32000

    @property
    def params(self) -> int:
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def lora_params(self, r: int) -> int:
        """Adapters of rank r on q, k, v, o (PEFT's default targets for Llama are q and v: give those counts)."""
        return self.layers * 4 * 2 * r * self.hidden


def trained_bytes(params: float, gpus: int, zero: int) -> float:
    """Per GPU: bf16 weights (2), bf16 gradients (2), fp32 master weights and Adam's two moments (12)."""
    if zero == 3:
        return 16 * params / gpus
    if zero == 2:
        return 2 * params + 14 * params / gpus
    return 16 * params  # ZeRO-0: everything replicated


def frozen_bytes(params: float, gpus: int, zero: int, in_engine: bool) -> float:
    """bf16 weights of a frozen model: partitioned by ZeRO-3 only when it lives inside an engine (a LoRA base)."""
    return 2 * params / gpus if (zero == 3 and in_engine) else 2 * params


def memory(
    shape: Shape, gpus: int, zero: int, lora_r: int, micro: int, seq: int, rollouts_per_gpu: int
) -> dict:
    """Bytes per GPU by what holds them."""
    p = shape.params
    if lora_r:
        a = shape.lora_params(lora_r)
        models = {
            "actor (LoRA: frozen base + adapters)": frozen_bytes(p, gpus, zero, True)
            + trained_bytes(a, gpus, zero),
            "critic (LoRA on the RM)": frozen_bytes(p, gpus, zero, True) + trained_bytes(a, gpus, zero),
            "reference (the actor, adapters off)": 0.0,
            "reward scorer (frozen, every rank)": frozen_bytes(p, gpus, zero, False),
        }
    else:
        models = {
            "actor (weights, gradients, AdamW)": trained_bytes(p, gpus, zero),
            "critic (weights, gradients, AdamW)": trained_bytes(p, gpus, zero),
            "reference (frozen, every rank)": frozen_bytes(p, gpus, zero, False),
            "reward scorer (frozen, every rank)": frozen_bytes(p, gpus, zero, False),
        }
    act = micro * seq * (shape.layers * 34 * shape.hidden + 8 * shape.vocab)
    kv = rollouts_per_gpu * seq * 4 * shape.layers * shape.hidden
    return {**models, "training activations (one micro-batch)": act, "rollout KV cache": kv}


def iteration_time(
    shape: Shape,
    gpus: int,
    zero: int,
    lora_r: int,
    rollouts: int,
    prompt: int,
    answer: int,
    epochs: int,
    peak: float,
    mfu: float,
    bandwidth: float,
    link: float,
    rel: dict[str, float],
    step_overhead: float = 0.0,
) -> dict:
    """Seconds per phase of one PPO iteration over `gpus` GPUs (rel: each phase's measured efficiency relative to
    SFT training per token; 1 where not measured)."""
    p, seq = shape.params, prompt + answer
    tokens = rollouts * seq
    rate = peak * mfu * gpus  # FLOP/s at SFT training's utilisation over all GPUs
    # LoRA: the backward skips the frozen weights' gradients (~2N instead of 4N per token)
    train_flops = (4 if lora_r else 6) * p * tokens * epochs * 2  # actor and critic
    t = {
        "score": 2 * p * tokens / (rate * rel.get("score", 1)),
        "reference": 3 * 2 * p * tokens / (rate * rel.get("reference", 1)),
        "train": train_flops / (rate * rel.get("train", 1)),
    }
    # generation: prefill at the compute rate, then `answer` decoding steps, each reading the weights and the
    # rows' KV cache (bandwidth-bound) or computing 2N per row (compute-bound), whichever is slower
    per_gpu = rollouts / gpus
    kv_step = per_gpu * seq * 4 * shape.layers * shape.hidden / 2  # the mean cache over the answer
    step = max(2 * p * per_gpu / (peak * mfu), (2 * p + kv_step) / bandwidth) + step_overhead
    if zero == 3 and gpus > 1:  # the LoRA base is partitioned too (it lives in the engine)
        step += 2 * p * (gpus - 1) / gpus / link  # every step all-gathers the partitioned weights
    t["generate"] = 2 * p * rollouts * prompt / rate + answer * step
    return {k: t[k] for k in ("generate", "score", "reference", "train")}


def measured_ratios(path: Path | None) -> tuple[dict[str, float], float | None, str]:
    """Each PPO phase's per-token rate relative to SFT training at the sweep's largest size, and SFT's share of peak."""
    if path is None or not path.exists():
        return {}, None, "no scale sweep given: every phase at SFT training's utilisation"
    res = json.loads(path.read_text())["sizes"]
    size, r = max(res.items(), key=lambda kv: kv[1]["params"])
    ppo, sft = r["ppo"], r["sft"]["tokens_per_s"]
    seq_tokens = 64 * (ppo["length"] + r["rollout"]["prompt_tokens"])  # the iteration's episode tokens
    # forward-only phases do a third of a training step's FLOPs per token: compare FLOP rates, not token rates
    rel = {
        "train": (2 * 2 * seq_tokens / ppo["train"]) / sft,  # 2 epochs x (actor + critic) per episode token
        "reference": (3 * seq_tokens / 3 / ppo["reference"]) / sft,
        "score": (seq_tokens / 3 / ppo["score"]) / sft,
    }
    note = f"phase rates relative to SFT training per token measured at {r['params'] / 1e6:.0f}M ({size})"
    return rel, r["sft"]["peak_share"], note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu", default="H100 SXM 80GB", help="name for the table")
    ap.add_argument("--gpu-memory", type=float, default=80, help="GB per GPU")
    ap.add_argument("--peak", type=float, default=989, help="bf16 dense TFLOP/s per GPU")
    ap.add_argument("--bandwidth", type=float, default=3350, help="memory bandwidth, GB/s per GPU")
    ap.add_argument("--link", type=float, default=300, help="all-gather bus bandwidth between GPUs, GB/s")
    ap.add_argument(
        "--step-overhead",
        type=float,
        default=5,
        help="ms per decoding step beyond the roofline (kernel launches)",
    )
    ap.add_argument("--mfu", type=float, default=0.4, help="SFT training's share of peak on the GPU")
    ap.add_argument(
        "--scale-json",
        default=str(ROOT / "docs" / "bench_scale.json"),
        help="bench_scale.py --json output, the measured ratios (default: the sweep docs/benchmarks.md shows)",
    )
    ap.add_argument("--rollouts", type=int, default=512, help="episodes per iteration (InstructGPT, Llama 2)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="PPO epochs (alignlab's default; InstructGPT 1)")
    ap.add_argument("--micro", type=int, default=4, help="training micro-batch per GPU")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--section", default="estimate_7b", help="docs/benchmarks.md section ('': print only)")
    args = ap.parse_args()
    shape = Shape()
    rel, sft_share, note = measured_ratios(Path(args.scale_json) if args.scale_json else None)
    seq = args.prompt + args.answer
    lines = [
        f"{shape.name} ({shape.params / 1e9:.2f}B parameters), {args.gpus} x {args.gpu} ({args.peak:.0f} bf16 "
        f"TFLOP/s, {args.bandwidth / 1000:.2f} TB/s, all-gather {args.link:.0f} GB/s), bfloat16; PPO with "
        f"{args.rollouts} episodes of {args.prompt} + {args.answer} tokens per iteration, {args.epochs} PPO epochs, "
        f"micro-batch {args.micro} per GPU, LoRA rank {args.lora_r} on q, k, v, o. SFT at {100 * args.mfu:.0f}% "
        f"of peak on the GPU"
        + (f" (the CPU sweep measured {100 * sft_share:.0f}% at its largest size)" if sft_share else "")
        + f"; {note}"
        + (": " + ", ".join(f"{k} {v:.2f}x" for k, v in rel.items()) if rel else "")
        + ".",
        "",
        "| setup | actor | critic | reference | scorer | activations | KV cache | total per GPU | fits "
        f"{args.gpu_memory:.0f} GB | generate s | score s | reference s | train s | iteration s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for zero in (2, 3):
        for lora in (0, args.lora_r):
            mem = memory(shape, args.gpus, zero, lora, args.micro, seq, args.rollouts // args.gpus)
            t = iteration_time(
                shape, args.gpus, zero, lora, args.rollouts, args.prompt, args.answer, args.epochs,
                args.peak * 1e12, args.mfu, args.bandwidth * GB, args.link * GB, rel, args.step_overhead / 1e3,
            )  # fmt: skip
            total = sum(mem.values())
            cells = " | ".join(f"{v / GB:.1f}" for v in mem.values())
            fits = "yes" if total <= args.gpu_memory * GB * 0.9 else "**no**"
            phases = " | ".join(f"{v:.0f}" for v in t.values())
            label = f"ZeRO-{zero}" + (f", LoRA r={lora}" if lora else ", full fine-tune")
            lines.append(
                f"| {label} | {cells} | **{total / GB:.0f}** | {fits} | {phases} | **{sum(t.values()):.0f}** |"
            )
    lines += [
        "",
        "Memory in GB per GPU; 'fits' leaves 10% for the allocator, the CUDA context and communication buffers. "
        "Times are seconds per iteration on all the GPUs together.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.section:
        from common import write_section

        write_section(args.section, "PPO on a 7B model: an estimate (`scripts/bench/estimate_7b.py`)", text)


if __name__ == "__main__":
    main()
