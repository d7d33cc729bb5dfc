"""PPO's experience: one iteration's episodes as named tensors (Experience, MicroBatch), the no-grad forward
statistics they start from (old and reference log-probs, values) and the actor's loss on a micro-batch (PPO's
clipped objective, plus PPO-ptx's LM term). Plain arguments; the loop that uses them is alignlab/recipes/ppo.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignlab.data.text_blocks import LMBatch
from alignlab.generation import response_logits, token_logprobs
from alignlab.rl.advantages import masked_mean
from alignlab.rl.kl import kl_per_token, shape_scores
from alignlab.rl.losses import entropy_from_logits, lm_loss, policy_loss
from alignlab.rollout import Prompts, Rollout


def trim(ids: torch.Tensor, mask: torch.Tensor, context_len: int, response_len: int):
    """Drop query columns that are padding in every row and response columns past the longest answer."""
    lead = int((mask[:, :context_len].sum(0) == 0).sum())
    end = context_len + response_len
    return ids[:, lead:end], mask[:, lead:end], context_len - lead


@dataclass
class MicroBatch:
    """Rows of an Experience, trimmed to their own padding: sequences [b, l], per-response-token tensors [b, t]."""

    ids: torch.Tensor  # query + response ids
    mask: torch.Tensor  # attention mask of ids
    ctx: int  # where the responses start in ids
    response: torch.Tensor
    response_mask: torch.Tensor  # float, 1 on answer tokens (up to and including EOS)
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    ref_logprobs: torch.Tensor | None = None  # the reference's log-probs (GRPO's KL term in the loss)


@dataclass
class Experience:
    """One iteration's episodes on this rank (B of them, T response tokens): what PPO's update and the iteration's
    metrics read. Per-token tensors are [B, T] and zero (or meaningless) past each answer, see response_mask."""

    rollout: Rollout  # prompts, sequences, sampled answers and their text
    raw_scores: torch.Tensor  # [B] the reward model(s) on the text
    scores: torch.Tensor  # [B] after the missing-EOS penalty and the clip: the reward at the last token
    response_mask: torch.Tensor  # [B, T] float
    # log-probs of the sampled tokens under the policy that sampled them (logits / T)
    old_logprobs: torch.Tensor
    old_values: torch.Tensor  # the critic's values at sampling time (zeros without a critic: grpo, rloo)
    kl: torch.Tensor  # per-token KL estimate to the reference
    non_score: torch.Tensor  # -beta * kl: the KL penalty part of the rewards
    advantages: torch.Tensor
    returns: torch.Tensor
    seconds: dict[str, float]  # time/generate_s, time/score_s, time/reference_s
    ref_logprobs: torch.Tensor | None = None  # kept where the loss needs them (kl_penalty=loss)

    def __len__(self) -> int:
        return len(self.rollout.texts)

    def micro_batch(self, idx: torch.Tensor) -> MicroBatch:
        """Rows idx, with query columns that are padding in all of them and answer columns past the longest cut."""
        ro = self.rollout
        response_len = int(self.response_mask[idx].sum(1).max())
        ids, mask, ctx = trim(ro.input_ids[idx], ro.attention_mask[idx], ro.context_len, response_len)

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[idx][:, :response_len]

        return MicroBatch(
            ids=ids,
            mask=mask,
            ctx=ctx,
            response=cut(ro.response),
            response_mask=cut(self.response_mask),
            old_logprobs=cut(self.old_logprobs),
            advantages=cut(self.advantages),
            old_values=cut(self.old_values),
            returns=cut(self.returns),
            ref_logprobs=None if self.ref_logprobs is None else cut(self.ref_logprobs),
        )


def shaped_scores(
    scorer,
    prompts: Prompts,
    ro: Rollout,
    device,
    *,
    missing_eos: str,
    missing_eos_penalty: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, shaped) scores [B]: the reward scorer on the text, then the missing-EOS penalty and the clip."""
    raw = scorer(prompts.texts, ro.texts, prompts.is_safety).to(device)
    shaped = shape_scores(
        raw, ro.ended, missing_eos=missing_eos, missing_eos_penalty=missing_eos_penalty, clip=clip
    )
    return raw, shaped


@torch.no_grad()
def forward_stats(policy, reference, critic, ro: Rollout, micro: int, temperature: float, lora: bool):
    """Old log-probs, reference log-probs and values [B, T] of a rollout, micro-batched, without gradients
    (critic None: critic-free advantages, values are zeros). The old log-probs are the sampling pass's where the
    rollout kept them (Rollout.logprobs): the policy's forward is then skipped."""
    old, ref, values = [], [], []
    for i in range(0, len(ro.texts), micro):
        sl = slice(i, i + micro)
        ids, mask, ctx = trim(ro.input_ids[sl], ro.attention_mask[sl], ro.context_len, ro.response.shape[1])
        tokens = ro.response[sl]
        if ro.logprobs is None:
            old.append(token_logprobs(response_logits(policy, ids, mask, ctx), tokens, temperature))
        else:
            old.append(ro.logprobs[sl])
        if lora:  # the reference is the policy with its adapters switched off: no second copy of the weights
            with policy.module.disable_adapter():
                ref_logits = response_logits(policy.module, ids, mask, ctx)
        else:
            ref_logits = response_logits(reference, ids, mask, ctx)
        ref.append(token_logprobs(ref_logits, tokens, temperature))
        values.append(critic(ids, mask)[:, ctx - 1 : -1] if critic is not None else torch.zeros_like(old[-1]))
    return torch.cat(old), torch.cat(ref), torch.cat(values)


def actor_loss(
    policy,
    mb: MicroBatch,
    temperature: float,
    clip_range: float,
    ptx_coef: float,
    ptx: LMBatch | None,
    kl_coef: float = 0.0,
):
    """PPO's clipped policy loss on one micro-batch, plus ptx_coef * LM loss on a separate pretraining micro-batch
    (PPO-ptx: one backward of the sum = g_PPO + ptx_coef * g_LM), plus kl_coef * the k3 KL of the current policy to
    the reference per answer token (GRPO's loss-side penalty, DeepSeekMath eq. 3-4; needs mb.ref_logprobs).
    Returns (loss, stats)."""
    logits = response_logits(policy, mb.ids, mb.mask, mb.ctx)
    logprobs = token_logprobs(logits, mb.response, temperature)
    out = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip_range)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.float() / temperature), mb.response_mask)
    stats = {
        "ppo/policy_loss": out.loss.item(),
        "ppo/clipfrac": out.clipfrac.item(),
        "ppo/approxkl": out.approxkl.item(),
        "ppo/entropy": entropy.item(),
    }
    loss = out.loss
    if kl_coef:
        if mb.ref_logprobs is None:
            raise ValueError("a KL term in the loss needs the micro-batch's reference log-probs")
        kl = masked_mean(kl_per_token(logprobs, mb.ref_logprobs, mb.response_mask, "k3"), mb.response_mask)
        stats["ppo/kl_loss"] = kl.item()
        loss = loss + kl_coef * kl
    if ptx is not None:
        ptx_loss = lm_loss(policy(input_ids=ptx.tokens, use_cache=False).logits, ptx.labels)
        stats["ppo/ptx_loss"] = ptx_loss.item()
        if ptx_coef:
            loss = loss + ptx_coef * ptx_loss
    return loss, stats
