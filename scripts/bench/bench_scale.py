"""How alignlab's costs grow with the model: the TinyHH scale ladder (docs/pretrain.md: ~1M, 10M, 40M parameters)
through SFT and reward-model training, PPO rollouts, a PPO iteration and RAIN, each size in one run.

    python scripts/bench/bench_scale.py                       # every rung (~25 minutes on 2 CPU cores)
    python scripts/bench/bench_scale.py --sizes 1m,10m        # some rungs
    python scripts/bench/bench_scale.py --dtype bfloat16      # on a GPU: the same tables in bfloat16
    python scripts/bench/bench_scale.py --old-logprobs        # PPO, stage.old_logprobs=forward vs sampling

Every rung runs the *same workload*: the trained 1.1M TinyHH models (pretrain, SFT, RM; trained first if missing)
embedded in a Llama of the rung's shape (conf/experiment/tinyhh_<size>.yaml: width, blocks, MLP width) that
computes the same function (scripts/bench/common.py, `widen_llama`; the max |logit difference| is printed). The
answers, their lengths, the PPO rewards and RAIN's search trees are then the trained model's at every size and only
the cost of a token grows, which is what a cost-vs-size curve should isolate: the ladder's own pretrained 10M/40M
models write different answers (the 40M one, after its 6-minute budget, mostly noise to the length limit), which
would move every generation number for reasons that are not cost. One difference from the ladder's presets: the
widened models keep the trained model's 32-dimensional heads (twice as many heads as the presets' 64-dimensional
ones); parameter counts and FLOPs are the same.

Per rung, in this order:
  sft, rm       `python -m alignlab stage=sft|rm` with the stages' defaults (batch 32, micro-batch 16), tokens/s the
                median of the Trainer's log intervals after the first (real tokens, padding excluded), GFLOP/s from
                6N per token + causal attention at the data's real lengths (common.training_flops), against the
                matmul peak measured in this run;
  rollout       alignlab's PPO rollout (alignlab.generation.generate_tokens) vs a plain `model.generate` sampling
                loop on the same SFT model, 64 prompts, answer budgets 24/48/96, interleaved repeats;
  ppo           `python -m alignlab stage=ppo` (SFT actor, RM critic and scorer, rollout batch 64, 96 new tokens),
                the stage's own phase timers averaged over iterations 2..;
  rain          scripts/bench/bench_rain.py on the pretrained base model: RAIN / vanilla wall time, forwards and
                tokens, and RAIN's wall time / its token floor (its processed tokens at cached vanilla's per-token
                cost, lockstep vs batched vanilla).
Writes docs/benchmarks.md's `bench_scale` section, docs/img/scale_cost_vs_params.png and
docs/img/scale_cost_vs_length.png, and the raw numbers to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import ours, plain_generate  # noqa: E402
from common import (  # noqa: E402
    ROOT,
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
    widen_llama,
)

from alignlab import models  # noqa: E402
from alignlab.data.loading import load_rows  # noqa: E402
from alignlab.rollout import tokenize_prompts  # noqa: E402
from alignlab.tensors import pad_sequences  # noqa: E402
from alignlab.tinyhh.emitters import Sizes, ensure  # noqa: E402

SIZES = ("1m", "10m", "40m")
BUDGETS = (24, 48, 96)
PPO_PHASES = ("generate", "score", "reference", "train")
IMG = ROOT / "docs" / "img"
TITLE = "Scale: cost vs model size (`scripts/bench/bench_scale.py`)"


def rung_arch(size: str) -> dict | None:
    """The ladder rung's Llama shape from conf/experiment/tinyhh_<size>.yaml (None: the 1.1M default itself)."""
    if size == "1m":
        return None
    from omegaconf import OmegaConf

    path = ROOT / "conf" / "experiment" / f"tinyhh_{size}.yaml"
    if not path.exists():
        raise SystemExit(f"--sizes {size}: no {path.relative_to(ROOT)}; the ladder is {', '.join(SIZES)}")
    return dict(OmegaConf.to_container(OmegaConf.load(path).model.arch))


def widened(src: Path, dest: Path, arch: dict, reward: bool) -> float:
    """Save src (a trained model directory) embedded in the rung's shape to dest; returns max |output difference|."""
    load = models.load_reward_model if reward else models.load_causal_lm
    model = load(str(src)).eval()
    wide = widen_llama(model, arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"])
    tok = models.load_tokenizer(str(src))
    probe = torch.tensor([tok("The assistant answers the question.")["input_ids"]])
    with torch.no_grad():
        diff = (wide(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
    wide.save_pretrained(dest)
    tok.save_pretrained(dest)
    return diff


def rung_models(runs: Path, arch: dict | None, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """The rung's pretrain, SFT and RM model directories (the trained ones, widened into work/ for a larger rung)
    and each widened model's max |output difference| from the trained one."""
    dirs = {k: runs / k / "model" for k in ("pretrain", "sft", "rm")}
    diffs = {}
    if arch:
        for k in dirs:
            diffs[k] = widened(dirs[k], work / k, arch, reward=k == "rm")
            dirs[k] = work / k
    return dirs, diffs


OLD_LOGPROBS = {
    "forward (default) — before": [],
    "`stage.old_logprobs=sampling` — after": ["stage.old_logprobs=sampling"],
}


def compare_old_logprobs(sizes, arches, runs, tmp: Path, args, dtype_args) -> list[str]:
    """PPO with the old log-probs from a forward (default) and from the sampling pass, at each rung, one after the
    other in this run: the phase split and the iteration's time."""
    lines = [
        f"PPO iterations 2..{args.ppo_iterations} of each run averaged (rollout batch 64, 96 new tokens, 2 PPO "
        f"epochs, micro-batch 16); {args.dtype}; {machine()}.",
        "",
        "| parameters | old log-probs | mean answer tokens | generate s | score s | reference s | train s | "
        "iteration s | vs before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        work = tmp / size
        work.mkdir()
        dirs, _ = rung_models(runs, arches[size], work)
        params = models.count_parameters(models.load_causal_lm(str(dirs["sft"])))
        before = None
        for i, (label, extra) in enumerate(OLD_LOGPROBS.items()):
            print(f"{size}: ppo, {label} ...", flush=True)
            p = ppo(
                dirs["sft"],
                dirs["rm"],
                work / f"ppo_{i}",
                args.ppo_iterations,
                args.threads,
                [*dtype_args, *extra],
            )
            before = before or p["total"]
            phases = " | ".join(f"{p[k]:.2f}" for k in PPO_PHASES)
            lines.append(
                f"| {params / 1e6:.1f}M | {label} | {p['length']:.0f} | {phases} | {p['total']:.2f} | "
                f"**{before / p['total']:.2f}x** |"
            )
    return lines


def rollouts(path: Path, dtype: str, repeats: int, batch: int = 64) -> dict:
    """Answer tokens/s and seconds per batch of alignlab's rollout and plain generate at each answer budget."""
    dev = device()
    model = models.load_causal_lm(str(path), dtype=dtype).eval().to(dev)
    tok = models.load_tokenizer(str(path))
    rows = load_rows(str(ensure(ROOT / "data_cache", Sizes()) / "rl_prompts.jsonl")).to_list()[:batch]
    q, qm = pad_sequences(tokenize_prompts(tok, rows, 256).ids, tok.pad_token_id, side="left")
    q, qm = q.to(dev), qm.to(dev)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    methods = {"plain": plain_generate, "alignlab": ours}
    for fn in methods.values():  # warm-up
        fn(model, q, qm, 4, eos, pad)
    stats = {(m, n): {"t": 0.0, "tokens": 0} for m in methods for n in BUDGETS}
    for r in range(repeats):  # interleaved: drift in machine load hits every method and budget alike
        for n in BUDGETS:
            for m, fn in methods.items():
                torch.manual_seed(r)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = fn(model, q, qm, n, eos, pad)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                stats[m, n]["t"] += time.perf_counter() - t0
                stats[m, n]["tokens"] += sum(map(len, out))
    out = {
        f"{m}_{n}": {
            "tokens_per_s": s["tokens"] / s["t"],
            "s_per_batch": s["t"] / repeats,
            "answer_tokens": s["tokens"] / repeats / batch,
        }
        for (m, n), s in stats.items()
    }
    out["prompt_tokens"] = qm.sum(1).float().mean().item()
    return out


def ppo(actor: Path, rm: Path, work: Path, iterations: int, threads: int, extra: list[str]) -> dict:
    args = [
        "stage=ppo",
        f"stage.init_from={actor}",
        f"reward.reward_model={rm}",
        f"stage.iterations={iterations}",
        "stage.rollout_batch_size=64",
        "stage.minibatch_size=32",
        "stage.max_new_tokens=96",
        "stage.eval_prompts=16",
        "stage.sample_eval=0",
        "stage.samples_every=0",
        "stage.log_every=1",
        *extra,
    ]
    rows = [r for r in stage(args, work, threads) if "time/generate_s" in r and r["step"] >= 2]
    if not rows:
        raise RuntimeError(f"ppo: no iteration after the first in {work}; raise --ppo-iterations")
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    out = {p: mean(f"time/{p}_s") for p in PPO_PHASES}
    out["total"] = sum(out[p] for p in PPO_PHASES)
    out["samples_per_s"] = 64 / out["total"]
    out["length"] = mean("ppo/response_length")
    return out


def rain(arch: dict | None, n: int, work: Path, threads: int, dtype: str) -> dict:
    out = work / "rain.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "bench_rain.py"), f"--n={n}", f"--group={3 * n}"]
    cmd += ["--reference=0", "--section=", f"--json={out}", f"--dtype={dtype}"]
    if threads:
        cmd.append(f"--threads={threads}")
    if arch:
        cmd += [
            f"--width={arch['hidden_size']}",
            f"--layers={arch['num_hidden_layers']}",
            f"--intermediate={arch['intermediate_size']}",
        ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def plots(res: dict) -> list[str]:
    """Two figures under docs/img; returns their markdown links."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res)
    params = [res[s]["params"] / 1e6 for s in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series = {
        "SFT training": [res[s]["sft"]["tokens_per_s"] for s in sizes],
        "RM training": [res[s]["rm"]["tokens_per_s"] for s in sizes],
        "rollout, alignlab": [res[s]["rollout"]["alignlab_96"]["tokens_per_s"] for s in sizes],
        "rollout, plain generate": [res[s]["rollout"]["plain_96"]["tokens_per_s"] for s in sizes],
        "PPO iteration (answer tokens)": [
            res[s]["ppo"]["samples_per_s"] * res[s]["ppo"]["length"] for s in sizes
        ],
    }
    if all("rain" in res[s] for s in sizes):
        series["RAIN, 1 prompt at a time (answer tokens)"] = [
            res[s]["rain"]["vanilla_tokens"] / res[s]["rain"]["rain_s"] for s in sizes
        ]
    for label, ys in series.items():
        a.plot(params, ys, "o-", label=label)
    a.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="tokens / s", title="Throughput")
    a.legend(fontsize=7)
    for key, label in (("sft", "SFT"), ("rm", "RM")):
        b.plot(params, [100 * res[s][key]["peak_share"] for s in sizes], "o-", label=label)
    b.axhline(50, color="grey", ls=":", label="target (SFT, largest size)")
    b.set(
        xscale="log", xlabel="parameters (M)", ylabel="% of measured matmul peak", title="Training efficiency"
    )
    b.set_ylim(0, 100)
    b.legend(fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "scale_cost_vs_params.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(sizes):
        r = res[s]["rollout"]
        for m, style in (("alignlab", "o-"), ("plain", "x--")):
            xs = [r[f"{m}_{n}"]["answer_tokens"] for n in BUDGETS]
            ys = [r[f"{m}_{n}"]["s_per_batch"] for n in BUDGETS]
            ax.plot(xs, ys, style, color=f"C{i}", label=f"{res[s]['params'] / 1e6:.1f}M, {m}")
    ax.set(xlabel="mean answer tokens (budgets 24 / 48 / 96)", ylabel="s per batch of 64 answers")
    ax.set(title="Rollout cost vs answer length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(IMG / "scale_cost_vs_length.png", dpi=110)
    plt.close(fig)
    return [
        "![throughput and training efficiency vs parameters](img/scale_cost_vs_params.png)",
        "![rollout cost vs answer length](img/scale_cost_vs_length.png)",
    ]


def table(res: dict, peak: float, dtype: str, where: str) -> list[str]:
    lines = [
        f"Measured {dtype} matmul peak: **{peak / 1e9:.0f} GFLOP/s**; {where}.",
        "",
        "| parameters | shape (width x blocks, MLP) | SFT tokens/s | SFT % of peak | RM tokens/s | RM % of peak "
        "| rollout tokens/s | plain generate tokens/s | rollout vs generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res.values():
        ro = r["rollout"]
        lines.append(
            f"| {r['params'] / 1e6:.1f}M | {r['shape']} | {r['sft']['tokens_per_s']:,.0f} | "
            f"**{100 * r['sft']['peak_share']:.0f}%** | {r['rm']['tokens_per_s']:,.0f} | "
            f"{100 * r['rm']['peak_share']:.0f}% | {ro['alignlab_96']['tokens_per_s']:,.0f} | "
            f"{ro['plain_96']['tokens_per_s']:,.0f} | **{ro['alignlab_96']['tokens_per_s'] / ro['plain_96']['tokens_per_s']:.2f}x** |"
        )
    lines += [
        "",
        "A PPO iteration (rollout batch 64, 96 new tokens, 2 PPO epochs; seconds and share of the iteration):",
        "",
        "| parameters | mean answer tokens | generate | score | reference | train | iteration s | samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.values():
        p = r["ppo"]
        shares = " | ".join(f"{p[k]:.2f} ({100 * p[k] / p['total']:.0f}%)" for k in PPO_PHASES)
        lines.append(
            f"| {r['params'] / 1e6:.1f}M | {p['length']:.0f} | {shares} | {p['total']:.2f} | {p['samples_per_s']:.1f} |"
        )
    if all("rain" in r for r in res.values()):
        n = next(iter(res.values()))["rain"]["prompts"]
        lines += [
            "",
            f"RAIN on {n} prompts (a third each harmful, benign, attack; 64 new tokens), one prompt at a time unless "
            "marked:",
            "",
            "| parameters | RAIN s | vanilla s (cached) | RAIN / vanilla wall | RAIN / released vanilla (greedy, "
            "no cache): wall, forwards, tokens | RAIN / its token floor: 1 at a time, lockstep | search "
            "bookkeeping, embeddings |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res.values():
            q = r["rain"]
            lines.append(
                f"| {r['params'] / 1e6:.1f}M | {q['rain_s']:.1f} | {q['vanilla_s']:.1f} | {q['wall_vs_vanilla']:.1f}x | "
                f"{q['wall_vs_released']:.2f}x, {q['forwards_vs_released']:.2f}x, {q['tokens_vs_released']:.2f}x | "
                f"{q['floor_one']:.2f}x, **{q['floor_lockstep']:.2f}x** | "
                f"{100 * q['search_share']:.0f}%, {100 * q['embed_share']:.0f}% |"
            )
    return lines


def publish_sweep(res: dict, peak: float, dtype: str, where: str, section: str) -> None:
    """Print the sweep's tables; with a section, also draw the plots (docs/img) and write both into it."""
    lines = table(res, peak, dtype, where)
    if section:
        lines += ["", *plots(res)]
    publish(section, TITLE, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"ladder rungs, of {', '.join(SIZES)}")
    ap.add_argument(
        "--dtype", default="float32", help="float32 | bfloat16 (the stages' model.dtype, the peak's)"
    )
    ap.add_argument("--steps", type=int, default=20, help="SFT / RM optimizer steps per rung (log every 4)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rollout repeats")
    ap.add_argument(
        "--ppo-iterations", type=int, default=3, help="PPO iterations per rung (the first excluded)"
    )
    ap.add_argument("--rain-n", type=int, default=4, help="RAIN prompts per eval set (0: skip RAIN)")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    ap.add_argument(
        "--old-logprobs",
        action="store_true",
        help="instead: PPO with stage.old_logprobs=forward vs sampling at each rung (section bench_old_logprobs)",
    )
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument(
        "--from-json", default=None, help="measure nothing: publish the tables and plots of an earlier --json"
    )
    ap.add_argument("--section", default="bench_scale", help="docs/benchmarks.md section ('': print only)")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        publish_sweep(
            saved["sizes"], saved["peak"], saved.get("dtype", "float32"), saved["machine"], args.section
        )
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    arches = {s: rung_arch(s) for s in sizes}  # every rung checked before anything runs
    if args.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype {args.dtype}: float32 or bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = ensure_models(("pretrain", "sft", "rm"))
    sft_len, rm_len = data_lengths(models.load_tokenizer(str(runs / "pretrain" / "model")))
    dtype_args = dtype_overrides(args.dtype)
    common = [
        f"stage.steps={args.steps}",
        "stage.log_every=4",
        "stage.checkpoint_every=0",
        "stage.eval_rows=16",
    ]
    if args.old_logprobs:
        with tempfile.TemporaryDirectory(prefix="alignlab-scale-") as tmp:
            lines = compare_old_logprobs(sizes, arches, runs, Path(tmp), args, dtype_args)
        title = "PPO's old log-probs from the sampling pass (`bench_scale.py --old-logprobs`)"
        publish("bench_old_logprobs" if args.section else "", title, lines)
        return
    peak = matmul_peak(getattr(torch, args.dtype))
    res = {}
    with tempfile.TemporaryDirectory(prefix="alignlab-scale-") as tmp:
        for size in sizes:
            arch, work = arches[size], Path(tmp) / size
            work.mkdir()
            dirs, diffs = rung_models(runs, arch, work)
            lm = models.load_causal_lm(str(dirs["pretrain"]))
            c = lm.config
            r = {
                "params": models.count_parameters(lm),
                "shape": f"{c.hidden_size} x {c.num_hidden_layers}, {c.intermediate_size}",
                "max_logit_difference": diffs,
            }
            print(f"{size}: {r['params'] / 1e6:.2f}M parameters ({r['shape']}); widened: {diffs}", flush=True)
            fpt_sft, fpt_rm = flops_per_token(lm, sft_len), flops_per_token(lm, rm_len)
            del lm
            for name, init, extra, fpt in (
                ("sft", dirs["pretrain"], "stage.sample_eval=0", fpt_sft),
                ("rm", dirs["sft"], "stage.normalize_samples=0", fpt_rm),
            ):
                print(f"{size}: {name} ...", flush=True)
                args_ = [f"stage={name}", f"stage.init_from={init}", *common, extra, *dtype_args]
                tps = median_tokens_per_s(stage(args_, work / f"{name}_run", args.threads), f"{size} {name}")
                r[name] = {"tokens_per_s": tps, "peak_share": tps * fpt / peak}
            print(f"{size}: rollouts ...", flush=True)
            r["rollout"] = rollouts(dirs["sft"], args.dtype, args.repeats)
            print(f"{size}: ppo ...", flush=True)
            r["ppo"] = ppo(
                dirs["sft"], dirs["rm"], work / "ppo_run", args.ppo_iterations, args.threads, dtype_args
            )
            if args.rain_n:
                print(f"{size}: rain ...", flush=True)
                r["rain"] = rain(arch, args.rain_n, work, args.threads, args.dtype)
            res[size] = r
            print(json.dumps(r, indent=1), flush=True)
    if args.json:
        saved = {"peak": peak, "dtype": args.dtype, "machine": machine(), "sizes": res}
        Path(args.json).write_text(json.dumps(saved, indent=1))
    publish_sweep(res, peak, args.dtype, machine(), args.section)


if __name__ == "__main__":
    main()
