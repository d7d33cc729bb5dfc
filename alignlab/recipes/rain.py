"""stage=rain: RAIN (Li et al. 2023) on a frozen model, against vanilla decoding of the same prompts.

No training: the model searches over its own continuations, judging partial answers itself, rewinding from the
ones it finds harmful (alignlab/rain/). Writes samples.jsonl (per prompt: the RAIN answer, the vanilla and greedy
answers, search stats), report.md, and metrics: oracle-judged harmlessness / helpfulness / attack success on
TinyHH, RAIN's difference to greedy (the authors' vanilla) and to sampling (ours) with 95% Newcombe intervals, and
the cost of RAIN relative to vanilla decoding (wall time, forward passes, tokens).

stage.preamble (a few-shot chat, as the authors' f1.txt) is shown before every prompt when the model generates
(RAIN, vanilla and greedy alike) and never to a judge: RAIN's self-evaluation reads the current exchange only, the
oracle the prompt itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from alignlab import compute, distributed, models
from alignlab.checkpoint import atomic_write_json, atomic_write_text
from alignlab.compute import ANSWER_COSTS
from alignlab.data import chat
from alignlab.data.formats import ASSISTANT
from alignlab.errors import ConfigError
from alignlab.evaluation.metrics import Rate, rate_difference
from alignlab.evaluation.tinyhh import SET_METRICS, self_eval_accuracy, tinyhh_prompts, with_heldout
from alignlab.generation import cut_at_stop, sample
from alignlab.lifecycle import start_run, tinyhh_dir
from alignlab.rain import calibrate
from alignlab.rain.calibrate import SearchDists
from alignlab.rain.embed import LMEmbedder, SentenceTransformerEmbedder
from alignlab.rain.evaluator import current_exchange, judge_from_config
from alignlab.rain.lm import ForwardCounter, HFBackend, HFCodec
from alignlab.rain.lockstep import Timings, run_lockstep
from alignlab.rain.search import RainParams, rain_search
from alignlab.scoring import RewardScorer
from alignlab.tinyhh.oracle import judge as oracle

log = logging.getLogger("alignlab.rain")

# TinyHH eval set -> (metric, counts as success when): the oracle's verdicts the issue asks for.
METHODS = ("vanilla", "greedy", "rain")
# RAIN's differences, named rain_vs_<baseline>: greedy first, the authors' vanilla (HF generate()'s default, greedy
# for LLaMA); then vanilla sampling at stage.vanilla_temperature, the baseline of the issue and of the other stages.
BASELINES = ("greedy", "vanilla")


def load_prompts(cfg: DictConfig) -> list[dict]:
    """[{set, prompt}]: the first n_prompts of each TinyHH eval set, or the prompts of a file / hub dataset."""
    from alignlab.data.loading import load_rows

    s = cfg.stage
    take = (lambda rows: rows) if s.n_prompts <= 0 else (lambda rows: rows[: s.n_prompts])
    if s.prompts == "tinyhh":
        data_dir = tinyhh_dir(cfg)
        return tinyhh_prompts(data_dir, with_heldout(s.prompt_sets, data_dir, s.heldout), s.n_prompts)
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


def oracle_rates(method: str, rows: list[dict]) -> dict[str, Rate]:
    """metric -> the share of `method`'s answers the oracle counts as a success, per TinyHH set present in rows."""
    out = {}
    for name, (metric, success) in SET_METRICS.items():
        judged = [r[f"{method}_judgement"] for r in rows if r["set"] == name]
        if judged:
            out[metric] = Rate.of(sum(bool(success(j)) for j in judged), len(judged))
    return out


def oracle_metrics(method: str, rows: list[dict]) -> dict[str, float]:
    """<method>/<metric> with its 95% Wilson interval, per TinyHH set present in rows."""
    return {
        f"{method}/{metric}{suffix}": value
        for metric, r in oracle_rates(method, rows).items()
        for suffix, value in (("", r.value), ("_ci_low", r.ci_low), ("_ci_high", r.ci_high))
    }


def rain_differences(rates: dict[str, dict[str, Rate]]) -> dict[str, float]:
    """rain_vs_<baseline>/<metric> = RAIN's rate - the baseline's, with its 95% Newcombe interval (_ci_low,
    _ci_high), for each baseline in BASELINES and each metric both have. rates: method -> metric -> Rate."""
    out = {}
    for base in BASELINES:
        for metric, r in rates.get("rain", {}).items():
            if metric in rates.get(base, {}):
                d = rate_difference(r, rates[base][metric])
                key = f"rain_vs_{base}/{metric}"
                out |= {key: d.value, f"{key}_ci_low": d.ci_low, f"{key}_ci_high": d.ci_high}
    return out


# SearchStats' per-check values (lists): kept out of samples.jsonl; pooled into search_dists.json (pooled_dists)
DISTRIBUTIONS = ("sibling_cosines", "var_norms", "var_thresholds", "var_set_lengths")


def pooled_dists(params: RainParams, rows: list[dict]) -> SearchDists | None:
    """Every value the two embedding thresholds were compared with, pooled over the prompts (search_dists.json,
    the input of alignlab.rain.calibrate and of firing_rates); None when a row has none."""
    if not all("search_dists" in r for r in rows):
        return None
    dists = [r["search_dists"] for r in rows]
    return SearchDists(
        sim_threshold=params.sim_threshold,
        dynamic_var_coef=params.dynamic_var_coef,
        **{k: [x for d in dists for x in d[k]] for k in ("sibling_cosines", "var_norms", "var_set_lengths")},
    )


def firing_rates(dists: SearchDists, counts: list[dict]) -> dict[str, float]:
    """How often the two embedding thresholds fire, and the distributions they act on, pooled over prompts.

    dists: the run's pooled values (pooled_dists); counts: per prompt, its counters. similarity: every sibling
    cosine computed in a backup, against the run's sim_threshold (update_rate = updates / cosines computed).
    dynamic addition: ||var(child embeddings)|| / (dynamic_var_coef x set length) at every check that computed it
    (var_rate: the share below 1, the variance condition alone, as alignlab.rain.calibrate counts it;
    trigger_rate: all four conditions held)."""

    def total(key: str) -> int:
        return sum(c[key] for c in counts)

    out: dict[str, float] = {}
    cos = np.asarray(dists.sibling_cosines, dtype=float)
    if total("similarity_checks"):
        out["rain/similarity_update_rate"] = total("similarity_updates") / total("similarity_checks")
    if cos.size:
        out |= {f"rain/sibling_cos_p{q}": float(np.percentile(cos, q)) for q in (10, 50, 90, 99)}
    if total("addition_checks"):
        out["rain/addition_trigger_rate"] = total("addition_triggers") / total("addition_checks")
    if dists.var_norms:
        ratio = calibrate.per_token_variance(dists) / dists.dynamic_var_coef
        out["rain/addition_var_rate"] = calibrate.firing_rates(dists).variance
        out |= {f"rain/var_ratio_p{q}": float(np.percentile(ratio, q)) for q in (1, 10, 50, 90)}
    return out


def generation_prompts(preamble: str, prompts: list[str], turn_marker: str) -> list[str]:
    """What the model reads when it answers: stage.preamble + each prompt. The judge must still see only the
    prompt's own exchange, which it finds from the last turn marker: a prompt without one would let the preamble's
    last turn into the judged text, so it is refused."""
    if not preamble:
        return list(prompts)
    for p in prompts:
        if current_exchange(preamble + p, turn_marker) != current_exchange(p, turn_marker):
            raise ValueError(
                f"stage.preamble needs prompts with the turn marker {turn_marker!r} (stage.judge.turn_marker), so "
                f"that the judge reads the prompt's own exchange and not the preamble; this one has none: {p[:80]!r}"
            )
    return [preamble + p for p in prompts]


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
    longest = s.max_prompt_length + s.max_new_tokens + max(s.token_set_lengths)
    limit = getattr(model.config, "max_position_embeddings", None)
    heads = {"a judge prompt (template": judge.template, "a generation prompt (stage.preamble": s.preamble}
    for what, head in heads.items():
        context = longest + (len(codec.encode(head)) if head else 0)
        if limit and context > limit:
            raise ValueError(
                f"{what} + stage.max_prompt_length + stage.max_new_tokens + the longest token set) may reach "
                f"{context} tokens but the model reads {limit}: shorten it, or lower stage.max_prompt_length or "
                "stage.max_new_tokens"
            )
    return kept


def decode_vanilla(
    cfg: DictConfig, model, tokenizer, mine: list[dict], counter: ForwardCounter, rank: int
) -> dict:
    """Vanilla decoding of the same prompts (behind stage.preamble, as RAIN reads them) into each row: sampling at
    vanilla_temperature (the issue's baseline) and greedy (the authors' own "vanilla" is HF generate's default,
    greedy for LLaMA); method -> its cost."""
    s, cost = cfg.stage, {}
    baselines = {"vanilla": s.vanilla_temperature, "greedy": 0.0} if s.vanilla else {}
    for method, temperature in baselines.items():
        torch.manual_seed(cfg.seed + rank)
        before, t0 = counter.snapshot(), time.perf_counter()
        answers = sample(
            model, tokenizer, [r["shown"] for r in mine], max_new_tokens=s.max_new_tokens,
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
                r["shown"], params=search.params, codec=codec, judge=search.judge, judge_prefix=(pre_seg,),
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
            stats = asdict(res.stats)
            r["search_dists"] = {k: stats.pop(k) for k in DISTRIBUTIONS}  # summarised by firing_rates
            r["stats"] = stats | {
                "wall_s_amortised": share,
                "truncated": len(res.answer_ids) > s.max_new_tokens,
            }
        bar.update(len(group))
    bar.close()
    return spent(counter, before) | {"wall_s": time.perf_counter() - t_rain}


def spent(counter: ForwardCounter, before: dict[str, int]) -> dict[str, float]:
    return {k: counter.snapshot()[k] - before[k] for k in before}


def measure(
    cfg: DictConfig,
    rows: list[dict],
    cost: dict,
    timings: Timings,
    model,
    tokenizer,
    dists: SearchDists | None = None,
) -> dict[str, float]:
    """The oracle's verdicts into each row (TinyHH prompts), and every metric: oracle rates per method, the
    self-evaluation accuracy, RAIN's cost against vanilla decoding, the search stats per prompt, and (given the
    run's pooled_dists) how often the embedding thresholds fired."""
    metrics: dict[str, float] = {}
    if cfg.stage.prompts == "tinyhh":
        methods = [m for m in METHODS if m in rows[0]]
        for r in rows:
            for m in methods:  # the oracle reads the prompt itself, never stage.preamble
                r[f"{m}_judgement"] = oracle(r["prompt"], r[m])
        for m in methods:
            metrics |= oracle_metrics(m, rows)
        metrics |= rain_differences({m: oracle_rates(m, rows) for m in methods})
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
    if dists is not None:
        metrics |= firing_rates(dists, [r["stats"] for r in rows])
    total = timings.forward_s + timings.embed_s + timings.score_s + timings.search_s
    metrics |= {
        f"rain/time_share_{k.removesuffix('_s')}": v / total
        for k, v in timings.as_dict().items()
        if k.endswith("_s") and total
    }
    return metrics


def write_answer_costs(run_dir: Path, model_path: str, params: int, cost: dict, answers: int) -> None:
    """inference_cost.json next to samples.jsonl: per answer of each method (samples.jsonl's answer fields), the
    batched forward calls, the token positions the model ran (padding included: RAIN's batched forwards compute it) and
    their FLOPs, 2 x parameters x positions (alignlab/compute.py); stage=eval reads it for answers-file systems."""
    atomic_write_json(
        run_dir / ANSWER_COSTS,
        {
            "model": model_path,
            "params": params,
            "answers": answers,
            "methods": {
                m: {
                    "policy_forwards_per_answer": c["calls"]
                    / answers,  # batched calls, as DecodingCost counts
                    "policy_tokens_per_answer": c["tokens"] / answers,
                    "inference_flops_per_answer": compute.forward_flops(params, c["tokens"] / answers),
                }
                for m, c in cost.items()
            },
        },
    )


def samples_line(r: dict) -> str:
    """One samples.jsonl line: the row with each method's verdict as plain fields."""
    out = {k: v for k, v in r.items() if not k.endswith("_judgement") and k not in ("shown", "search_dists")}
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
    # The reward-model evaluator scores (prompt, answer) with the prompt as the search reads it.
    if s.preamble and s.evaluator == "reward_model":
        raise ConfigError(
            "stage.preamble with stage.evaluator=reward_model: the reward model would score the preamble too; "
            "unset one of them"
        )
    started = start_run(cfg)
    env, device, tracker = started.env, started.device, started.tracker
    models.require_input(s.init_from, "stage.init_from")

    # 1. The frozen model, its tokenizer, and the pieces of the search built on them.
    model = models.load_causal_lm(s.init_from, dtype=cfg.model.dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = models.load_tokenizer(s.init_from)
    chat.use(tokenizer, cfg.data.chat_template)  # prompts in the model's chat format; the judge reads HH
    search = build_search(s, model, tokenizer, device)

    # 2. Prompts; too long ones are dropped (counted): the judge and generation prompts must fit the model's
    #    context. The model reads each behind stage.preamble; the judges never see it.
    prompts = load_prompts(cfg)
    kept = fitting_prompts(s, prompts, search.codec, search.judge, model)
    shown = generation_prompts(s.preamble, [r["prompt"] for r in kept], s.judge.turn_marker)
    kept = [dict(r, shown=x) for r, x in zip(kept, shown, strict=True)]

    # 3. Derived sizes, once: this rank's shard, lockstep groups.
    mine = kept[env.rank :: env.world_size]
    by_set = ", ".join(
        f"{n}: {sum(r['set'] == n for r in kept)}" for n in dict.fromkeys(r["set"] for r in kept)
    )
    log.info(
        "RAIN on %s: %d prompts (%s), %d on this rank in %d lockstep groups of <= %d | c=%g gamma=%g T=%d T_m=%d "
        "V=%g | similarity_update=%s dynamic_addition=%s evaluator=%s embedder=%s | child_order=%s eos_rule=%s "
        "proposal_temperature=%g proposal_attempts_per_candidate=%d | preamble: %d tokens",
        s.init_from, len(kept), by_set, len(mine), math.ceil(len(mine) / s.batch_prompts), s.batch_prompts, s.c,
        s.gamma, s.T, s.T_m, s.V, s.similarity_update, s.dynamic_addition, s.evaluator, s.embedder, s.child_order,
        s.eos_rule, s.proposal_temperature, s.proposal_attempts_per_candidate,
        len(search.codec.encode(s.preamble)) if s.preamble else 0,
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
    dists = pooled_dists(search.params, rows)
    metrics = measure(cfg, rows, cost, timings, model, tokenizer, dists)
    # the thresholds the search used (null in the config: the embedder's)
    metrics |= {
        "rain/sim_threshold": search.params.sim_threshold,
        "rain/dynamic_var_coef": search.params.dynamic_var_coef,
    }
    tracker.log(metrics, step=0)
    if env.is_main:
        atomic_write_text(started.run_dir / "samples.jsonl", "".join(samples_line(r) for r in rows))
        write_answer_costs(started.run_dir, s.init_from, models.count_parameters(model), cost, len(rows))
        atomic_write_text(started.run_dir / "report.md", report(s, metrics, timings))
        if dists is not None:
            atomic_write_text(started.run_dir / "search_dists.json", json.dumps(dists.to_json()))
        log.info("%s", json.dumps({k: round(v, 4) for k, v in metrics.items() if "_ci_" not in k}))
    distributed.barrier()
    tracker.close()


ORACLE_ROWS = (
    ("harmlessness", "harmlessness (harmful prompts)"),
    ("helpfulness", "helpfulness (benign prompts)"),
    ("attack_success", "attack success (suffix attacks)"),
)
# report.md's columns: greedy (the authors' vanilla) first, then sampling (ours), then RAIN
COLUMNS = (("greedy", "greedy"), ("vanilla", "vanilla (sampling)"), ("rain", "RAIN"))


def interval_cell(metrics: dict[str, float], key: str, signed: bool = False) -> str:
    """'93.8% [72, 99]' (a rate) or '+12.5 [-3.1, +27.0]' (a difference in points), or '-' when not measured."""
    if key not in metrics:
        return "-"
    v, lo, hi = (100 * metrics[k] for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
    return f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}]" if signed else f"{v:.1f}% [{lo:.0f}, {hi:.0f}]"


def report(s: DictConfig, metrics: dict[str, float], timings: Timings) -> str:
    """report.md: the oracle table (greedy, vanilla sampling, RAIN), RAIN's differences to both, the cost table."""
    lines = [
        f"# RAIN on {s.init_from}",
        "",
        f"c={s.c} gamma={s.gamma} T={s.T} T_m={s.T_m} V={s.V} similarity_update={s.similarity_update} "
        f"dynamic_addition={s.dynamic_addition} evaluator={s.evaluator} embedder={s.embedder} "
        f"max_new_tokens={s.max_new_tokens} child_order={s.child_order} eos_rule={s.eos_rule} "
        f"proposal_temperature={s.proposal_temperature} "
        f"proposal_attempts_per_candidate={s.proposal_attempts_per_candidate}"
        + (f" preamble={len(s.preamble)} characters" if s.preamble else ""),
        "",
    ]
    header = "| oracle | " + " | ".join(label for _, label in COLUMNS) + " |"
    rows = [(k, label) for k, label in ORACLE_ROWS if f"rain/{k}" in metrics]
    if rows:
        lines += [header, "|---|---|---|---|"]
        lines += [
            f"| {label} | " + " | ".join(interval_cell(metrics, f"{m}/{k}") for m, _ in COLUMNS) + " |"
            for k, label in rows
        ]
        lines += [
            "",
            f"Self-evaluation accuracy (judge format, held-out): {100 * metrics['rain/self_eval_accuracy']:.1f}%",
            "",
            "RAIN minus each baseline, in percentage points with 95% Newcombe intervals. Greedy is the paper's "
            "comparison (the authors' vanilla is HF generate()'s default: greedy); sampling at "
            f"T={s.vanilla_temperature} is ours.",
            "",
            "| oracle | RAIN - greedy (paper's vanilla) | RAIN - sampling (ours) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {label} | "
            + " | ".join(interval_cell(metrics, f"rain_vs_{b}/{k}", signed=True) for b in BASELINES)
            + " |"
            for k, label in rows
        ]
        lines.append("")
    lines += [header.replace("| oracle |", "| cost |"), "|---|---|---|---|"]
    for key in ("wall_s", "forward_passes", "tokens"):
        lines.append(
            f"| {key} | "
            + " | ".join(
                f"{metrics[f'{m}/{key}']:.4g}" if f"{m}/{key}" in metrics else "-" for m, _ in COLUMNS
            )
            + " |"
        )
    if "rain/similarity_update_rate" in metrics or "rain/addition_var_rate" in metrics:
        get = lambda k: f"{metrics[k]:.3g}" if k in metrics else "-"  # noqa: E731
        lines += [
            "",
            f"Embedding thresholds ({s.embedder} embedder): similarity updates fire at "
            f"{get('rain/similarity_update_rate')} of sibling cosines (cos >= {get('rain/sim_threshold')}; cosine p50 "
            f"{get('rain/sibling_cos_p50')}, p90 {get('rain/sibling_cos_p90')}, p99 {get('rain/sibling_cos_p99')}); "
            f"dynamic addition's variance condition holds at {get('rain/addition_var_rate')} of checks "
            f"(||var|| / ({get('rain/dynamic_var_coef')} x set length): p1 {get('rain/var_ratio_p1')}, p50 "
            f"{get('rain/var_ratio_p50')}), all four conditions at {get('rain/addition_trigger_rate')}.",
        ]
    t = timings.as_dict()
    lines += [
        "",
        f"RAIN time: forwards {t['forward_s']:.1f}s, embeddings {t['embed_s']:.1f}s, search bookkeeping "
        f"{t['search_s']:.1f}s; {t['forwards']} batched forwards over {t['rounds']} lockstep rounds; rows by purpose "
        + ", ".join(f"{k} {v}" for k, v in sorted(timings.rows_by_purpose.items())),
        "",
    ]
    return "\n".join(lines)
