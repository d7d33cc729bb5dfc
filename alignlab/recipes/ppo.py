"""stage=ppo (and stage=ppo_ptx): KL-penalised PPO for language models, InstructGPT / Ziegler et al. style.

Actor from the SFT model and critic from the reward model, each a DeepSpeed engine with its own optimizer; the
frozen reference (the SFT model; with LoRA, the policy with its adapters disabled) and the reward scorer in eval
mode; dropout off everywhere. One iteration:

  1. roll out: sample one answer per prompt (KV cache, temperature T, EOS truncation), decode
  2. score: reward model(s) on the text, missing-EOS penalty, clip
  3. old log-probs, reference log-probs (logits / T in both) and values, without gradients
  4. per-token rewards r_t = -beta * k_t (+ score at the last token), optional reward whitening, GAE, advantage
     whitening
  5. ppo_epochs x shuffled minibatches x micro-batches: clipped policy loss (+ ptx_coef * LM loss on a separate
     pretraining micro-batch, PPO-ptx) and clipped value loss, one optimizer step per minibatch for each engine
  6. KL controller update, metrics, sample tables

Spec: specs/rlhf.md sections 3-4; the tensor math lives in alignlab/rl/ and is unit-tested there.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignlab import distributed, models
from alignlab.checkpoint import atomic_write_text, load_resumable, save_pretrained, save_resumable
from alignlab.data import chat
from alignlab.data.packing import EpochOrder, Packed, lm_labels, micro_batch_positions
from alignlab.evaluation.tinyhh import judge_model_dir
from alignlab.generation import response_logits, token_logprobs
from alignlab.recipes.common import check_init_from, deepspeed_json, start_run, step_boundary, tinyhh_dir
from alignlab.rl.advantages import explained_variance, gae, masked_mean, masked_whiten
from alignlab.rl.kl import ESTIMATORS, kl_controller, kl_per_token, shape_scores, token_rewards
from alignlab.rl.losses import entropy_from_logits, lm_loss, policy_loss, value_loss
from alignlab.rollout import (
    Prompts,
    Rollout,
    load_prompts,
    sample_rollout,
)
from alignlab.scoring import RewardScorer

log = logging.getLogger("alignlab.ppo")


def check_sizes(s: DictConfig, world: int) -> tuple[int, int, int]:
    """(episodes per rank per iteration, minibatches per epoch, micro-batches per minibatch), or a ConfigError."""
    from alignlab.errors import ConfigError

    if s.rollout_batch_size < 1 or s.minibatch_size < 1:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} and stage.minibatch_size={s.minibatch_size} must be >= 1"
        )
    if s.rollout_batch_size % world:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of world size {world}"
        )
    if s.rollout_batch_size % s.minibatch_size:
        raise ConfigError(
            f"stage.rollout_batch_size={s.rollout_batch_size} must be a multiple of stage.minibatch_size="
            f"{s.minibatch_size}"
        )
    accum = distributed.grad_accum_steps(
        s.minibatch_size, s.micro_batch_size, world, names=("stage.minibatch_size", "stage.micro_batch_size")
    )
    if s.ppo_epochs < 1 or s.iterations < 1:
        raise ConfigError("stage.ppo_epochs and stage.iterations must be >= 1")
    if s.kl_estimator not in ESTIMATORS:
        raise ConfigError(f"stage.kl_estimator={s.kl_estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if s.whiten_rewards and s.rollout_batch_size // world < 8:
        raise ConfigError(
            "stage.whiten_rewards=true needs >= 8 episodes per rank (whitening tiny batches is noise)"
        )
    return s.rollout_batch_size // world, s.rollout_batch_size // s.minibatch_size, accum


def load_ptx_blocks(cfg: DictConfig, data_dir: Path | None, tokenizer) -> tuple[Packed, Packed]:
    """(train, held-out) pretraining blocks: TinyHH's ptx documents, or the text data of stage.ptx_source."""
    from alignlab.recipes.pretrain import load_texts, tokenize

    s = cfg.stage
    if s.ptx_source:
        texts = load_texts(s.ptx_source, "text", "train", on_malformed=cfg.data.on_malformed, max_rows=None)
    elif data_dir is not None:
        texts = load_texts(str(data_dir / "ptx.jsonl"), "text", "train", on_malformed="error", max_rows=None)
    else:
        raise ValueError(
            "stage.ptx_source must name a text dataset for PPO-ptx / the pretraining-loss measurement"
        )
    n_eval = max(1, len(texts) // 10)
    return tokenize(texts[n_eval:], tokenizer, s.ptx_seq_len), tokenize(
        texts[:n_eval], tokenizer, s.ptx_seq_len
    )


def trim(ids: torch.Tensor, mask: torch.Tensor, context_len: int, response_len: int):
    """Drop query columns that are padding in every row and response columns past the longest answer."""
    lead = int((mask[:, :context_len].sum(0) == 0).sum())
    end = context_len + response_len
    return ids[:, lead:end], mask[:, lead:end], context_len - lead


def micro_batch(batch: dict[str, torch.Tensor], idx: torch.Tensor, context_len: int) -> dict:
    """Rows idx of the rollout batch ({input_ids, attention_mask} [B, L]; per-response-token tensors [B, T]),
    trimmed to their own padding; "ctx" is where their responses start."""
    response_len = int(batch["response_mask"][idx].sum(1).max())
    ids, mask, ctx = trim(batch["input_ids"][idx], batch["attention_mask"][idx], context_len, response_len)
    mb = {k: v[idx][:, :response_len] for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return {"ids": ids, "mask": mask, "ctx": ctx, **mb}


def shaped_scores(
    scorer, prompts: Prompts, ro: Rollout, s: DictConfig, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, shaped) scores [B]: the reward scorer on the text, then the missing-EOS penalty and the clip."""
    raw = scorer(prompts.texts, ro.texts, prompts.is_safety).to(device)
    shaped = shape_scores(
        raw, ro.ended, missing_eos=s.missing_eos, missing_eos_penalty=s.missing_eos_penalty, clip=s.score_clip
    )
    return raw, shaped


@torch.no_grad()
def forward_stats(policy, reference, critic, ro: Rollout, micro: int, temperature: float, lora: bool):
    """Old log-probs, reference log-probs and values [B, T] of a rollout, micro-batched, without gradients."""
    old, ref, values = [], [], []
    for i in range(0, len(ro.texts), micro):
        sl = slice(i, i + micro)
        ids, mask, ctx = trim(ro.input_ids[sl], ro.attention_mask[sl], ro.context_len, ro.response.shape[1])
        tokens = ro.response[sl]
        old.append(token_logprobs(response_logits(policy, ids, mask, ctx), tokens, temperature))
        if lora:  # the reference is the policy with its adapters switched off: no second copy of the weights
            with policy.module.disable_adapter():
                ref_logits = response_logits(policy.module, ids, mask, ctx)
        else:
            ref_logits = response_logits(reference, ids, mask, ctx)
        ref.append(token_logprobs(ref_logits, tokens, temperature))
        values.append(critic(ids, mask)[:, ctx - 1 : -1])
    return torch.cat(old), torch.cat(ref), torch.cat(values)


def actor_loss(policy, mb: dict, temperature: float, clip_range: float, ptx_coef: float, ptx: dict | None):
    """PPO's clipped policy loss on one micro-batch, plus ptx_coef * LM loss on a separate pretraining micro-batch
    (PPO-ptx: one backward of the sum = g_PPO + ptx_coef * g_LM). Returns (loss, stats)."""
    logits = response_logits(policy, mb["ids"], mb["mask"], mb["ctx"])
    logprobs = token_logprobs(logits, mb["response"], temperature)
    out = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["response_mask"], clip_range)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.float() / temperature), mb["response_mask"])
    stats = {
        "ppo/policy_loss": out.loss.item(),
        "ppo/clipfrac": out.clipfrac.item(),
        "ppo/approxkl": out.approxkl.item(),
        "ppo/entropy": entropy.item(),
    }
    loss = out.loss
    if ptx is not None:
        ptx_loss = lm_loss(policy(input_ids=ptx["tokens"], use_cache=False).logits, ptx["labels"])
        stats["ppo/ptx_loss"] = ptx_loss.item()
        if ptx_coef:
            loss = loss + ptx_coef * ptx_loss
    return loss, stats


@torch.no_grad()
def ptx_eval_loss(policy, blocks: Packed, micro: int, device) -> float:
    """Mean next-token NLL on held-out pretraining blocks: the 'alignment tax' PPO-ptx is meant to reduce."""
    total, count = 0.0, 0
    for i in range(0, len(blocks), micro):
        part = blocks.subset(list(range(i, min(i + micro, len(blocks)))))
        x = part.tokens.to(device)
        labels = lm_labels(x, part.lengths)
        n = int((labels[:, 1:] != -100).sum())
        total += lm_loss(policy(input_ids=x, use_cache=False).logits, labels).item() * n
        count += n
    return distributed.mean_over_ranks(total) / max(1e-9, distributed.mean_over_ranks(float(count)))


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, device, tracker = run.env, run.device, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)
    models.require_input(s.value_from, "stage.value_from")
    per_rank, minibatches, accum = check_sizes(s, env.world_size)
    mb_local = s.minibatch_size // env.world_size
    lora = cfg.model.lora.enabled

    # 1. Prompts (held-out ones for evaluation never train) and pretraining blocks (PPO-ptx; alignment tax).
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or s.init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    # prompts in the model's chat format; its end-of-turn token ends answers
    chat.use(tokenizer, cfg.data.chat_template)
    train_prompts, eval_prompts = load_prompts(
        cfg, data_dir, tokenizer, s.eval_prompts, s.max_prompt_length, env.world_size
    )
    if len(train_prompts) < s.rollout_batch_size:
        raise ValueError(
            f"{len(train_prompts)} training prompts < stage.rollout_batch_size={s.rollout_batch_size}"
        )
    ptx_train, ptx_held_out = (
        load_ptx_blocks(cfg, data_dir, tokenizer)
        if (s.ptx_coef or s.ptx_source or data_dir)
        else (None, None)
    )

    # 2. Models: actor and critic engines, frozen reference and reward scorer; dropout off in all of them.

    def engine_for(model, lr: float):
        models.disable_dropout(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=lr, betas=tuple(s.betas), eps=s.adam_eps, weight_decay=s.weight_decay
        )
        config = deepspeed_json(
            cfg.deepspeed,
            micro_batch_size=s.micro_batch_size,
            grad_accum=accum,
            world_size=env.world_size,
            grad_clip=s.grad_clip,
            dtype=next(model.parameters()).dtype,
        )
        return distributed.wrap(model, opt, None, config)[0]

    lo = cfg.model.lora
    policy_model = models.load_causal_lm(
        s.init_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    value_model = models.load_reward_model(
        s.value_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    reference = None
    if lora:
        lora_args = dict(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules)
        policy_model = models.apply_lora(policy_model, **lora_args)
        value_model = models.apply_lora(value_model, **lora_args, task_type="SEQ_CLS")
    else:
        reference = models.load_causal_lm(
            s.init_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        models.disable_dropout(reference)
        reference.to(device).eval().requires_grad_(False)
    n_params = models.count_parameters(policy_model)
    policy = engine_for(policy_model, s.lr)
    critic = engine_for(models.TokenValueModel(value_model), s.value_lr)
    scorer = RewardScorer.from_config(cfg.reward, device=device, dtype=cfg.model.dtype)
    kl_ctl = kl_controller(s.kl_controller, s.kl_coef, s.kl_target, s.kl_horizon)
    synced = (
        cfg.deepspeed.zero_stage == 3 and env.world_size > 1
    )  # every ZeRO-3 forward is collective: step together

    # 3. Derived sizes, computed once and logged.
    updates = s.ppo_epochs * minibatches
    log.info(
        "%d params%s | %d train / %d held-out prompts | %d iterations x %d episodes (%d per rank) | %d epochs x "
        "%d minibatches of %d = %d micro x %d accum x %d ranks | ptx_coef %g | beta %g (%s, %s)",
        n_params,
        " (LoRA)" if lora else "",
        len(train_prompts),
        len(eval_prompts),
        s.iterations,
        s.rollout_batch_size,
        per_rank,
        s.ppo_epochs,
        minibatches,
        s.minibatch_size,
        s.micro_batch_size,
        accum,
        env.world_size,
        s.ptx_coef,
        s.kl_coef,
        s.kl_controller,
        s.kl_estimator,
    )
    tracker.log(
        {
            "data/train_prompts": len(train_prompts),
            "data/eval_prompts": len(eval_prompts),
            "data/dropped_prompts": train_prompts.dropped + eval_prompts.dropped,
            "model/params": n_params,
            "ppo/updates_per_iteration": updates,
        },
        step=0,
    )

    def rollout(prompts: Prompts) -> Rollout:
        policy.eval()
        ro = sample_rollout(
            policy.module,
            tokenizer,
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            device=device,
            synced_gpus=synced,
        )
        policy.train()
        return ro

    def evaluate(step: int) -> None:
        """RM score and KL on the held-out prompts (this rank's share), plus the pretraining loss."""
        mine = eval_prompts.take(range(env.rank, len(eval_prompts), env.world_size))
        ro = rollout(mine)
        _, scores = shaped_scores(scorer, mine, ro, s, device)
        old, ref, _ = forward_stats(policy, reference, critic, ro, s.micro_batch_size, s.temperature, lora)
        kl = kl_per_token(old, ref, ro.response_mask, s.kl_estimator).sum(1)
        row = distributed.means_over_ranks(
            {
                "eval/score": scores.mean().item(),
                "eval/kl": kl.mean().item(),
                "eval/response_length": ro.lengths.float().mean().item(),
            }
        )
        if ptx_held_out is not None:
            row["eval/ptx_loss"] = ptx_eval_loss(policy, ptx_held_out, s.micro_batch_size, device)
        tracker.log(row, step=step)
        log.info("held-out at iteration %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))

    def save(it: int, root: Path | None = None) -> Path:
        """Both engines, every rank's RNG, the KL coefficient and the optimizer-step count (collective)."""
        return save_resumable(
            root or run.checkpoints,
            it,
            {"actor": policy, "critic": critic},
            state={"kl_coef": kl_ctl.value, "opt_step": opt_step},
            config=run.config,
            keep=run.keep_checkpoints,
        )

    # 4. The loop. Iteration i reads rollout_batch_size prompts from a seeded per-epoch order; rank r its slice.
    prompt_order = EpochOrder(len(train_prompts), cfg.seed)
    ptx_order = EpochOrder(len(ptx_train), cfg.seed + 1) if s.ptx_coef else None
    samples_path = run.run_dir / "samples.jsonl"
    opt_step = 0
    if run.resume:  # resume=auto: engines, RNG, beta and the pretraining-data position of the interrupted run
        state = load_resumable(run.resume, {"actor": policy, "critic": critic})
        kl_ctl.value, opt_step = state["kl_coef"], state["opt_step"]
        if env.is_main:
            keep_sample_rows(samples_path, run.resume_step)
    else:
        if env.is_main:
            samples_path.unlink(missing_ok=True)
        evaluate(0)  # the starting point: KL is exactly 0 here (policy == reference)
    bar = tracker.progress(s.iterations, "ppo", initial=run.resume_step)
    for it in range(run.resume_step + 1, s.iterations + 1):
        t0 = time.perf_counter()
        start = (it - 1) * s.rollout_batch_size + env.rank * per_rank
        prompts = train_prompts.take(prompt_order(range(start, start + per_rank)))

        # 4.1 Roll out: one sampled answer per prompt.
        ro = rollout(prompts)
        t_gen = time.perf_counter()

        # 4.2 Score the text with the reward model(s): normalised, EOS-penalised, clipped.
        raw, scores = shaped_scores(scorer, prompts, ro, s, device)
        t_score = time.perf_counter()
        check_finite(raw, "reward-model scores", it, run.run_dir, save)

        # 4.3 Old and reference log-probs and values, without gradients.
        old_logprobs, ref_logprobs, old_values = forward_stats(
            policy, reference, critic, ro, s.micro_batch_size, s.temperature, lora
        )
        t_ref = time.perf_counter()

        # 4.4 Per-token rewards, GAE, whitening.
        mask = ro.response_mask.float()
        kl = kl_per_token(old_logprobs, ref_logprobs, mask, s.kl_estimator)
        rewards, non_score = token_rewards(scores, kl, mask, kl_ctl.value)
        if s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 4.5 ppo_epochs x shuffled minibatches x micro-batches; one optimizer step per minibatch and engine.
        batch = {
            "input_ids": ro.input_ids,
            "attention_mask": ro.attention_mask,
            "response": ro.response,
            "response_mask": mask,
            "old_logprobs": old_logprobs,
            "advantages": advantages,
            "old_values": old_values,
            "returns": returns,
        }
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
        for _epoch in range(s.ppo_epochs):
            perm = torch.randperm(per_rank, generator=g).to(device)
            for m in range(minibatches):
                for a in range(accum):
                    mb = micro_batch(
                        batch,
                        perm[m * mb_local + a * s.micro_batch_size :][: s.micro_batch_size],
                        ro.context_len,
                    )
                    ptx = None
                    if ptx_order is not None:  # this micro-batch's share of the step's pretraining batch
                        pos = micro_batch_positions(
                            opt_step,
                            a,
                            env.rank,
                            env.world_size,
                            s.ptx_micro_batch_size,
                            s.ptx_micro_batch_size * accum * env.world_size,
                        )
                        part = ptx_train.subset(ptx_order(pos))
                        x = part.tokens.to(device)
                        ptx = {"tokens": x, "labels": lm_labels(x, part.lengths)}
                    loss, row = actor_loss(policy, mb, s.temperature, s.clip_range, s.ptx_coef, ptx)
                    check_finite(loss, "policy loss", it, run.run_dir, save)
                    policy.backward(loss)
                    policy.step()
                    values = critic(mb["ids"], mb["mask"])[:, mb["ctx"] - 1 : -1]
                    vout = value_loss(
                        values, mb["old_values"], mb["returns"], mb["response_mask"], s.clip_range_value
                    )
                    check_finite(vout.loss, "value loss", it, run.run_dir, save)
                    critic.backward(s.vf_coef * vout.loss)
                    critic.step()
                    row.update(
                        {"ppo/value_loss": vout.loss.item(), "ppo/value_clipfrac": vout.clipfrac.item()}
                    )
                    for k, v in row.items():
                        stats.setdefault(k, []).append(v)
                opt_step += 1
        t_train = time.perf_counter()

        # 4.6 KL controller, metrics, sample table.
        seq_kl = kl.sum(1)
        n_tokens = float(mask.sum())
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics.update(
            {
                "ppo/score": scores.mean().item(),
                "ppo/score_std": scores.std().item() if len(scores) > 1 else 0.0,
                "ppo/rm_score": raw.mean().item(),
                "ppo/kl": seq_kl.mean().item(),
                "ppo/non_score_reward": non_score.sum(1).mean().item(),
                "ppo/reward": (non_score.sum(1) + scores).mean().item(),
                "ppo/explained_variance": explained_variance(old_values, returns, mask),
                "ppo/response_length": ro.lengths.float().mean().item(),
                "ppo/eos_fraction": ro.ended.float().mean().item(),
                "ppo/advantage_mean": masked_mean(advantages, mask).item(),
                "time/generate_s": t_gen - t0,
                "time/score_s": t_score - t_gen,
                "time/reference_s": t_ref - t_score,
                "time/train_s": t_train - t_ref,
                "perf/tokens_per_s_generate": n_tokens / max(1e-9, t_gen - t0),
            }
        )
        metrics = distributed.means_over_ranks(metrics)
        metrics["ppo/kl_coef"] = kl_ctl.value
        kl_ctl.update(metrics["ppo/kl"], s.rollout_batch_size)
        elapsed = time.perf_counter() - t0
        metrics["perf/samples_per_s"] = s.rollout_batch_size / elapsed
        metrics["perf/tokens_per_s"] = metrics["ppo/response_length"] * s.rollout_batch_size / elapsed
        if it % s.log_every == 0 or it == s.iterations:
            tracker.log(metrics, step=it)
        bar.update(1)
        bar.set_postfix(
            score=f"{metrics['ppo/score']:.2f}",
            kl=f"{metrics['ppo/kl']:.2f}",
            len=f"{metrics['ppo/response_length']:.0f}",
        )
        if s.samples_every and (it % s.samples_every == 0 or it == 1):
            table = [
                {
                    "iteration": it,
                    "prompt": p,
                    "response": t,
                    "score": round(float(sc), 4),
                    "kl": round(float(k), 4),
                }
                for p, t, sc, k in zip(prompts.texts, ro.texts, scores, seq_kl, strict=True)
            ][: s.samples_per_table]
            if env.is_main:
                with open(samples_path, "a") as f:
                    f.writelines(json.dumps({"table": "train", **r}) + "\n" for r in table)
            tracker.log_table("ppo/samples", table, step=it)
        if s.eval_every and it % s.eval_every == 0 and it != s.iterations:
            evaluate(it)
        step_boundary(run, it, s.iterations, s.checkpoint_every, save, bar)
    bar.close()
    if run.resume_step < s.iterations:
        evaluate(s.iterations)

    # 5. Save: resumable engine states, then the policy for later stages (gathered on rank 0 under ZeRO-3).
    if run.resume_step < s.iterations:
        save(s.iterations)
    state = distributed.full_state_dict(policy)
    if env.is_main:
        save_pretrained(policy.module, tokenizer, model_out, state_dict=state)
        log.info("saved %s", model_out)
    distributed.barrier()

    # 6. TinyHH: the starting (SFT) and PPO models judged by the oracle on the same held-out prompts.
    if data_dir is not None and s.sample_eval and env.is_main:
        begin, _ = judge_model_dir(
            s.init_from, data_dir, s.sample_eval, s.eval_max_new_tokens, device, cfg.seed
        )
        end, samples = judge_model_dir(
            model_out, data_dir, s.sample_eval, s.eval_max_new_tokens, device, cfg.seed
        )
        with open(samples_path, "a") as f:
            f.writelines(json.dumps({"table": "eval", **r}) + "\n" for r in samples)
        tracker.log({**end, **{k.replace("eval/", "start/"): v for k, v in begin.items()}}, step=s.iterations)
        show = ("eval/harmlessness", "eval/helpfulness", "eval/attack_success")
        log.info(
            "start -> %s on held-out prompts: %s",
            s.name,
            ", ".join(f"{k[5:]} {begin[k]:.3f} -> {end[k]:.3f}" for k in show),
        )
    tracker.close()


def keep_sample_rows(path: Path, last_iteration: int) -> None:
    """Resuming: drop the sample rows of iterations after the checkpoint (they will be sampled again)."""
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            # training tables up to the checkpoint; the end-of-run oracle table ("eval") is written again
            if row.get("table") == "train" and row.get("iteration", 0) <= last_iteration:
                rows.append(line)
        atomic_write_text(path, "".join(r + "\n" for r in rows))


def check_finite(x: torch.Tensor, what: str, it: int, run_dir: Path, save) -> None:
    """Stop on NaN/inf (agreed over ranks), after saving the weights as they are (before this update).

    They go to checkpoints/nonfinite/, not among the resumable checkpoints: part of this iteration's updates
    is already applied, so resume=auto continues from the last regular checkpoint instead.
    """
    bad = distributed.mean_over_ranks(float(not bool(torch.isfinite(x.detach()).all())))
    if bad > 0:
        path = save(it, run_dir / "checkpoints" / "nonfinite")
        raise FloatingPointError(
            f"{what} is NaN/inf at iteration {it}; the last good weights are in {path}. "
            "Usual causes: a learning rate too high (stage.lr / stage.value_lr), a reward model producing inf, "
            "fp16 overflow (try bfloat16)"
        )
