"""stage=rejection_sampling: rejection-sampling fine-tuning, Llama 2 §3.2.3 (the project's RLHF spec, section 5).

Each iteration:

  1. take this iteration's prompts (a slice of one seeded order; each rank samples its share)
  2. sample K answers per prompt from the current model at the iteration's temperature (KV cache, EOS truncation)
  3. score them with the reward model(s) (`reward=rm` or Llama 2's helpfulness + safety pair, unwhitened so that
     scores of different batches and iterations compare), missing-EOS penalty as in PPO
  4. best-of-N curves of this pool (mean and median over prompts of max_{i<=N} r, N = 1..K)
  5. keep the highest-scoring answer of every prompt, over the samples of ALL iterations so far (keep=all; Llama 2
     found that keeping only the last iteration's samples caused regressions) or of this one (keep=last); answers
     that ran out of budget (no EOS within max_new_tokens) never compete (truncated=drop: fine-tuning on them,
     EOS appended, teaches the model to stop mid-answer), so a prompt whose every answer is truncated keeps nothing
  6. write pool.jsonl (every sample and score) and train.jsonl (the kept prompt/completion rows) under
     iteration_<i>/ before training: both load with `datasets`, and train.jsonl is valid stage=sft data
  7. fine-tune with the SFT loss (alignlab/finetune.py, stage=sft's path, on the shared DeepSpeed engine), from
     init_from on the kept set (train_from=start) or from the previous iteration's model (train_from=previous)
  8. mean RM score of the new model on held-out prompts

The last iteration's model is <run_dir>/model; best_of_n.json / best_of_n.png hold the curves of every iteration.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab import compute, distributed, models
from alignlab.checkpoint import atomic_write_json, atomic_write_text, latest_intact, read_manifest
from alignlab.data import chat
from alignlab.data.loading import load_rows
from alignlab.data.packing import EpochOrder
from alignlab.evaluation.plots import plot_best_of_n
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.finetune import finetune, split_generated
from alignlab.lifecycle import Run, check_init_from, start_run, tinyhh_dir
from alignlab.rl.kl import shape_scores
from alignlab.rl.selection import BestOfN, KeptSet, best_of_n, keep_complete
from alignlab.rollout import Prompts, load_prompts, load_sampler, sample_answers, sample_one
from alignlab.runs import check_world_size, config_changes, resume_requested
from alignlab.scoring import RewardScorer
from alignlab.stage_checks import check_rejection_sampling

log = logging.getLogger("alignlab.rejection_sampling")


def temperature_of(s: DictConfig, iteration: int) -> float:
    """The sampling temperature of iteration (1-based): its entry of stage.temperatures, the last one repeated."""
    return float(s.temperatures[min(iteration, len(s.temperatures)) - 1])


def score_pool(
    scorer: RewardScorer, prompts: Prompts, texts: list[list[str]], ended: list[list[bool]], s: DictConfig
) -> list[list[float]]:
    """Scores [P][K] of every sampled answer: reward model(s), then the missing-EOS rule (no clip)."""
    k = len(texts[0]) if texts else 0
    flat_prompts = [p for p in prompts.texts for _ in range(k)]
    flat_safety = [f for f in prompts.is_safety for _ in range(k)]
    raw = scorer(flat_prompts, [t for row in texts for t in row], flat_safety)
    shaped = shape_scores(
        raw,
        torch.tensor([e for row in ended for e in row]),
        missing_eos=s.missing_eos,
        missing_eos_penalty=s.missing_eos_penalty,
        clip=0.0,
    )
    return [shaped[i * k : (i + 1) * k].tolist() for i in range(len(prompts))]


def sampling_seed(seed: int, rank: int, purpose: int) -> int:
    """A seed per (run seed, rank, purpose): purpose 0 = held-out measurement, i = iteration i's pool."""
    return seed * 1_000_003 + rank * 10_007 + purpose


def held_out_score(model, tokenizer, scorer, prompts: Prompts, s: DictConfig, device, seed: int) -> float:
    """Mean RM score (same rules as the pools) of one answer per held-out prompt, averaged over ranks.

    Every model is measured with the same random numbers (seed), so differences between models are not
    differences in sampling luck.
    """
    torch.manual_seed(seed)
    texts, ended = sample_one(
        model,
        tokenizer,
        prompts,
        batch_size=s.generation_batch_size,
        max_new_tokens=s.max_new_tokens,
        temperature=s.eval_temperature,
        device=device,
    )
    scores = score_pool(scorer, prompts, [[t] for t in texts], [[e] for e in ended], s)
    mine = sum(row[0] for row in scores) / max(1, len(scores))
    return distributed.mean_over_ranks(mine)


def training_rows(kept: dict[str, dict]) -> list[dict]:
    """The kept samples as stage=sft's prompt/completion rows (with their score and source iteration)."""
    return [
        {
            "prompt": prompt,
            "completion": best["response"],
            "score": best["score"],
            "iteration": best["iteration"],
            "is_safety": best["is_safety"],
        }
        for prompt, best in kept.items()
    ]


ITERATION_DONE = "iteration.json"  # written last in iteration_<i>/: the step it ended at and its metrics


def read_iteration(it_dir: Path, name: str = ITERATION_DONE) -> dict | None:
    try:
        return json.loads((it_dir / name).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Sampling:
    """What every iteration samples and scores with, fixed for the run."""

    tokenizer: object
    scorer: RewardScorer
    train_prompts: Prompts  # all ranks' training prompts, in one seeded order (order)
    eval_mine: Prompts  # this rank's share of the held-out prompts
    order: EpochOrder
    device: object
    seed: int


def draw_pool(
    run: Run, s: DictConfig, sampling: Sampling, sampler, *, it: int, temperature: float
) -> list[dict]:
    """One iteration's pool: its prompts (rank r samples every world_size-th), K scored answers each, all ranks'."""
    env, k = run.env, s.samples_per_prompt
    first = (it - 1) * s.prompts_per_iteration
    idx = sampling.order(range(first, first + s.prompts_per_iteration)).tolist()
    prompts = sampling.train_prompts.take(idx[env.rank :: env.world_size])

    # K answers per prompt from the current model (a random stream of its own per iteration and rank).
    torch.manual_seed(sampling_seed(sampling.seed, env.rank, it))
    bar = run.tracker.progress(len(prompts) * k, f"rs {it}/{s.iterations}: sample")
    positions: list[int] = []
    texts, ended = sample_answers(
        sampler,
        sampling.tokenizer,
        prompts,
        k=k,
        batch_size=s.generation_batch_size,
        max_new_tokens=s.max_new_tokens,
        temperature=temperature,
        device=sampling.device,
        progress=bar,
        positions=positions,
    )
    bar.close()

    # Score every answer; gather the pool from all ranks.
    scores = score_pool(sampling.scorer, prompts, texts, ended, s)
    mine = [
        {
            "prompt": p,
            "is_safety": f,
            "iteration": it,
            "temperature": temperature,
            "responses": t,
            "scores": [round(x, 6) for x in sc],
            "ended": e,
            "positions": positions[i * k : (i + 1) * k],  # prompt + answer positions sampled (compute.json)
        }
        for i, (p, f, t, sc, e) in enumerate(
            zip(prompts.texts, prompts.is_safety, texts, scores, ended, strict=True)
        )
    ]
    return [row for part in distributed.gather_objects(mine) for row in part]


def resume_point(cfg: DictConfig, resolved: dict, world_size: int) -> tuple[int, Path] | None:
    """resume=auto for rejection sampling: past the finished iterations, into the fine-tuning checkpoint of the next.

    An iteration is finished when its iteration.json holds this config; the first unfinished one continues from
    the newest intact checkpoint of its fine-tuning (iteration_<i>/checkpoints), or starts over (its sampling is
    seeded, so it draws the same pool). Returns (tracker step, iteration dir or checkpoint) or None.
    """
    if not resume_requested(cfg.resume):  # a bad value is a ConfigError; resume=never: a fresh start
        return None
    found, step = None, 0
    for it in range(1, cfg.stage.iterations + 1):
        it_dir = Path(cfg.run_dir) / f"iteration_{it}"
        marker = read_iteration(it_dir)
        if marker and not config_changes(cfg.stage.name, marker["config"], resolved):
            found, step = (marker["step"], it_dir), marker["step"]
            continue
        intact = latest_intact(it_dir / "checkpoints")
        manifest = read_manifest(intact[1]) if intact else None
        if manifest and not config_changes(cfg.stage.name, manifest["config"], resolved):
            check_world_size(intact[1], manifest, world_size)
            return step + intact[0], intact[1]
        break
    return found


def prepare(cfg: DictConfig, run: Run, data_dir: Path | None) -> Sampling:
    """The tokenizer, the prompts (a held-out set never sampled for training, the rest in one seeded order) and
    the reward scorer; the derived sizes logged once."""
    s, env = cfg.stage, run.env
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or s.init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    # prompts in the model's chat format; its end-of-turn token ends answers
    chat.use(tokenizer, cfg.data.chat_template)
    train_prompts, eval_prompts = load_prompts(
        cfg, data_dir, tokenizer, s.eval_prompts, s.max_prompt_length, env.world_size
    )
    if len(train_prompts) < s.prompts_per_iteration:
        log.warning(
            "%d training prompts < stage.prompts_per_iteration=%d: iterations reuse prompts (new samples)",
            len(train_prompts),
            s.prompts_per_iteration,
        )
    # Unwhitened: Llama 2's per-batch whitening would make scores of different batches incomparable.
    scorer = RewardScorer.from_config(cfg.reward, device=run.device, dtype=cfg.model.dtype, whiten=False)
    k = s.samples_per_prompt
    log.info(
        "%d train / %d held-out prompts | %d iterations x %d prompts x %d samples = %d answers per iteration "
        "(%d prompts per rank) | temperatures %s | keep=%s train_from=%s | reward=%s",
        len(train_prompts),
        len(eval_prompts),
        s.iterations,
        s.prompts_per_iteration,
        k,
        s.prompts_per_iteration * k,
        len(range(env.rank, s.prompts_per_iteration, env.world_size)),
        [temperature_of(s, i) for i in range(1, s.iterations + 1)],
        s.keep,
        s.train_from,
        cfg.reward.kind,
    )
    run.tracker.log(
        {
            "data/train_prompts": len(train_prompts),
            "data/eval_prompts": len(eval_prompts),
            "data/dropped_prompts": train_prompts.dropped + eval_prompts.dropped,
        },
        step=0,
    )
    return Sampling(
        tokenizer=tokenizer,
        scorer=scorer,
        train_prompts=train_prompts,
        eval_mine=eval_prompts.take(range(env.rank, len(eval_prompts), env.world_size)),
        order=EpochOrder(len(train_prompts), cfg.seed),
        device=run.device,
        seed=cfg.seed,
    )


def forget_earlier_runs(run: Run) -> None:
    """A fresh start: an earlier run's markers and checkpoints here must not pass for this run's iterations."""
    if run.env.is_main:
        for marker in run.run_dir.glob(f"iteration_*/{ITERATION_DONE}"):
            marker.unlink()
        for old in run.run_dir.glob("iteration_*/checkpoints"):
            shutil.rmtree(old)
    distributed.barrier()


def measure(run: Run, s: DictConfig, sampling: Sampling, sampler) -> float:
    """The held-out RM score of sampler (every model with the same random numbers: purpose 0's seed)."""
    seed = sampling_seed(sampling.seed, run.env.rank, 0)
    return held_out_score(
        sampler, sampling.tokenizer, sampling.scorer, sampling.eval_mine, s, sampling.device, seed
    )


def select(
    candidates: dict[str, list[dict]], pool: list[dict], it: int, s: DictConfig
) -> tuple[KeptSet, list[dict]]:
    """Add this pool's answers to the candidates (in place; emptied first under keep=last) and keep the best
    answer per prompt under the truncation rule: (the selection, its stage=sft rows)."""
    if s.keep == "last":
        candidates.clear()
    for r in pool:
        candidates.setdefault(r["prompt"], []).extend(
            {"response": t, "score": sc, "iteration": it, "is_safety": r["is_safety"], "ended": e}
            for t, sc, e in zip(r["responses"], r["scores"], r["ended"], strict=True)
        )
    selection = keep_complete(candidates, s.truncated)
    rows = training_rows(selection.kept)
    if not rows:
        raise ValueError(
            f"iteration {it}: every one of the {selection.truncated_dropped} candidate answers ran out of budget "
            f"(no EOS within stage.max_new_tokens={s.max_new_tokens}), so stage.truncated=drop keeps none; "
            "raise stage.max_new_tokens (or set stage.truncated=keep to train on cut-off answers)"
        )
    return selection, rows


def iteration_metrics(
    pool: list[dict],
    rows: list[dict],
    selection: KeptSet,
    curve: BestOfN,
    it: int,
    temperature: float,
    s: DictConfig,
) -> dict[str, float]:
    """The rs/* metrics of one iteration's pool and kept set (rows: as read back from train.jsonl), logged once."""
    k = s.samples_per_prompt
    kept_scores = torch.tensor([r["score"] for r in rows])
    from_this = sum(r["iteration"] == it for r in rows)
    metrics = {
        "rs/iteration": it,
        "rs/temperature": temperature,
        "rs/pool_answers": len(pool) * k,
        "rs/pool_mean_score": curve.mean[0],
        "rs/best_of_k_mean_score": curve.mean[-1],
        "rs/best_of_k_median_score": curve.median[-1],
        "rs/eos_fraction": sum(sum(r["ended"]) for r in pool) / (len(pool) * k),
        "rs/kept_rows": len(rows),
        # truncated=drop: candidates without EOS left out, and prompts that kept nothing for it;
        # truncated=keep: kept answers without EOS (trained with an EOS appended)
        "rs/truncated_dropped": selection.truncated_dropped,
        "rs/prompts_all_truncated": len(selection.all_truncated),
        "rs/truncated_kept": selection.truncated_kept,
        "rs/kept_mean_score": kept_scores.mean().item(),
        "rs/kept_from_this_iteration": from_this / len(rows),
    }
    log.info(
        "iteration %d (T=%g): pool of %d prompts x %d, mean score %.3f, best-of-%d %.3f (median %.3f) | "
        "kept %d rows (%.0f%% from this iteration), mean %.3f | truncated=%s: %d answers without EOS dropped, "
        "%d prompts kept nothing (every answer truncated), %d truncated answers kept",
        it,
        temperature,
        len(pool),
        k,
        curve.mean[0],
        k,
        curve.mean[-1],
        curve.median[-1],
        len(rows),
        100 * from_this / len(rows),
        metrics["rs/kept_mean_score"],
        s.truncated,
        selection.truncated_dropped,
        len(selection.all_truncated),
        selection.truncated_kept,
    )
    return metrics


def iteration_compute(
    pool: list[dict], policy_params: int, reward_params: int, finetuned: dict
) -> compute.Ledger:
    """One iteration's training compute (alignlab/compute.py): its pool's answers sampled (each position once
    through the KV cache) and scored (the same positions through the reward model(s)), and the fine-tune."""
    positions = sum(sum(r.get("positions", [])) for r in pool)
    ledger = compute.Ledger()
    ledger.forward("sample", policy_params, positions)
    ledger.forward("score", reward_params, positions)
    ledger.add("finetune", finetuned["train_flops"], finetuned["train_tokens"])
    return ledger


def write_iteration_data(run: Run, it_dir: Path, pool, rows, start_score: float, rewrite: bool) -> list[dict]:
    """pool.jsonl, train.jsonl and start.json written before training (rank 0; atomic; not again when resuming
    into this iteration), then train.jsonl read back by every rank."""
    if run.env.is_main and rewrite:
        atomic_write_text(it_dir / "pool.jsonl", "".join(json.dumps(r) + "\n" for r in pool))
        atomic_write_text(it_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(it_dir / "start.json", {"start_score": start_score})
    distributed.barrier()
    return load_rows(str(it_dir / "train.jsonl")).to_list()


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True, find_resume=resume_point)
    env, device, tracker = run.env, run.device, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)
    check_rejection_sampling(s)
    if cfg.reward.kind == "single":
        models.require_input(cfg.reward.reward_model, "reward.reward_model")

    # 1-2. Prompts (held out / train in one seeded order), the reward scorer; derived sizes logged once.
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    sampling = prepare(cfg, run, data_dir)
    sampler_of = partial(
        load_sampler, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=device
    )

    # 3. The loop. resume=auto: finished iterations are read back (pool, model, step), and the first unfinished
    #    one continues its fine-tuning from its checkpoint (run.resume) with the pool it had drawn.
    candidates: dict[str, list[dict]] = {}  # prompt -> every sample kept for selection
    ledger = compute.Ledger()  # every iteration's sampling, scoring and fine-tuning (compute.json)
    curves = {}
    current, step, sampler = s.init_from, 0, None
    resuming_in = (
        run.resume.parent.parent if run.resume and run.resume.name.startswith("checkpoint-") else None
    )
    if run.resume is None:
        forget_earlier_runs(run)
        sampler = sampler_of(current)
        start_score = measure(run, s, sampling, sampler)
        tracker.log({"eval/rm_score": start_score}, step=0)
        log.info("held-out RM score of the starting model: %.4f", start_score)
    for it in range(1, s.iterations + 1):
        it_dir = run.run_dir / f"iteration_{it}"
        temperature = temperature_of(s, it)
        finished = read_iteration(it_dir) if run.resume else None
        if finished or it_dir == resuming_in:
            # 3.1-3.3 read back: the pool this iteration drew before it finished or was interrupted
            pool = [json.loads(line) for line in (it_dir / "pool.jsonl").read_text().splitlines()]
            start_score = (finished or read_iteration(it_dir, "start.json"))["start_score"]
        else:
            # 3.1-3.3 this iteration's prompts, K answers each from the current model, scored, gathered
            sampler = sampler or sampler_of(current)
            pool = draw_pool(run, s, sampling, sampler, it=it, temperature=temperature)
            sampler = None
            gc.collect()

        # 3.4 Best-of-N curves of this pool.
        curve = best_of_n(torch.tensor([r["scores"] for r in pool]))
        curves[f"iteration {it} (T={temperature:g})"] = curve

        # 3.5 Keep the best answer per prompt over the candidates of all iterations (keep=all) or this one.
        selection, rows = select(candidates, pool, it, s)
        out = model_out if it == s.iterations else it_dir / "model"
        if finished:
            step, current = finished["step"], str(out)
            ledger.merge(compute.Ledger.from_dict(finished.get("compute")))
            log.info(
                "iteration %d: finished before (step %d, held-out RM score %.4f)",
                it,
                step,
                finished["rm_score"],
            )
            continue

        # 3.6 The generated data, written before training (rank 0; atomic), then read back by every rank.
        rows = write_iteration_data(run, it_dir, pool, rows, start_score, rewrite=it_dir != resuming_in)
        metrics = iteration_metrics(pool, rows, selection, curve, it, temperature, s)

        # 3.7 Fine-tune with the SFT loss on the kept set.
        train, held_out = split_generated(rows, s.finetune.eval_rows, cfg.seed + it)
        result = finetune(
            run,
            cfg,
            s.finetune,
            init_from=s.init_from if s.train_from == "start" else current,
            train_rows=train,
            eval_rows=held_out,
            model_out=out,
            source=str(it_dir / "train.jsonl"),
            step_offset=step,
            checkpoint_dir=it_dir / "checkpoints",
            resume_from=run.resume if it_dir == resuming_in else None,
        )
        step += result["steps"]
        current = str(out)

        # 3.8 The new model's held-out RM score (it samples the next iteration, too); the iteration's compute.
        sampler = sampler_of(current)
        metrics["eval/rm_score"] = measure(run, s, sampling, sampler)
        spent = iteration_compute(pool, models.count_parameters(sampler), sampling.scorer.params, result)
        ledger.merge(spent)
        tracker.log(metrics, step=step)
        log.info(
            "iteration %d: held-out RM score %.4f (start %.4f)", it, metrics["eval/rm_score"], start_score
        )
        if env.is_main:  # written last: resume=auto skips this iteration from now on
            marker = {
                "step": step,
                "rm_score": metrics["eval/rm_score"],
                "start_score": start_score,
                "compute": spent.as_dict(),
            }
            atomic_write_json(it_dir / ITERATION_DONE, {**marker, "config": run.config})
        distributed.barrier()
    del sampler

    # 4. Best-of-N curves of every iteration, as data and as a plot; compute.json.
    if env.is_main:
        compute.write(
            run.run_dir, "rejection_sampling", ledger, [s.init_from, *sampling.scorer.paths.values()]
        )
        atomic_write_json(run.run_dir / "best_of_n.json", {name: c.as_rows() for name, c in curves.items()})
        plot_best_of_n(curves, run.run_dir / "best_of_n.png")
        tracker.log_images({"rs/best_of_n": run.run_dir / "best_of_n.png"}, step=step)

    # 5. TinyHH: the starting and the final model judged by the oracle on the same held-out prompts.
    if data_dir is not None and s.sample_eval and env.is_main:
        judge_start_end(
            model_out,
            start=s.init_from,
            data_dir=data_dir,
            n=s.sample_eval,
            max_new_tokens=s.eval_max_new_tokens,
            device=device,
            seed=cfg.seed,
            tracker=tracker,
            step=step,
            samples_path=run.run_dir / "samples.jsonl",
            label=s.name,
        )
    distributed.barrier()
    tracker.close()
