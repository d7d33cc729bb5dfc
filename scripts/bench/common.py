"""Shared by the benchmarks in scripts/bench: machine facts, the measured matmul peak, FLOP counts, the TinyHH
models they run on, and writing a section of docs/benchmarks.md between its markers."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """One line: CPU or GPU model, cores/threads, torch version."""
    if torch.cuda.is_available():
        what = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")]
            cpu = names[0].split(":", 1)[1].strip() if names else cpu
        except OSError:
            pass
        what = f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{what}, torch {torch.__version__}"


def matmul_peak(dtype: torch.dtype = torch.float32, sizes=(512, 1024, 2048), seconds: float = 1.0) -> float:
    """The machine's achieved matmul FLOP/s: the best over square sizes of a timed loop (the roofline a model's
    training runs against; a single large GEMM is the most a dense layer can get)."""
    dev, best = device(), 0.0
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if time.perf_counter() - t0 > seconds / len(sizes):
                break
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def matmul_params(model) -> int:
    """Parameters that multiply every token (all but the embedding lookup): the N of the 2N / 6N FLOP rule."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return n + (out.weight.numel() if tied else 0)


def training_flops(n_matmul: int, n_layers: int, hidden: int, lengths: list[int]) -> float:
    """Forward + backward FLOPs of training on sequences of these lengths (Kaplan/PaLM: 6N per token plus the
    attention scores and values, 6 * layers * hidden * t^2 per sequence for causal attention), padding excluded."""
    return sum(6 * n_matmul * t + 6 * n_layers * hidden * t * t for t in lengths)


def flops_per_token(model, lengths: list[int]) -> float:
    """Training FLOPs per token of `model` on sequences of these lengths (training_flops / tokens)."""
    c = model.config
    return training_flops(matmul_params(model), c.num_hidden_layers, c.hidden_size, lengths) / sum(lengths)


def median_tokens_per_s(rows: list[dict], what: str) -> float:
    """A stage run's training tokens/s: the median of its logged intervals after the first (warm-up)."""
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
    if len(tps) < 2:
        raise RuntimeError(f"{what}: too few log intervals ({len(tps)}); raise --steps")
    return statistics.median(tps[1:])


def dtype_overrides(dtype: str) -> list[str]:
    """The stage overrides that run a benchmark's stages in `dtype` (none for float32, the stages' default)."""
    return [f"model.dtype={dtype}"] if dtype != "float32" else []


def widen_llama(model, width: int, layers: int, intermediate: int | None = None):
    """A trained Llama embedded in a wider, deeper one that computes the same function (to float rounding).

    The forward pass costs what a `width` x `layers` model costs, while the answers, trees and judge verdicts stay
    the trained model's, so a benchmark on it measures a larger model's per-token cost on the real workload (a
    random-init model of that size would search trees of noise). Every weight that could change the output is
    placed so it cannot: the trained weights fill the leading block of each matrix; the extra heads, MLP units
    and layers read random weights but write through zero output projections (o_proj, down_proj), so the extra
    residual dimensions stay 0; the RMSNorm weights are scaled by sqrt(h / width) and eps by h / width, which
    makes the norm over `width` dimensions, of which h are non-zero, equal the trained norm over h.
    """
    import copy
    import math

    c = model.config
    h, hd, heads = c.hidden_size, c.head_dim, c.num_attention_heads
    if c.model_type != "llama" or c.num_key_value_heads != heads:
        raise ValueError(f"widen_llama needs a Llama without grouped KV heads, got {c.model_type}")
    if width < h or width % hd or layers < c.num_hidden_layers:
        raise ValueError(
            f"width {width} must be >= {h} and a multiple of head_dim {hd}; layers {layers} >= {c.num_hidden_layers}"
        )
    intermediate = intermediate or max(c.intermediate_size, int(width * 8 / 3) // 64 * 64)
    if intermediate < c.intermediate_size:
        raise ValueError(f"intermediate {intermediate} must be >= the trained model's {c.intermediate_size}")
    # the trained model's config (its class's fields: a reward model keeps num_labels and its pad id) at the new size
    cfg = copy.deepcopy(c)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = width, intermediate, layers
    cfg.num_attention_heads = cfg.num_key_value_heads = width // hd
    cfg.head_dim, cfg.rms_norm_eps, cfg.tie_word_embeddings = hd, c.rms_norm_eps * h / width, False
    torch.manual_seed(0)
    wide = type(model)(cfg).eval()
    scale = math.sqrt(h / width)
    old, new = model.state_dict(), wide.state_dict()
    with torch.no_grad():
        for name, w in new.items():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or name == "model.embed_tokens.weight":
                w.zero_()  # the extra heads, units and layers write nothing; the extra dimensions start at 0
            if name not in old:
                continue  # an extra layer: random reads, zero writes
            src = old[name]
            if src.dim() == 1:  # an RMSNorm weight
                w.zero_()
                w[: src.shape[0]] = src * scale
            else:
                w[: src.shape[0], : src.shape[1]] = src
    return wide


def ensure_models(stages: tuple[str, ...] = ("pretrain", "sft", "rm"), experiment: str = "tinyhh") -> Path:
    """runs/<experiment>/<stage>/model for the benchmarks: trained here (the pipeline's first stages) if missing."""
    runs = ROOT / "runs" / experiment
    missing = [s for s in stages if not (runs / s / "model").exists()]
    if missing:
        print(
            f"training {', '.join(missing)} first (runs/{experiment}/): this takes a few minutes", flush=True
        )
        subprocess.run(
            [sys.executable, "-m", "alignlab", "stage=pipeline", f"stage.stages=[{','.join(stages)}]"],
            cwd=ROOT,
            check=True,
        )
    return runs


def data_lengths(tokenizer) -> tuple[list[int], list[int]]:
    """Token lengths of TinyHH's SFT rows (prompt + answer) and of its preference pairs' sequences (each of chosen
    and rejected), as the stages tokenize them: the lengths the training FLOP counts are taken over."""
    from alignlab.data.examples import sequence_ids, sft_example
    from alignlab.data.loading import load_rows
    from alignlab.tinyhh.emitters import Sizes, ensure

    data = ensure(ROOT / "data_cache", Sizes())
    sft = [len(sft_example(tokenizer, r["prompt"], r["completion"])["input_ids"]) for r in load_rows(str(data / "sft.jsonl")).to_list()]  # fmt: skip
    pairs = load_rows(str(data / "preferences.jsonl")).to_list()
    return sft, [
        len(sequence_ids(tokenizer, r["prompt"], r[k])) for r in pairs for k in ("chosen", "rejected")
    ]


def write_section(key: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace docs/benchmarks.md's `<!-- key -->` ... `<!-- /key -->` block (appended under `title` if new)."""
    if not key.strip():  # a script's `--section=''` means print only: never a block without a name
        raise ValueError(f"write_section: empty section key for {title!r}; pass a name or print instead")
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"<!-- {key} -->\n{body.strip()}\n<!-- /{key} -->"
    pattern = rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->"
    if re.search(pattern, text, flags=re.S):
        text = re.sub(pattern, lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def device_section(key: str, title: str) -> tuple[str, str]:
    """The docs section a run on this device writes: on CUDA its own `<key>_gpu` section beside the CPU one, so the
    first GPU run adds its tables instead of overwriting the CPU numbers the docs discuss."""
    if device().type == "cuda":
        return f"{key}_gpu", f"{title}, on {torch.cuda.get_device_name(0)}"
    return key, title


def publish(key: str, title: str, lines: list[str]) -> None:
    """Print a benchmark's markdown and write it into docs/benchmarks.md's `key` section (device_section); an empty
    key (a script's `--section=''`) prints only."""
    text = "\n".join(lines)
    print(text)
    if key:
        write_section(*device_section(key, title), text)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def stage(args: list[str], run_dir: Path, threads: int | None = None, timeout: int = 1800) -> list[dict]:
    """Run `python -m alignlab <args> run_dir=<run_dir>` (fresh) and return its metrics.jsonl rows."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "alignlab", *args, f"run_dir={run_dir}", "logger.progress=false"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return read_metrics(run_dir)
