"""stage=ppo (and stage=ppo_ptx, grpo, rloo): KL-penalised PPO for language models, InstructGPT / Ziegler et al.
style, and its critic-free variants.

Actor from the SFT model and critic from the reward model, each a DeepSpeed engine with its own optimizer; the
frozen reference (the SFT model; with LoRA, the policy with its adapters disabled) and the reward scorer in eval
mode; dropout off everywhere. run() numbers its steps: 1 data, 2 engines, 3 derived sizes, 4 the loop, 5 save,
6 the TinyHH oracle's start/end report. One iteration of the loop:

  4.1 roll out: sample one answer per prompt (KV cache, temperature T, EOS truncation), decode
  4.2 score: reward model(s) on the text, missing-EOS penalty, clip
  4.3 old log-probs, reference log-probs (logits / T in both) and values, without gradients
  4.4 per-token rewards r_t = -beta * k_t (+ score at the last token), optional reward whitening, GAE, advantage
      whitening                                              (4.1-4.4: make_experience -> Experience)
  4.5 ppo_epochs x shuffled minibatches x micro-batches: clipped policy loss (+ ptx_coef * LM loss on a separate
      pretraining micro-batch, PPO-ptx) and clipped value loss, one optimizer step per minibatch for each engine
                                                             (ppo_update)
  4.6 metrics, KL controller update, sample tables          (iteration_metrics, append_samples)

stage=grpo and stage=rloo (stage.advantage): each iteration samples K = group_size answers to each of
rollout_batch_size / K prompts; no critic: an episode's advantage is its return against its group's (GRPO:
normalised by the group's std; RLOO: the mean of its K - 1 siblings), the same at every token of the answer.
The KL penalty goes in the reward (kl_penalty=reward, RLOO) or into the loss (kl_penalty=loss, GRPO's k3 term).
Everything else (rollouts, ptx, ZeRO-3, resume) is PPO's.

Spec: the project's RLHF spec (rlhf.md), sections 3-4; the tensor math lives in alignlab/rl/ and is unit-tested there.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignlab import compute, distributed, models
from alignlab.checkpoint import (
    atomic_write_text,
    load_resumable,
    rng_untouched,
    save_pretrained,
    save_resumable,
)
from alignlab.data import chat
from alignlab.data.packing import EpochOrder, Packed
from alignlab.data.text_blocks import BlockStream, LMBatch, load_ptx_texts, pack_texts
from alignlab.evaluation.lm_loss import lm_eval_loss
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.experience import Experience, MicroBatch, actor_loss, forward_stats, shaped_scores
from alignlab.lifecycle import Run, check_init_from, deepspeed_json, start_run, step_boundary, tinyhh_dir
from alignlab.rl.advantages import explained_variance, gae, group_advantages, masked_mean, masked_whiten
from alignlab.rl.kl import kl_controller, kl_per_token, token_rewards
from alignlab.rl.losses import value_loss
from alignlab.rollout import Prompts, Rollout, load_prompts, sample_rollout
from alignlab.scoring import RewardScorer
from alignlab.stage_checks import ppo_sizes

log = logging.getLogger("alignlab.ppo")


def load_ptx_blocks(cfg: DictConfig, data_dir: Path | None, tokenizer) -> tuple[Packed, Packed]:
    """(train, held-out) pretraining blocks: TinyHH's ptx documents, or the text data of stage.ptx_source."""
    s = cfg.stage
    ptx = load_ptx_texts(s.ptx_source, data_dir, on_malformed=cfg.data.on_malformed)
    if ptx is None:
        raise ValueError(
            "stage.ptx_source must name a text dataset for PPO-ptx / the pretraining-loss measurement"
        )
    return pack_texts(ptx.train, tokenizer, s.ptx_seq_len), pack_texts(ptx.held_out, tokenizer, s.ptx_seq_len)


def ptx_stream(blocks: Packed, micro_batch_size: int, accum: int, world_size: int, seed: int) -> BlockStream:
    """PPO-ptx's pretraining micro-batches: optimizer step k reads the k-th global batch (ptx_micro_batch_size x
    accumulation steps x ranks) of a seeded per-epoch order of the blocks."""
    return BlockStream(
        blocks, EpochOrder(len(blocks), seed + 1), micro_batch_size, micro_batch_size * accum * world_size
    )


# ------------------------------------------------------------------ engines and state


@dataclass
class Engines:
    """PPO's four models: actor and critic engines, the frozen reference and the reward scorer (GRPO, RLOO: three)."""

    policy: Any  # DeepSpeed engine around the actor (the model being trained)
    # DeepSpeed engine around TokenValueModel(value model from the reward model); None: critic-free (grpo, rloo)
    critic: Any
    reference: torch.nn.Module | None  # the frozen SFT model; None with LoRA (the policy, adapters disabled)
    scorer: RewardScorer
    lora: bool
    synced: bool  # ZeRO-3 on several ranks: every forward is collective, so generation steps together
    n_params: int  # the actor's parameters (before wrapping)
    n_trainable: int  # the actor's trainable parameters (LoRA: its adapters)
    n_critic: int = 0  # the critic's parameters (0: critic-free)
    n_critic_trainable: int = 0


def engine_for(model, lr: float, cfg: DictConfig, accum: int, world_size: int):
    """A DeepSpeed engine with its own AdamW over the trainable parameters; dropout off for good."""
    s = cfg.stage
    models.disable_dropout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(s.betas), eps=s.adam_eps, weight_decay=s.weight_decay)
    config = deepspeed_json(
        cfg.deepspeed,
        micro_batch_size=s.micro_batch_size,
        grad_accum=accum,
        world_size=world_size,
        grad_clip=s.grad_clip,
        dtype=next(model.parameters()).dtype,
    )
    return distributed.wrap(model, opt, None, config)[0]


def build_engines(cfg: DictConfig, accum: int, world_size: int, device) -> Engines:
    """Actor and critic engines, frozen reference and reward scorer; dropout off in all of them."""
    s, m = cfg.stage, cfg.model
    lora = m.lora.enabled
    policy_model = models.load_causal_lm(s.init_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    value_model = (
        models.load_reward_model(s.value_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        if s.advantage == "gae"
        else None
    )
    reference = None
    if lora:
        lo = m.lora
        lora_args = dict(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules)
        policy_model = models.apply_lora(policy_model, **lora_args)
        if value_model is not None:
            value_model = models.apply_lora(value_model, **lora_args, task_type="SEQ_CLS")
    else:
        reference = models.load_causal_lm(s.init_from, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        models.disable_dropout(reference)
        reference.to(device).eval().requires_grad_(False)
    n_params = models.count_parameters(policy_model)
    n_trainable = models.count_parameters(policy_model, trainable=True)
    n_critic = models.count_parameters(value_model) if value_model is not None else 0
    n_critic_trainable = (
        models.count_parameters(value_model, trainable=True) if value_model is not None else 0
    )
    return Engines(
        policy=engine_for(policy_model, s.lr, cfg, accum, world_size),
        critic=None
        if value_model is None
        else engine_for(models.TokenValueModel(value_model), s.value_lr, cfg, accum, world_size),
        reference=reference,
        scorer=RewardScorer.from_config(cfg.reward, device=device, dtype=m.dtype),
        lora=lora,
        synced=cfg.deepspeed.zero_stage == 3 and world_size > 1,
        n_params=n_params,
        n_trainable=n_trainable,
        n_critic=n_critic,
        n_critic_trainable=n_critic_trainable,
    )


@dataclass
class PPOState:
    """What the loop's helpers (evaluate, save_checkpoint, make_experience, ppo_update) read and update."""

    run: Run
    stage: DictConfig  # cfg.stage
    tokenizer: Any
    engines: Engines
    kl_ctl: Any  # the KL coefficient beta (fixed or adaptive controller)
    eval_prompts: Prompts  # held-out prompts, never trained on
    ptx_held_out: Packed | None  # held-out pretraining blocks (eval/ptx_loss), None without pretraining text
    opt_step: int = 0  # optimizer steps taken: PPO-ptx's position in its pretraining data
    ledger: compute.Ledger = field(default_factory=compute.Ledger)  # training compute so far (compute.json)
    ptx_tokens: float = 0.0  # this rank's pretraining positions trained in the current iteration (PPO-ptx)


def trained(engines: Engines) -> dict[str, Any]:
    """The engines a checkpoint holds: the actor, and the critic where there is one."""
    return {"actor": engines.policy} | ({"critic": engines.critic} if engines.critic is not None else {})


def save_checkpoint(st: PPOState, it: int, root: Path | None = None) -> Path:
    """The engines (the critic where there is one), every rank's RNG, the KL coefficient and the optimizer-step
    count (collective)."""
    return save_resumable(
        root or st.run.checkpoints,
        it,
        trained(st.engines),
        state={"kl_coef": st.kl_ctl.value, "opt_step": st.opt_step, "compute": st.ledger.as_dict()},
        config=st.run.config,
        keep=st.run.keep_checkpoints,
    )


def check_finite(x: torch.Tensor, what: str, it: int, st: PPOState) -> None:
    """Stop on NaN/inf (agreed over ranks), after saving the weights as they are now.

    They go to checkpoints/nonfinite/, not among the resumable checkpoints: part of this iteration's updates may
    already be applied (and the weights may hold NaN themselves), so they are for inspection, and resume=auto
    continues from the last regular checkpoint instead.
    """
    bad = distributed.mean_over_ranks(float(not bool(torch.isfinite(x.detach()).all())))
    if bad > 0:
        path = save_checkpoint(st, it, st.run.run_dir / "checkpoints" / "nonfinite")
        raise FloatingPointError(
            f"{what} is NaN/inf at iteration {it}; the weights at that point are in {path} (for inspection; "
            "resume=auto continues from the last regular checkpoint). Usual causes: a learning rate too high "
            "(stage.lr / stage.value_lr), a reward model producing inf, fp16 overflow (try bfloat16)"
        )


# ------------------------------------------------------------------ experience (4.1-4.4)


def stage_scores(st: PPOState, prompts: Prompts, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, shaped) scores [B] of a rollout under the stage's missing-EOS rule and clip."""
    s = st.stage
    return shaped_scores(
        st.engines.scorer,
        prompts,
        ro,
        st.run.device,
        missing_eos=s.missing_eos,
        missing_eos_penalty=s.missing_eos_penalty,
        clip=s.score_clip,
    )


def rollout(st: PPOState, prompts: Prompts, keep_logprobs: bool = False) -> Rollout:
    """One sampled answer per prompt from the current policy (eval mode while sampling); keep_logprobs: with the
    sampled tokens' log-probs from the sampling pass (stage.old_logprobs=sampling)."""
    s, policy = st.stage, st.engines.policy
    policy.eval()
    ro = sample_rollout(
        policy.module,
        st.tokenizer,
        prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        device=st.run.device,
        synced_gpus=st.engines.synced,
        return_logprobs=keep_logprobs,
    )
    policy.train()
    return ro


def make_experience(st: PPOState, prompts: Prompts, it: int) -> Experience:
    """Steps 4.1-4.4 of iteration `it`: roll out, score, old/reference log-probs and values, rewards and GAE."""
    s, e = st.stage, st.engines
    t0 = time.perf_counter()
    # 4.1 Roll out: one sampled answer per prompt (with its log-probs where stage.old_logprobs=sampling).
    ro = rollout(st, prompts, keep_logprobs=s.old_logprobs == "sampling")
    t_gen = time.perf_counter()

    # 4.2 Score the text with the reward model(s): normalised, EOS-penalised, clipped.
    raw, scores = stage_scores(st, prompts, ro)
    t_score = time.perf_counter()
    check_finite(raw, "reward-model scores", it, st)

    # 4.3 Old (unless the sampling pass kept them) and reference log-probs and values, without gradients.
    old_logprobs, ref_logprobs, old_values = forward_stats(
        e.policy, e.reference, e.critic, ro, s.micro_batch_size, s.temperature, e.lora
    )
    t_ref = time.perf_counter()

    # 4.4 Per-token rewards, GAE (or the group baseline), whitening.
    mask = ro.response_mask.float()
    kl = kl_per_token(old_logprobs, ref_logprobs, mask, s.kl_estimator)
    beta_in_reward = st.kl_ctl.value if s.kl_penalty == "reward" else 0.0
    rewards, non_score = token_rewards(scores, kl, mask, beta_in_reward)
    if s.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if s.advantage == "gae":
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
    else:  # the episode's return against its group's, at every answer token; no critic, so no returns to fit
        group = group_advantages(rewards.sum(1), s.group_size, s.advantage)
        advantages, returns = group[:, None] * mask, torch.zeros_like(mask)
    if s.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        rollout=ro,
        raw_scores=raw,
        scores=scores,
        response_mask=mask,
        old_logprobs=old_logprobs,
        old_values=old_values,
        kl=kl,
        non_score=non_score,
        advantages=advantages,
        returns=returns,
        ref_logprobs=ref_logprobs if s.kl_penalty == "loss" else None,
        seconds={
            "time/generate_s": t_gen - t0,
            "time/score_s": t_score - t_gen,
            "time/reference_s": t_ref - t_score,
        },
    )


# ------------------------------------------------------------------ the PPO update (4.5)


def train_micro_batch(st: PPOState, mb: MicroBatch, ptx: LMBatch | None, it: int) -> dict[str, float]:
    """One micro-batch of both engines: actor (policy + ptx loss) backward and step, then critic (value loss).
    The engines accumulate gradients and take their optimizer step at the minibatch's last micro-batch."""
    s, policy, critic = st.stage, st.engines.policy, st.engines.critic
    beta_in_loss = st.kl_ctl.value if s.kl_penalty == "loss" else 0.0
    loss, row = actor_loss(policy, mb, s.temperature, s.clip_range, s.ptx_coef, ptx, beta_in_loss)
    check_finite(loss, "policy loss", it, st)
    policy.backward(loss)
    policy.step()
    if critic is None:
        return row
    values = critic(mb.ids, mb.mask)[:, mb.ctx - 1 : -1]
    vout = value_loss(values, mb.old_values, mb.returns, mb.response_mask, s.clip_range_value)
    check_finite(vout.loss, "value loss", it, st)
    critic.backward(s.vf_coef * vout.loss)
    critic.step()
    row.update({"ppo/value_loss": vout.loss.item(), "ppo/value_clipfrac": vout.clipfrac.item()})
    return row


def ppo_update(
    st: PPOState, exp: Experience, it: int, seed: int, minibatches: int, accum: int, ptx: BlockStream | None
) -> dict[str, float]:
    """Step 4.5: ppo_epochs x shuffled minibatches x micro-batches; one optimizer step per minibatch and engine.
    Returns the mean of every per-micro-batch statistic."""
    s, env, device = st.stage, st.run.env, st.run.device
    mb_local = s.minibatch_size // env.world_size  # one minibatch's episodes on this rank
    stats: dict[str, list[float]] = {}
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)
    for _epoch in range(s.ppo_epochs):
        perm = torch.randperm(len(exp), generator=g).to(device)
        for m in range(minibatches):
            for a in range(accum):
                idx = perm[m * mb_local + a * s.micro_batch_size :][: s.micro_batch_size]
                ptx_batch = ptx.batch(st.opt_step, a, env.rank, env.world_size, device) if ptx else None
                if ptx_batch is not None:
                    st.ptx_tokens += float((ptx_batch.labels != -100).sum())
                row = train_micro_batch(st, exp.micro_batch(idx), ptx_batch, it)
                for k, v in row.items():
                    stats.setdefault(k, []).append(v)
            st.opt_step += 1
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ------------------------------------------------------------------ metrics, samples, evaluation (4.6)


def iteration_compute(st: PPOState, exp: Experience) -> compute.Ledger:
    """This iteration's training compute over all ranks (alignlab/compute.py), from the positions of its episodes
    (prompt and answer, padding left out): sampling them (each position once through the KV cache), scoring them
    with the reward model(s), the old-policy, reference and value forwards, then ppo_epochs of actor (and critic)
    forward + backward; PPO-ptx's pretraining positions on the actor. Collective (a sum over ranks)."""
    e, s, ro = st.engines, st.stage, exp.rollout
    local = {
        "episode_tokens": float(ro.query_mask.sum() + ro.response_mask.sum()),
        "ptx_tokens": st.ptx_tokens,
    }
    st.ptx_tokens = 0.0
    world = st.run.env.world_size
    total = {k: v * world for k, v in distributed.means_over_ranks(local).items()}
    seq = total["episode_tokens"]
    ledger = compute.Ledger()
    ledger.forward("rollout", e.n_params, seq)
    # the reward model(s) counted in the policy's positions (the scorer re-tokenizes the text in its own)
    ledger.forward("reward", e.scorer.params, seq)
    if s.old_logprobs == "forward":  # else the sampling pass's (counted in "rollout")
        ledger.forward("old_logprobs", e.n_params, seq)
    # the reference: a frozen copy, or (LoRA) the policy with its adapters disabled
    ledger.forward("reference", e.n_params - (e.n_trainable if e.lora else 0), seq)
    ledger.train("actor", e.n_params, e.n_trainable, s.ppo_epochs * seq)
    if e.critic is not None:
        ledger.forward("values", e.n_critic, seq)
        ledger.train("critic", e.n_critic, e.n_critic_trainable, s.ppo_epochs * seq)
    if total["ptx_tokens"]:
        ledger.train("ptx", e.n_params, e.n_trainable, total["ptx_tokens"])
    return ledger


def iteration_metrics(
    st: PPOState, exp: Experience, stats: dict[str, float], t0: float, t_train: float
) -> dict[str, float]:
    """The iteration's metrics, averaged over ranks: the update's statistics, scores, KL, rewards, lengths, times.
    ppo/kl_coef is the beta this iteration used (the controller updates after)."""
    s, ro, mask = st.stage, exp.rollout, exp.response_mask
    seq_kl = exp.kl.sum(1)
    n_tokens = float(mask.sum())
    t_gen = exp.seconds["time/generate_s"]
    metrics = dict(stats)
    metrics.update(
        {
            "ppo/score": exp.scores.mean().item(),
            "ppo/score_std": exp.scores.std().item() if len(exp.scores) > 1 else 0.0,
            "ppo/rm_score": exp.raw_scores.mean().item(),
            "ppo/kl": seq_kl.mean().item(),
            "ppo/non_score_reward": exp.non_score.sum(1).mean().item(),
            "ppo/reward": (exp.non_score.sum(1) + exp.scores).mean().item(),
            "ppo/response_length": ro.lengths.float().mean().item(),
            "ppo/eos_fraction": ro.ended.float().mean().item(),
            "ppo/advantage_mean": masked_mean(exp.advantages, mask).item(),
            **exp.seconds,
            "time/train_s": t_train - t0 - sum(exp.seconds.values()),
            "perf/tokens_per_s_generate": n_tokens / max(1e-9, t_gen),
        }
    )
    if st.engines.critic is not None:
        metrics["ppo/explained_variance"] = explained_variance(exp.old_values, exp.returns, mask)
    metrics = distributed.means_over_ranks(metrics)
    metrics["ppo/kl_coef"] = st.kl_ctl.value
    elapsed = time.perf_counter() - t0
    metrics["perf/samples_per_s"] = s.rollout_batch_size / elapsed
    metrics["perf/tokens_per_s"] = metrics["ppo/response_length"] * s.rollout_batch_size / elapsed
    return metrics


def append_samples(st: PPOState, exp: Experience, it: int, samples_path: Path) -> None:
    """The first samples_per_table episodes of this rank as a "train" table: samples.jsonl (rank 0) and the tracker."""
    ro = exp.rollout
    table = [
        {"iteration": it, "prompt": p, "response": t, "score": round(float(sc), 4), "kl": round(float(k), 4)}
        for p, t, sc, k in zip(ro.prompts.texts, ro.texts, exp.scores, exp.kl.sum(1), strict=True)
    ][: st.stage.samples_per_table]
    if st.run.env.is_main:
        with open(samples_path, "a") as f:
            f.writelines(json.dumps({"table": "train", **r}) + "\n" for r in table)
    st.run.tracker.log_table("ppo/samples", table, step=it)


def evaluate(st: PPOState, step: int) -> None:
    """RM score and KL on the held-out prompts (this rank's share), plus the pretraining loss."""
    s, e, env, device = st.stage, st.engines, st.run.env, st.run.device
    mine = st.eval_prompts.take(range(env.rank, len(st.eval_prompts), env.world_size))
    ro = rollout(st, mine)
    _, scores = stage_scores(st, mine, ro)
    old, ref, _ = forward_stats(
        e.policy, e.reference, e.critic, ro, s.micro_batch_size, s.temperature, e.lora
    )
    kl = kl_per_token(old, ref, ro.response_mask, s.kl_estimator).sum(1)
    row = distributed.means_over_ranks(
        {
            "eval/score": scores.mean().item(),
            "eval/kl": kl.mean().item(),
            "eval/response_length": ro.lengths.float().mean().item(),
        }
    )
    if st.ptx_held_out is not None:  # every rank measures every block (the same number), averaged over ranks
        row["eval/ptx_loss"] = lm_eval_loss(
            e.policy, st.ptx_held_out, s.micro_batch_size, device, collective=True
        )
    st.run.tracker.log(row, step=step)
    log.info("held-out at iteration %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))


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


def log_sizes(st: PPOState, train_prompts: Prompts, per_rank: int, minibatches: int, accum: int) -> None:
    """Step 3: the derived sizes, once, in the log and as step-0 metrics."""
    s, env, n_params = st.stage, st.run.env, st.engines.n_params
    log.info(
        "%d params%s | %d train / %d held-out prompts | %d iterations x %d episodes (%d per rank) | %d epochs x "
        "%d minibatches of %d = %d micro x %d accum x %d ranks | ptx_coef %g | beta %g (%s, %s)",
        *(n_params, " (LoRA)" if st.engines.lora else "", len(train_prompts), len(st.eval_prompts)),
        *(s.iterations, s.rollout_batch_size, per_rank, s.ppo_epochs, minibatches, s.minibatch_size),
        *(s.micro_batch_size, accum, env.world_size, s.ptx_coef, s.kl_coef, s.kl_controller, s.kl_estimator),
    )
    st.run.tracker.log(
        {
            "data/train_prompts": len(train_prompts),
            "data/eval_prompts": len(st.eval_prompts),
            "data/dropped_prompts": train_prompts.dropped + st.eval_prompts.dropped,
            "model/params": n_params,
            "ppo/updates_per_iteration": s.ppo_epochs * minibatches,
        },
        step=0,
    )


# ------------------------------------------------------------------ the recipe


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, device, tracker = run.env, run.device, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)
    if s.advantage == "gae":
        models.require_input(s.value_from, "stage.value_from")
    per_rank, minibatches, accum = ppo_sizes(s, env.world_size)

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
    if len(train_prompts) < s.rollout_batch_size // s.group_size:
        raise ValueError(
            f"{len(train_prompts)} training prompts < the {s.rollout_batch_size // s.group_size} an iteration reads"
            f" (stage.rollout_batch_size={s.rollout_batch_size} / stage.group_size={s.group_size})"
        )
    ptx_train, ptx_held_out = (
        load_ptx_blocks(cfg, data_dir, tokenizer)
        if (s.ptx_coef or s.ptx_source or data_dir)
        else (None, None)
    )

    # 2. Models: actor and critic engines, frozen reference and reward scorer; dropout off in all of them.
    engines = build_engines(cfg, accum, env.world_size, device)
    kl_ctl = kl_controller(s.kl_controller, s.kl_coef, s.kl_target, s.kl_horizon)
    st = PPOState(run, s, tokenizer, engines, kl_ctl, eval_prompts, ptx_held_out)

    # 3. Derived sizes, computed once and logged.
    log_sizes(st, train_prompts, per_rank, minibatches, accum)

    # 4. The loop. Iteration i reads rollout_batch_size / K prompts from a seeded per-epoch order, rank r its
    # slice, each of them K times in a row (K = group_size: one group per prompt; 1 for PPO).
    per_rank_prompts = per_rank // s.group_size
    prompt_order = EpochOrder(len(train_prompts), cfg.seed)
    ptx = (
        ptx_stream(ptx_train, s.ptx_micro_batch_size, accum, env.world_size, cfg.seed) if s.ptx_coef else None
    )
    samples_path = run.run_dir / "samples.jsonl"
    save = functools.partial(save_checkpoint, st)
    if run.resume:  # resume=auto: engines, RNG, beta and the pretraining-data position of the interrupted run
        state = load_resumable(run.resume, trained(engines))
        kl_ctl.value, st.opt_step = state["kl_coef"], state["opt_step"]
        st.ledger = compute.Ledger.from_dict(state.get("compute"))
        if "compute" not in state:
            log.warning(
                "%s holds no compute count (an older checkpoint): compute.json counts from here", run.resume
            )
        if env.is_main:
            keep_sample_rows(samples_path, run.resume_step)
    else:
        if env.is_main:
            samples_path.unlink(missing_ok=True)
        evaluate(st, 0)  # the starting point: KL is exactly 0 here (policy == reference)
    bar = tracker.progress(s.iterations, s.name, initial=run.resume_step)
    for it in range(run.resume_step + 1, s.iterations + 1):
        t0 = time.perf_counter()
        start = (it - 1) * (s.rollout_batch_size // s.group_size) + env.rank * per_rank_prompts
        prompts = train_prompts.take(
            [i for i in prompt_order(range(start, start + per_rank_prompts)) for _ in range(s.group_size)]
        )
        # 4.1-4.4 Roll out, score, old/reference log-probs and values, per-token rewards and advantages.
        exp = make_experience(st, prompts, it)
        # 4.5 ppo_epochs x shuffled minibatches x micro-batches; one optimizer step per minibatch and engine.
        stats = ppo_update(st, exp, it, cfg.seed, minibatches, accum, ptx)
        t_train = time.perf_counter()
        st.ledger.merge(iteration_compute(st, exp))
        # 4.6 Metrics, KL controller, sample table.
        metrics = iteration_metrics(st, exp, stats, t0, t_train)
        kl_ctl.update(metrics["ppo/kl"], s.rollout_batch_size)
        if it % s.log_every == 0 or it == s.iterations:
            tracker.log(metrics, step=it)
        bar.update(1)
        bar.set_postfix(
            score=f"{metrics['ppo/score']:.2f}",
            kl=f"{metrics['ppo/kl']:.2f}",
            len=f"{metrics['ppo/response_length']:.0f}",
        )
        if s.samples_every and (it % s.samples_every == 0 or it == 1):
            append_samples(st, exp, it, samples_path)
        if s.eval_every and it % s.eval_every == 0 and it != s.iterations:
            # its rollouts leave training's random numbers alone, so eval_every changes no update
            with rng_untouched():
                evaluate(st, it)
        step_boundary(run, it, s.iterations, s.checkpoint_every, save, bar)
    bar.close()
    if run.resume_step < s.iterations:
        evaluate(st, s.iterations)

    # 5. Save: resumable engine states, then the policy for later stages (gathered on rank 0 under ZeRO-3).
    if run.resume_step < s.iterations:
        save(s.iterations)
    state = distributed.full_state_dict(engines.policy)
    if env.is_main:
        save_pretrained(engines.policy.module, tokenizer, model_out, state_dict=state)
        log.info("saved %s", model_out)
        inputs = [
            s.init_from,
            s.value_from if engines.critic is not None else None,
            *engines.scorer.paths.values(),
        ]
        compute.write(run.run_dir, "ppo", st.ledger, inputs)
    distributed.barrier()

    # 6. TinyHH: the starting (SFT) and PPO models judged by the oracle on the same held-out prompts.
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
            step=s.iterations,
            samples_path=samples_path,
            label=s.name,
        )
    tracker.close()
