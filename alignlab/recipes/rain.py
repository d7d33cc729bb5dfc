"""stage=rain: RAIN (Li et al. 2023) on a frozen model, against vanilla decoding of the same prompts.

No training: the model searches over its own continuations, judging partial answers itself, rewinding from the
ones it finds harmful (alignlab/rain/). Writes samples.jsonl (per prompt: the RAIN answer, the vanilla and greedy
answers, search stats), report.md, and metrics: oracle-judged harmlessness / helpfulness / attack success on
TinyHH, and the cost of RAIN relative to vanilla decoding (wall time, forward passes, tokens).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from alignlab import distributed, models
from alignlab.checkpoint import atomic_write_text
from alignlab.data import chat
from alignlab.data.formats import ASSISTANT
from alignlab.evaluation.tinyhh import self_eval_accuracy, tinyhh_prompts, wilson_interval
from alignlab.generation import cut_at_stop, sample
from alignlab.lifecycle import start_run, tinyhh_dir
from alignlab.rain.embed import LMEmbedder, SentenceTransformerEmbedder
from alignlab.rain.evaluator import judge_from_config
from alignlab.rain.lm import ForwardCounter, HFBackend, HFCodec
from alignlab.rain.lockstep import Timings, run_lockstep
from alignlab.rain.search import RainParams, rain_search
from alignlab.scoring import RewardScorer
from alignlab.tinyhh.oracle import judge as oracle

log = logging.getLogger("alignlab.rain")

# TinyHH eval set -> (metric, counts as success when): the oracle's verdicts the issue asks for.
SET_METRICS = {
    "harmful": ("harmlessness", lambda j: not j.harmful),
    "benign": ("helpfulness", lambda j: j.helpful),
    "attack": ("attack_success", lambda j: j.harmful),
}
METHODS = ("vanilla", "greedy", "rain")


def load_prompts(cfg: DictConfig) -> list[dict]:
    """[{set, prompt}]: the first n_prompts of each TinyHH eval set, or the prompts of a file / hub dataset."""
    from alignlab.data.loading import load_rows

    s = cfg.stage
    take = (lambda rows: rows) if s.n_prompts <= 0 else (lambda rows: rows[: s.n_prompts])
    if s.prompts == "tinyhh":
        return tinyhh_prompts(tinyhh_dir(cfg), s.prompt_sets, s.n_prompts)
    rows = load_rows(s.prompts, s.prompt_split).to_list()
    if s.prompt_format == "prompt":
        if rows and "prompt" not in rows[0]:
            raise ValueError(f"stage.prompts={s.prompts}: no `prompt` column (columns: {list(rows[0])})")
        prompts = [r["prompt"] for r in rows]
    else:  # hh, the authors' cut: the transcript up to its first assistant turn
        key = "transcript" if rows and "transcript" in rows[0] else "chosen"
        prompts = [r[key][: r[key].index(ASSISTANT) + len(ASSISTANT)] for r in rows if ASSISTANT in r[key]]
        if len(prompts) < len(rows):
            log.warning(
                "%d of %d rows have no assistant turn and were skipped", len(rows) - len(prompts), len(rows)
            )
    return [{"set": "prompts", "prompt": p} for p in take(prompts)]


def oracle_metrics(method: str, rows: list[dict]) -> dict[str, float]:
    """<method>/<metric> with its 95% Wilson interval, per TinyHH set present in rows."""
    out = {}
    for name, (metric, success) in SET_METRICS.items():
        judged = [r[f"{method}_judgement"] for r in rows if r["set"] == name]
        if not judged:
            continue
        k = sum(bool(success(j)) for j in judged)
        out[f"{method}/{metric}"] = k / len(judged)
        out[f"{method}/{metric}_ci_low"], out[f"{method}/{metric}_ci_high"] = wilson_interval(k, len(judged))
    return out


@dataclass
class Search:
    """What the RAIN loop runs on, built once from the frozen model: the model's codec and batched forwards, the
    judge, the embedder, the reward-model scorer (evaluator=reward_model only) and the search's params."""

    codec: HFCodec
    backend: HFBackend
    judge: Any  # alignlab.rain.evaluator.JudgeFormat, bound to the codec
    embed: Callable
    score: Any  # RewardScorer or None (self-evaluation)
    params: RainParams


def build_search(s: DictConfig, model, tokenizer, device) -> Search:
    codec = HFCodec(tokenizer)
    if s.embedder == "lm":
        embedder = LMEmbedder(model, codec, codec.pad_id, tokenizer.bos_token_id)
    else:
        embedder = SentenceTransformerEmbedder(s.sentence_model, device)
    score = None
    if s.evaluator == "reward_model":  # extension: a reward model replaces self-evaluation
        models.require_input(s.reward_model, "stage.reward_model")
        score = RewardScorer(kind="single", reward_model=s.reward_model, device=device)
    return Search(
        codec, HFBackend(model, codec.pad_id), judge_from_config(s.judge, codec), embedder.embed, score,
        RainParams.from_fields(s),
    )  # fmt: skip


def fitting_prompts(s: DictConfig, prompts: list[dict], codec: HFCodec, judge, model) -> list[dict]:
    """The prompts short enough to search (each with its index in `prompts`); the dropped ones counted. Refuses a
    config whose judge prompts cannot fit the model's context."""
    lengths = [len(codec.encode(r["prompt"])) for r in prompts]
    kept = [
        dict(r, index=i)
        for i, (r, n) in enumerate(zip(prompts, lengths, strict=True))
        if n <= s.max_prompt_length
    ]
    if len(kept) < len(prompts):
        log.warning(
            "%d prompts longer than stage.max_prompt_length=%d dropped",
            len(prompts) - len(kept),
            s.max_prompt_length,
        )
    if not kept:
        raise ValueError(
            f"no prompts left from stage.prompts={s.prompts} (stage.max_prompt_length={s.max_prompt_length})"
        )
    context = (
        len(codec.encode(judge.template)) + s.max_prompt_length + s.max_new_tokens + max(s.token_set_lengths)
    )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(
            f"a judge prompt may reach {context} tokens (template + stage.max_prompt_length + "
            f"stage.max_new_tokens + the longest token set) but the model reads {limit}: "
            "lower stage.max_prompt_length or stage.max_new_tokens"
        )
    return kept


def decode_vanilla(
    cfg: DictConfig, model, tokenizer, mine: list[dict], counter: ForwardCounter, rank: int
) -> dict:
    """Vanilla decoding of the same prompts into each row: sampling at vanilla_temperature (the issue's baseline)
    and greedy (the authors' own "vanilla" is HF generate's default, greedy for LLaMA); method -> its cost."""
    s, cost = cfg.stage, {}
    baselines = {"vanilla": s.vanilla_temperature, "greedy": 0.0} if s.vanilla else {}
    for method, temperature in baselines.items():
        torch.manual_seed(cfg.seed + rank)
        before, t0 = counter.snapshot(), time.perf_counter()
        answers = sample(
            model, tokenizer, [r["prompt"] for r in mine], max_new_tokens=s.max_new_tokens,
            temperature=temperature, stop_strings=tuple(s.stop_strings),
        )  # fmt: skip
        cost[method] = spent(counter, before) | {"wall_s": time.perf_counter() - t0}
        for r, a in zip(mine, answers, strict=True):
            r[method] = a
    return cost


def search_all(cfg: DictConfig, search: Search, mine: list[dict], counter, timings: Timings, tracker) -> dict:
    """RAIN's answer (and search stats) into each row, a lockstep group of prompts at a time, each prompt's
    uniforms from its own seeded generator; returns RAIN's cost."""
    s, codec = cfg.stage, search.codec
    pre_ids = codec.encode(search.judge.preamble)
    pre_seg = search.backend.extend([((), pre_ids)])[0][
        0
    ]  # the judge preamble, cached once for every judge prompt
    before, t_rain = counter.snapshot(), time.perf_counter()
    bar = tracker.progress(len(mine), "rain")
    for group in (mine[i : i + s.batch_prompts] for i in range(0, len(mine), s.batch_prompts)):
        t0 = time.perf_counter()
        searches = [
            rain_search(
                r["prompt"], params=search.params, codec=codec, judge=search.judge, judge_prefix=(pre_seg,),
                judge_prefix_ids=pre_ids, rng=np.random.default_rng([cfg.seed, r["index"]]),
                use_reward_model=search.score is not None,
            )
            for r in group
        ]  # fmt: skip
        results = run_lockstep(
            searches, search.backend, search.embed, search.score, s.max_batch_rows, timings
        )
        share = (time.perf_counter() - t0) / len(group)
        for r, res in zip(group, results, strict=True):
            # The same budget as vanilla's: a 10-token set may overshoot it.
            r["rain"] = cut_at_stop(codec.decode(res.answer_ids[: s.max_new_tokens]), tuple(s.stop_strings))
            r["stats"] = asdict(res.stats) | {
                "wall_s_amortised": share,
                "truncated": len(res.answer_ids) > s.max_new_tokens,
            }
        bar.update(len(group))
    bar.close()
    return spent(counter, before) | {"wall_s": time.perf_counter() - t_rain}


def spent(counter: ForwardCounter, before: dict[str, int]) -> dict[str, float]:
    return {k: counter.snapshot()[k] - before[k] for k in before}


def measure(
    cfg: DictConfig, rows: list[dict], cost: dict, timings: Timings, model, tokenizer
) -> dict[str, float]:
    """The oracle's verdicts into each row (TinyHH prompts), and every metric: oracle rates per method, the
    self-evaluation accuracy, RAIN's cost against vanilla decoding, the search stats per prompt."""
    metrics: dict[str, float] = {}
    if cfg.stage.prompts == "tinyhh":
        methods = [m for m in METHODS if m in rows[0]]
        for r in rows:
            for m in methods:
                r[f"{m}_judgement"] = oracle(r["prompt"], r[m])
        for m in methods:
            metrics |= oracle_metrics(m, rows)
        selfeval = [json.loads(x) for x in (tinyhh_dir(cfg) / "eval_selfeval.jsonl").read_text().splitlines()]
        metrics["rain/self_eval_accuracy"] = self_eval_accuracy(model, tokenizer, selfeval)
    for m, c in cost.items():
        metrics |= {f"{m}/wall_s": c["wall_s"], f"{m}/forward_passes": c["calls"], f"{m}/tokens": c["tokens"]}
    if "vanilla" in cost:
        metrics["rain/time_ratio"] = cost["rain"]["wall_s"] / cost["vanilla"]["wall_s"]
        metrics["rain/forward_ratio"] = cost["rain"]["calls"] / cost["vanilla"]["calls"]
        metrics["rain/token_ratio"] = cost["rain"]["tokens"] / cost["vanilla"]["tokens"]
    for key, value in rows[0]["stats"].items():
        if isinstance(value, int) and not isinstance(value, bool):  # iterations, rewinds, commits, ...
            metrics[f"rain/{key}_per_prompt"] = float(np.mean([r["stats"][key] for r in rows]))
    total = timings.forward_s + timings.embed_s + timings.score_s + timings.search_s
    metrics |= {
        f"rain/time_share_{k.removesuffix('_s')}": v / total
        for k, v in timings.as_dict().items()
        if k.endswith("_s") and total
    }
    return metrics


def samples_line(r: dict) -> str:
    """One samples.jsonl line: the row with each method's verdict as plain fields."""
    out = {k: v for k, v in r.items() if not k.endswith("_judgement")}
    for m in METHODS:
        if f"{m}_judgement" in r:
            j = r[f"{m}_judgement"]
            out[f"{m}_judged"] = {
                "kind": j.kind,
                "harmful": j.harmful,
                "helpful": j.helpful,
                "score": j.score,
            }
    return json.dumps(out) + "\n"


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    started = start_run(cfg)
    env, device, tracker = started.env, started.device, started.tracker
    models.require_input(s.init_from, "stage.init_from")

    # 1. The frozen model, its tokenizer, and the pieces of the search built on them.
    model = models.load_causal_lm(s.init_from, dtype=cfg.model.dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = models.load_tokenizer(s.init_from)
    chat.use(tokenizer, cfg.data.chat_template)  # prompts in the model's chat format; the judge reads HH
    search = build_search(s, model, tokenizer, device)

    # 2. Prompts; too long ones are dropped (counted): the judge prompt must fit the model's context.
    prompts = load_prompts(cfg)
    kept = fitting_prompts(s, prompts, search.codec, search.judge, model)

    # 3. Derived sizes, once: this rank's shard, lockstep groups.
    mine = kept[env.rank :: env.world_size]
    by_set = ", ".join(
        f"{n}: {sum(r['set'] == n for r in kept)}" for n in dict.fromkeys(r["set"] for r in kept)
    )
    log.info(
        "RAIN on %s: %d prompts (%s), %d on this rank in %d lockstep groups of <= %d | c=%g gamma=%g T=%d T_m=%d "
        "V=%g | similarity_update=%s dynamic_addition=%s evaluator=%s embedder=%s",
        s.init_from, len(kept), by_set, len(mine), math.ceil(len(mine) / s.batch_prompts), s.batch_prompts, s.c,
        s.gamma, s.T, s.T_m, s.V, s.similarity_update, s.dynamic_addition, s.evaluator, s.embedder,
    )  # fmt: skip
    tracker.log({"data/prompts": len(kept), "data/dropped_prompts": len(prompts) - len(kept)}, step=0)
    counter = ForwardCounter(model)

    # 4. Vanilla decoding of the same prompts (sampling and greedy).
    cost = decode_vanilla(cfg, model, tokenizer, mine, counter, env.rank)

    # 5. RAIN, a lockstep group of prompts at a time.
    timings = Timings()
    cost["rain"] = search_all(cfg, search, mine, counter, timings, tracker)
    counter.remove()

    # 6. Gather (prompt order), judge with the TinyHH oracle, write samples.jsonl, report.md and metrics (rank 0).
    rows = sorted((r for part in distributed.gather_objects(mine) for r in part), key=lambda r: r["index"])
    cost = {
        m: {k: distributed.mean_over_ranks(v) * env.world_size for k, v in c.items()} for m, c in cost.items()
    }
    metrics = measure(cfg, rows, cost, timings, model, tokenizer)
    tracker.log(metrics, step=0)
    if env.is_main:
        atomic_write_text(started.run_dir / "samples.jsonl", "".join(samples_line(r) for r in rows))
        atomic_write_text(started.run_dir / "report.md", report(s, metrics, timings))
        log.info("%s", json.dumps({k: round(v, 4) for k, v in metrics.items() if "_ci_" not in k}))
    distributed.barrier()
    tracker.close()


def report(s: DictConfig, metrics: dict[str, float], timings: Timings) -> str:
    """report.md: the oracle table (vanilla sampling, greedy, RAIN) and the cost table."""
    lines = [
        f"# RAIN on {s.init_from}",
        "",
        f"c={s.c} gamma={s.gamma} T={s.T} T_m={s.T_m} V={s.V} similarity_update={s.similarity_update} "
        f"dynamic_addition={s.dynamic_addition} evaluator={s.evaluator} embedder={s.embedder} "
        f"max_new_tokens={s.max_new_tokens}",
        "",
    ]
    names = [
        ("harmlessness", "harmlessness (harmful prompts)"),
        ("helpfulness", "helpfulness (benign prompts)"),
        ("attack_success", "attack success (suffix attacks)"),
    ]
    if any(f"rain/{k}" in metrics for k, _ in names):
        lines += ["| oracle | vanilla (sampling) | greedy | RAIN |", "|---|---|---|---|"]
        for key, label in names:
            if f"rain/{key}" not in metrics:
                continue
            cells = []
            for m in METHODS:
                v = metrics.get(f"{m}/{key}")
                lo, hi = metrics.get(f"{m}/{key}_ci_low"), metrics.get(f"{m}/{key}_ci_high")
                cells.append("-" if v is None else f"{100 * v:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Self-evaluation accuracy (judge format, held-out): {100 * metrics['rain/self_eval_accuracy']:.1f}%",
            "",
        ]
    lines += ["| cost | vanilla (sampling) | greedy | RAIN |", "|---|---|---|---|"]
    for key in ("wall_s", "forward_passes", "tokens"):
        lines.append(
            f"| {key} | "
            + " | ".join(f"{metrics[f'{m}/{key}']:.4g}" if f"{m}/{key}" in metrics else "-" for m in METHODS)
            + " |"
        )
    t = timings.as_dict()
    lines += [
        "",
        f"RAIN time: forwards {t['forward_s']:.1f}s, embeddings {t['embed_s']:.1f}s, search bookkeeping "
        f"{t['search_s']:.1f}s; {t['forwards']} batched forwards over {t['rounds']} lockstep rounds; rows by purpose "
        + ", ".join(f"{k} {v}" for k, v in sorted(timings.rows_by_purpose.items())),
        "",
    ]
    return "\n".join(lines)
