"""Fine-tuning with the SFT loss (answer tokens only) on prompt/completion rows, on the shared DeepSpeed engine.

stage=sft trains on demonstrations; rejection sampling and context distillation train on rows they generated
(split_generated holds some of those out). TRL's SFTTrainer runs the loop (AnswerLossSFTTrainer: the same loss
without TRL's chunked LM-head kernel where that kernel is slower); alignlab/trainer_bridge.py connects it to the
run's tracker and checkpoints.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import SFTConfig, SFTTrainer

from alignlab import models
from alignlab.compute import train_flops
from alignlab.data import chat
from alignlab.data.examples import LengthReport, sft_example
from alignlab.data.splits import seeded_split
from alignlab.errors import DataError
from alignlab.lifecycle import Run
from alignlab.trainer_bridge import (
    CheckpointCallback,
    TrackerCallback,
    save_trainer_model,
    steps_for,
    train_resumable,
    trainer_arguments,
    trainer_tokens,
)

log = logging.getLogger("alignlab.finetune")


def tokenize(rows: list[dict], tokenizer, train_on: str, report: LengthReport) -> Dataset:
    examples = []
    for i, row in enumerate(rows):
        ex = sft_example(tokenizer, row["prompt"], row["completion"], train_on)
        if report.add(row.get("row", i), len(ex["input_ids"])):
            # Keep the start (the prompt and the beginning of the answer); TRL would cut it the same way.
            ex = {k: v[: report.max_length] for k, v in ex.items()}
        examples.append(ex)
    return Dataset.from_list(examples)


class AnswerLossSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with the answer-token NLL computed from the model's logits in one piece.

    TRL 1.x always patches the LM head with a chunked kernel (log-probs, entropy and top-1 tile by tile) built to
    avoid materialising the logits of a large vocabulary on a GPU; on a small vocabulary that loop of tiles is
    slower than the plain computation (docs/benchmarks.md). Same loss (sum of -log p
    over labelled tokens / tokens in the accumulated batch, TRL's normalisation), same entropy and token-accuracy
    metrics. fused_lm_head=True (stage.fused_lm_head), packed or padding-free batches, DFT, label smoothing or a
    custom loss go to TRL's own path.
    """

    def __init__(self, *args, fused_lm_head: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_lm_head = fused_lm_head

    def _plain(self, inputs) -> bool:
        a = self.args
        return (
            not self.fused_lm_head
            and a.loss_type == "nll"
            and not (a.packing or a.padding_free)
            and self.label_smoother is None
            and self.compute_loss_func is None
            and not self.aux_loss_enabled
            and "labels" in inputs
            and "attention_mask" in inputs
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._plain(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask")}
        logits = model(**forward, use_cache=False).logits[:, :-1].float()
        target = inputs["labels"][:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits, dim=-1)
        token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(token_logp * mask).sum() / torch.as_tensor(n).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages ranks
        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            valid = gather(mask.sum()).sum()
            entropy = gather((-(logp.exp() * logp).sum(-1) * mask).sum()).sum()
            correct = gather(((logits.argmax(-1) == target) & mask).sum()).sum()
            self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


# Attention kernels that keep padding-free packed examples apart (varlen over position ids / cu_seq_lens).
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2")


def check_packing(packing: bool, attn_implementation: str | None) -> None:
    """TRL's packing is padding-free: with sdpa/eager attention packed examples would attend to each other."""
    if packing and attn_implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"stage.packing=true needs a varlen attention kernel ({', '.join(PACKING_ATTENTION)}), but the model "
            f"uses {attn_implementation!r}, with which packed examples would attend to each other; set "
            "stage.packing=false (or load the model with flash attention on a GPU)"
        )


def finetune(
    run: Run,
    cfg: DictConfig,
    hp: DictConfig,
    *,
    init_from: str,
    train_rows: list[dict],
    eval_rows: list[dict],
    model_out: Path,
    source: str,
    step_offset: int = 0,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
) -> dict[str, float]:
    """The SFT loss (answer tokens only) on prompt/completion rows, from init_from into model_out.

    Shared by stage=sft and the stages that fine-tune on their own generated data (rejection sampling, context
    distillation). hp: the fine-tuning fields of the stage config (batch sizes, lr and schedule, max_length,
    train_on, epochs/steps, ...). Metrics go to the run's tracker at step_offset + the trainer's step; returns
    the held-out answer loss before/after, the step count and the training compute (train_tokens, train_flops:
    alignlab/compute.py). checkpoint_dir: where the engine state goes
    (default <run_dir>/checkpoints). resume_from: a checkpoint there to continue from (resume=auto).
    """
    env, tracker = run.env, run.tracker
    if not train_rows:  # TRL would fail later with a KeyError ('completion_mask') on the empty dataset
        raise DataError(
            f"{source}: no rows to fine-tune on ({len(eval_rows)} held out for the answer-token loss); give it "
            "more data, or hold out fewer rows (data.eval_split, stage.eval_rows)"
        )

    # 1. Rows -> tokenized examples with their answer masks; overlong rows counted, logged, truncated.
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    chat.use(tokenizer, cfg.data.chat_template)  # conversations in the model's chat format (recorded with it)
    lengths = LengthReport(hp.max_length)
    train = tokenize(train_rows, tokenizer, hp.train_on, lengths)
    held_out = tokenize(eval_rows, tokenizer, hp.train_on, LengthReport(hp.max_length))
    if lengths.too_long:
        log.warning(lengths.summary(source, "truncated to their first max_length tokens"))

    # 2. Derived sizes, computed once and logged.
    steps = steps_for(hp, len(train))
    answer_tokens = sum(sum(m) for m in train["completion_mask"])
    total_tokens = sum(len(x) for x in train["input_ids"])

    # 3. Model (LoRA optional) and TRL's trainer on the DeepSpeed engine of the `deepspeed=` preset.
    model = models.load_causal_lm(
        init_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    packing = bool(hp.get("packing", False))
    check_packing(packing, model.config._attn_implementation)
    if cfg.model.lora.enabled:
        lo = cfg.model.lora
        model = models.apply_lora(
            model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules
        )
    if hp.get("compile", False):
        # In place (nn.Module.compile): the saved state dict and the Trainer's view of the model are unchanged.
        model.compile(dynamic=True)
    dtype = next(model.parameters()).dtype
    args = trainer_arguments(
        SFTConfig,
        run=run,
        ds_cfg=cfg.deepspeed,
        stage=hp,
        steps=steps,
        dtype=dtype,
        seed=cfg.seed,
        show_progress=cfg.logger.progress,
        completion_only_loss=True,
        max_length=hp.max_length,
        packing=packing,
        eval_packing=False,  # held-out loss per example, comparable with and without packing
        dataset_num_proc=None,
        output_dir=checkpoint_dir,
    )
    trainer = AnswerLossSFTTrainer(
        fused_lm_head=bool(hp.get("fused_lm_head", False)),
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[
            callback := TrackerCallback(tracker, step_offset=step_offset),
            saving := CheckpointCallback(run),
        ],
    )
    n_params, n_trainable = models.count_parameters(model), models.count_parameters(model, trainable=True)
    log.info(
        "%d params (%d trainable) | %d train / %d held-out demonstrations from %s | %d tokens, %.0f%% of them "
        "trained | %d steps of %d sequences (%.2f epochs) | %d rows truncated",
        n_params,
        n_trainable,
        len(train),
        len(held_out),
        source,
        total_tokens,
        100 * answer_tokens / total_tokens,
        steps,
        hp.batch_size,
        steps * hp.batch_size / len(train),
        lengths.too_long,
    )
    tracker.log(
        {
            "data/train_rows": len(train),
            "data/eval_rows": len(held_out),
            "data/answer_token_share": answer_tokens / total_tokens,
            "data/truncated_rows": lengths.too_long,
            "data/epochs": steps * hp.batch_size / len(train),
        },
        step=step_offset,
    )

    # 4. Train; the Trainer evaluates the held-out answer-token loss at step 0, every eval_every steps and at the end.
    train_resumable(trainer, run, saving, resume_from)
    tokens = trainer_tokens(trainer)  # every position forwarded and back-propagated (the prompt's too)
    before, after = (callback.evaluations[i][1]["eval_loss"] for i in (0, -1))
    result = {"eval/answer_loss_start": before, "eval/answer_loss": after}
    tracker.log(result, step=step_offset + steps)
    log.info("held-out answer-token loss %.4f -> %.4f", before, after)

    # 5. Save: resumable engine state, then the model later stages start from.
    model_to_save = trainer.model_wrapped.module
    model_to_save.config.use_cache = True
    save_trainer_model(trainer, tokenizer, model_out, env, steps)
    del trainer, model, model_to_save
    # Models this process loads next (rejection sampling's next sampler) are plain ones, not ZeRO-3 partitions.
    unset_hf_deepspeed_config()
    gc.collect()
    return {
        **result,
        "steps": steps,
        "train_tokens": tokens,
        "train_flops": train_flops(n_params, n_trainable, tokens),
    }


def split_generated(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of a stage's generated rows: at most a fifth, at least one, held out for the answer loss."""
    if len(rows) < 2:
        raise ValueError(
            f"{len(rows)} generated row(s) to fine-tune on: one is held out for the answer-token loss, which leaves "
            "none to train on; generate from more prompts (stage.prompts_per_iteration / stage.n_prompts)"
        )
    return seeded_split(rows, n, seed, max_share=5, at_least=1)
