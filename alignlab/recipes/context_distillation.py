"""stage=context_distillation: safety context distillation, Llama 2 §4.2.4 (the project's RLHF spec, section 6).

1. take the safety-tagged prompts (only_safety; Llama 2: adversarial prompts only) of the prompt data
2. give each a safety preprompt drawn from stage.preprompts (plus the answer template of its risk category, if
   stage.answer_templates has one), joined to the prompt by stage.prompt_template
3. sample two answers from the model: one behind the preprompt (the teacher) and one to the plain prompt
4. gate (Llama 2): score both answers to the prompt WITHOUT the preprompt with the (safety) reward model, keep
   the preprompted answer only when it scores higher (CD hurts answers that were already good); a preprompted
   answer that ran out of budget (no EOS within max_new_tokens) is never kept (truncated=drop: distilling it, EOS
   appended, would teach the model to stop mid-answer)
5. write distill.jsonl (every candidate with both answers, both scores and the gate's decision) and train.jsonl
   (kept rows: the plain prompt and the preprompted answer, valid stage=sft data) before training
6. fine-tune with the SFT loss (alignlab/finetune.py, stage=sft's path, the shared DeepSpeed engine) on (prompt
   WITHOUT preprompt, answer): the model learns to answer as if the preprompt were there
7. TinyHH: the oracle judges the starting model, the starting model behind a preprompt, and the distilled model
"""

from __future__ import annotations

import gc
import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab import compute, distributed, models
from alignlab.checkpoint import atomic_write_text
from alignlab.data import chat
from alignlab.data.loading import load_rows
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.finetune import finetune, split_generated
from alignlab.lifecycle import Run, check_init_from, start_run, tinyhh_dir
from alignlab.rl.selection import distillation_gate
from alignlab.rollout import Prompts, load_prompt_rows, load_sampler, sample_one, tokenize_prompts
from alignlab.scoring import RewardScorer

log = logging.getLogger("alignlab.context_distillation")


def preprompt_for(row: dict, s: DictConfig, rng: random.Random) -> str:
    """A preprompt drawn from stage.preprompts, followed by the answer template of the row's risk category."""
    if not s.preprompts:
        raise ValueError(
            "stage.preprompts is empty: context distillation needs at least one safety preprompt"
        )
    text = rng.choice(list(s.preprompts))
    category = row.get(s.category_field)
    template = s.answer_templates.get(str(category)) if category is not None else None
    if template:
        text = f"{text} {template.replace('{category}', str(category))}"
    return text


def with_preprompt(prompt: str, preprompt: str, template: str) -> str:
    """The prompt the teacher answers: stage.prompt_template with {preprompt} and {prompt} filled in."""
    if "{prompt}" not in template or "{preprompt}" not in template:
        raise ValueError(f"stage.prompt_template={template!r} must contain both {{preprompt}} and {{prompt}}")
    return template.replace("{preprompt}", preprompt).replace("{prompt}", prompt)


def training_rows(candidates: list[dict]) -> list[dict]:
    """The kept candidates as stage=sft rows: the prompt WITHOUT its preprompt and the preprompted answer."""
    return [
        {"prompt": c["prompt"], "completion": c["response"], "score": c["score"]}
        for c in candidates
        if c["kept"]
    ]


def check_no_preprompt(rows: list[dict], preprompts: list[str]) -> None:
    """Fail loudly if any training input still carries a preprompt (the student must learn without it)."""
    for i, row in enumerate(rows):
        for p in preprompts:
            if p and p in row["prompt"]:
                raise AssertionError(f"training row {i} contains the preprompt {p!r}: {row['prompt']!r}")


def select_prompts(rows: list[dict], s: DictConfig, seed: int, source: str) -> list[dict]:
    """The first stage.n_prompts rows of a seeded order (safety-tagged ones only when only_safety)."""
    pool = [r for r in rows if r.get("is_safety")] if s.only_safety else list(rows)
    if not pool:
        raise ValueError(
            f"{source} has no safety-tagged prompts (is_safety column true): context distillation with "
            "stage.only_safety=true distills nothing; tag them or set stage.only_safety=false"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[: s.n_prompts]]


@dataclass
class ToDistill:
    """The prompts to distill: all ranks' rows (prompt, preprompt, preprompted) and this rank's share, tokenized
    plain and behind its preprompt."""

    rows: list[dict]
    mine: list[dict]
    plain: Prompts
    preprompted: Prompts
    dropped: int  # prompts too long with their preprompt


def prompts_to_distill(cfg: DictConfig, data_dir: Path | None, tokenizer, env) -> ToDistill:
    """Safety-tagged prompts (stage.only_safety), each with a preprompt; rows whose preprompted form is longer
    than stage.max_prompt_length are dropped, counted and logged."""
    s = cfg.stage
    source = str(data_dir / "rl_prompts.jsonl") if data_dir else cfg.data.source
    rows = select_prompts(load_prompt_rows(cfg, data_dir), s, cfg.seed, source)
    rng = random.Random(cfg.seed)
    for r in rows:
        r["preprompt"] = preprompt_for(r, s, rng)
        r["preprompted"] = with_preprompt(r["prompt"], r["preprompt"], s.prompt_template)
    teacher = tokenize_prompts(
        tokenizer, [{**r, "prompt": r["preprompted"]} for r in rows], s.max_prompt_length
    )
    fits = {t for t in teacher.texts}
    dropped = len(rows) - len(teacher)
    rows = [r for r in rows if r["preprompted"] in fits]
    if dropped:
        log.warning(
            "%d preprompted prompts are longer than stage.max_prompt_length=%d tokens and were dropped",
            dropped,
            s.max_prompt_length,
        )
    if not rows:
        raise ValueError("no prompt fits stage.max_prompt_length with its preprompt")
    mine = rows[env.rank :: env.world_size]
    plain = tokenize_prompts(tokenizer, mine, 10**9)
    preprompted = tokenize_prompts(tokenizer, [{**r, "prompt": r["preprompted"]} for r in mine], 10**9)
    return ToDistill(rows, mine, plain, preprompted, dropped)


def sample_both(
    cfg: DictConfig, run: Run, tokenizer, todo: ToDistill
) -> tuple[dict[str, list[str]], dict[str, list[bool]], dict[str, list[int]]]:
    """Two answers per prompt of this rank from the starting model: behind the preprompt ("teacher") and to the
    plain prompt ("plain"). Returns (answers, ended, positions: each answer's prompt + answer positions, its
    sampling compute), each keyed by those names."""
    s = cfg.stage
    sampler = load_sampler(
        s.init_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=run.device
    )
    answers, ended, positions = {}, {}, {}
    for name, prompts in (("teacher", todo.preprompted), ("plain", todo.plain)):
        positions[name] = []
        bar = run.tracker.progress(len(prompts), f"cd: sample {name}")
        answers[name], ended[name] = sample_one(
            sampler,
            tokenizer,
            prompts,
            batch_size=s.generation_batch_size,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            device=run.device,
            progress=bar,
            positions=positions[name],
        )
        bar.close()
    del sampler
    gc.collect()
    return answers, ended, positions


def gate_candidates(
    cfg: DictConfig,
    run: Run,
    mine: list[dict],
    answers: dict[str, list[str]],
    ended: dict[str, list[bool]],
    positions: dict[str, list[int]],
) -> list[dict]:
    """The gate: both answers scored on the prompt WITHOUT the preprompt; then the truncation rule. Every
    candidate with both answers, both scores, the decisions and the positions sampled for each answer,
    gathered from all ranks."""
    s, device = cfg.stage, run.device
    texts = [r["prompt"] for r in mine]
    if s.gate:
        gate = RewardScorer(kind="single", reward_model=s.gate_model, device=device, dtype=cfg.model.dtype)
        score = gate(texts, answers["teacher"])
        baseline = gate(texts, answers["plain"])
        keep = distillation_gate(score, baseline, s.gate_margin)
        del gate
    else:
        score = baseline = torch.full((len(mine),), float("nan"))
        keep = torch.ones(len(mine), dtype=torch.bool)
    complete = torch.tensor(ended["teacher"], dtype=torch.bool)
    passed = keep  # the gate's decision, recorded whatever the truncation rule does
    if s.truncated == "drop":
        keep = keep & complete
    candidates = [
        {
            "prompt": r["prompt"],
            "preprompt": r["preprompt"],
            "response": t,
            "baseline_response": b,
            "score": float(sc),
            "baseline_score": float(bs),
            "ended": bool(e),
            "gate_passed": bool(g),
            "kept": bool(k),
            "positions": n,  # the preprompted prompt + answer, as sampled (compute.json)
            "baseline_positions": nb,
        }
        for r, t, b, sc, bs, e, g, k, n, nb in zip(
            *(mine, answers["teacher"], answers["plain"], score, baseline, complete, passed, keep),
            *(positions["teacher"], positions["plain"]),
            strict=True,
        )
    ]
    return [c for part in distributed.gather_objects(candidates) for c in part]


def distillation_compute(cfg: DictConfig, candidates: list[dict], finetuned: dict) -> compute.Ledger:
    """The stage's training compute (alignlab/compute.py): both answers per prompt sampled from the starting model,
    both scored by the gate model (its positions counted as sampled, preprompt included: a slight over-count),
    and the fine-tune. Rows of a distill.jsonl written before positions were recorded count 0."""
    s = cfg.stage
    sampled = sum(c.get("positions", 0) + c.get("baseline_positions", 0) for c in candidates)
    ledger = compute.Ledger()
    trust = cfg.model.trust_remote_code
    ledger.forward("sample", models.parameter_count(s.init_from, trust_remote_code=trust), sampled)
    if s.gate:
        gate = models.parameter_count(s.gate_model, reward=True, trust_remote_code=trust)
        ledger.forward("gate", gate, sampled)
    ledger.add("finetune", finetuned["train_flops"], finetuned["train_tokens"])
    return ledger


def write_distill_data(run: Run, candidates: list[dict], s: DictConfig) -> list[dict]:
    """distill.jsonl (every candidate) and train.jsonl (the kept rows, valid stage=sft data) written before
    training (rank 0; atomic), then train.jsonl read back by every rank."""
    train_rows = training_rows(candidates)
    check_no_preprompt(train_rows, [r["preprompt"] for r in candidates])
    if not train_rows:
        truncated = sum(not c.get("ended", True) for c in candidates)
        raise ValueError(
            f"the gate kept none of {len(candidates)} preprompted answers (none scored above the plain answer by "
            f"stage.gate_margin={s.gate_margin}, or ran out of budget: {truncated} had no EOS within "
            f"stage.max_new_tokens={s.max_new_tokens}, stage.truncated={s.truncated}): nothing to distill"
        )
    if run.env.is_main:
        atomic_write_text(run.run_dir / "distill.jsonl", "".join(json.dumps(c) + "\n" for c in candidates))
        atomic_write_text(run.run_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train_rows))
    distributed.barrier()
    return load_rows(str(run.run_dir / "train.jsonl")).to_list()


def log_distillation(metrics: dict[str, float], s: DictConfig) -> None:
    """One log line: what the gate and the truncation rule kept, and the gate's (and on TinyHH the oracle's) view."""
    log.info(
        "kept %d of %d preprompted answers (rejected %d; truncated=%s: %d without EOS dropped, %d kept) | mean gate "
        "score: preprompted %.3f, plain %.3f%s",
        metrics["cd/kept"],
        metrics["cd/candidates"],
        metrics["cd/rejected"],
        s.truncated,
        metrics["cd/truncated_dropped"],
        metrics["cd/truncated_kept"],
        metrics["cd/score_preprompted"],
        metrics["cd/score_plain"],
        (
            f" | oracle harmless: plain {metrics['cd/oracle_harmless_plain']:.3f}, preprompted "
            f"{metrics['cd/oracle_harmless_preprompted']:.3f}, kept {metrics['cd/oracle_harmless_kept']:.3f}"
            if "cd/oracle_harmless_kept" in metrics
            else ""
        ),
    )


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, device, tracker = run.env, run.device, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)
    if s.gate:
        models.require_input(s.gate_model, "stage.gate_model")

    # 1-2. Safety-tagged prompts, each with a preprompt; rows whose preprompted form is too long are dropped.
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or s.init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    # prompts in the model's chat format; its end-of-turn token ends answers
    chat.use(tokenizer, cfg.data.chat_template)
    todo = prompts_to_distill(cfg, data_dir, tokenizer, env)
    log.info(
        "%d prompts to distill (%s) | %d preprompts, %d answer templates | gate: %s | %d dropped as too long",
        len(todo.rows),
        "safety-tagged only" if s.only_safety else "all prompts",
        len(s.preprompts),
        len(s.answer_templates),
        f"{s.gate_model} (margin {s.gate_margin})" if s.gate else "off",
        todo.dropped,
    )

    # 3-4. The teacher's and the plain answers, gated; resume=auto reuses those the interrupted run drew (sampling
    #      on a GPU is not bit-reproducible, and the fine-tuning checkpoint belongs to exactly these rows).
    drawn = run.run_dir / "distill.jsonl"
    if run.resume is not None and drawn.exists():
        candidates = [json.loads(line) for line in drawn.read_text().splitlines()]
        log.info("resume=auto: the %d answers drawn before, from %s", len(candidates), drawn)
    else:
        answers, ended, positions = sample_both(cfg, run, tokenizer, todo)
        candidates = gate_candidates(cfg, run, todo.mine, answers, ended, positions)

    # 5. The generated data, written before training (rank 0; atomic), then read back by every rank.
    train_rows = write_distill_data(run, candidates, s)
    metrics = distillation_stats(candidates, s.gate, s.truncated)
    if data_dir is not None:  # TinyHH: what the oracle thinks of the distilled data
        metrics.update(oracle_data_stats(candidates))
    tracker.log(metrics, step=0)
    log_distillation(metrics, s)

    # 6. Distil: the SFT loss on (prompt WITHOUT preprompt, preprompted answer).
    train, held_out = split_generated(train_rows, s.finetune.eval_rows, cfg.seed)
    result = finetune(
        run,
        cfg,
        s.finetune,
        init_from=s.init_from,
        train_rows=train,
        eval_rows=held_out,
        model_out=model_out,
        source=str(run.run_dir / "train.jsonl"),
        resume_from=run.resume,  # the generation above is seeded: a resumed run distils the same rows
    )
    steps = result["steps"]
    if env.is_main:
        compute.write(
            run.run_dir,
            "context_distillation",
            distillation_compute(cfg, candidates, result),
            [s.init_from, s.gate_model if s.gate else None],
        )

    # 7. TinyHH: starting model, starting model behind a preprompt (the teacher), distilled model; same prompts.
    if data_dir is not None and s.sample_eval and env.is_main:
        teacher = partial(with_preprompt, preprompt=s.preprompts[0], template=s.prompt_template)
        judge_start_end(
            model_out,
            start=s.init_from,
            references={"teacher": (s.init_from, teacher)},
            data_dir=data_dir,
            n=s.sample_eval,
            max_new_tokens=s.eval_max_new_tokens,
            device=device,
            seed=cfg.seed,
            tracker=tracker,
            step=steps,
            samples_path=run.run_dir / "samples.jsonl",
            label=s.name,
        )
    distributed.barrier()
    tracker.close()


def distillation_stats(candidates: list[dict], gated: bool, truncated: str = "drop") -> dict[str, float]:
    """Counts of kept/rejected samples (cd/truncated_dropped: gate passed but no EOS, under truncated=drop;
    cd/truncated_kept: kept without EOS, under truncated=keep) and the gate's mean scores."""
    kept = [c for c in candidates if c["kept"]]
    n = len(candidates)
    no_eos = [c for c in candidates if not c.get("ended", True)]  # distill.jsonl of older runs: no "ended"
    stats = {
        "cd/candidates": n,
        "cd/kept": len(kept),
        "cd/rejected": n - len(kept),
        "cd/kept_fraction": len(kept) / n,
        "cd/truncated_dropped": sum(c.get("gate_passed", c["kept"]) and not c["kept"] for c in no_eos)
        if truncated == "drop"
        else 0,
        "cd/truncated_kept": sum(c["kept"] for c in no_eos),
    }
    if gated:
        stats["cd/score_preprompted"] = sum(c["score"] for c in candidates) / n
        stats["cd/score_plain"] = sum(c["baseline_score"] for c in candidates) / n
        stats["cd/score_gain_kept"] = sum(c["score"] - c["baseline_score"] for c in kept) / max(1, len(kept))
    else:
        stats["cd/score_preprompted"] = stats["cd/score_plain"] = float("nan")
    return stats


def oracle_data_stats(candidates: list[dict]) -> dict[str, float]:
    """TinyHH only: the oracle's harmlessness of the plain answers, the preprompted ones, and the kept ones."""
    from alignlab.tinyhh.oracle import judge

    def harmless(pairs) -> float:
        pairs = list(pairs)
        return sum(not judge(p, a).harmful for p, a in pairs) / max(1, len(pairs))

    return {
        "cd/oracle_harmless_plain": harmless((c["prompt"], c["baseline_response"]) for c in candidates),
        "cd/oracle_harmless_preprompted": harmless((c["prompt"], c["response"]) for c in candidates),
        "cd/oracle_harmless_kept": harmless((c["prompt"], c["response"]) for c in candidates if c["kept"]),
    }
