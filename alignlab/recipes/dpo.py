"""stage=dpo: direct preference optimisation (Rafailov et al. 2023) with TRL's DPOTrainer on the shared DeepSpeed
engine.

The policy starts from the SFT model; the frozen reference is the same model (with LoRA: the policy with its
adapters disabled). Loss per pair, with h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)) summed
over answer tokens: sigmoid (DPO) -log sigmoid(beta * h); ipo (IPO, TRL's length-normalised form)
(h_norm - 1 / (2 beta))^2. Pairs are tokenized as every stage does (alignlab/data/examples.py: the prompt in the
model's chat format, the answer and its EOS), not re-tokenized by TRL. After training: the implicit reward's
held-out preference accuracy and, on TinyHH, the oracle's start/end report.
"""

from __future__ import annotations

import logging

from datasets import Dataset
from omegaconf import DictConfig
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from alignlab import compute, models
from alignlab.data import chat
from alignlab.data.examples import LengthReport, prompt_ids, sequence_ids
from alignlab.data.preferences import load_pairs
from alignlab.data.splits import seeded_split
from alignlab.errors import DataError
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.lifecycle import check_init_from, start_run, tinyhh_dir
from alignlab.stage_checks import dpo_loss_terms
from alignlab.trainer_bridge import (
    CheckpointCallback,
    TrackerCallback,
    save_trainer_model,
    steps_for,
    train_resumable,
    trainer_arguments,
    trainer_tokens,
)

log = logging.getLogger("alignlab.dpo")


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs we tokenized (prompt_ids, chosen_ids, rejected_ids): TRL's own tokenization would render
    prompts without the model's chat format and handle EOS and pad == eos its own way."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def pair_examples(rows: list[dict], tokenizer, report: LengthReport) -> Dataset:
    """prompt_ids / chosen_ids / rejected_ids per pair (answers end with the EOS); pairs longer than max_length are
    dropped and counted (truncating would train on answers cut short)."""
    out = []
    for i, r in enumerate(rows):
        prompt = prompt_ids(tokenizer, r["prompt"])
        chosen, rejected = (sequence_ids(tokenizer, r["prompt"], r[k]) for k in ("chosen", "rejected"))
        if chosen[: len(prompt)] != prompt or rejected[: len(prompt)] != prompt:
            raise ValueError(
                f"pair {i}: the tokenized prompt is not a prefix of prompt + answer for this tokenizer "
                f"(prompt {r['prompt'][:60]!r})"
            )
        if report.add(i, max(len(chosen), len(rejected))):
            continue
        out.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": chosen[len(prompt) :],
                "rejected_ids": rejected[len(prompt) :],
            }
        )
    return Dataset.from_list(out)


def preference_pairs(cfg: DictConfig, data_dir) -> tuple[list[dict], list[dict], str]:
    """(training pairs, held-out pairs, source): TinyHH's preferences or any preference data; the held-out pairs
    from data.eval_split, else a seeded share of the training rows (at most a quarter)."""
    s, d = cfg.stage, cfg.data
    if data_dir is not None:
        source, fmt = str(data_dir / "preferences.jsonl"), "preference"
    else:
        source, fmt = d.source, d.format

    def load(split: str, max_rows: int | None) -> tuple[list[dict], str]:
        return load_pairs(source, fmt, split, max_rows=max_rows, on_malformed=d.on_malformed, subset=s.subset)

    rows, skipped = load(d.train_split, d.max_rows)
    read = len(rows)
    if d.eval_split:
        held_out = load(d.eval_split, None)[0][: s.eval_rows]
    else:
        rows, held_out = seeded_split(rows, s.eval_rows, cfg.seed, max_share=4, share_floor=1)
    if not rows:
        raise DataError(
            f"{source}: no training pairs: {read} usable row(s) read from split {d.train_split} "
            f"(stage.subset={s.subset}){'; ' + skipped if skipped else ''}; {len(held_out)} held out. Give it "
            "more data, set data.eval_split to a separate held-out split, or lower stage.eval_rows"
        )
    return rows, held_out, source


def lora_config(cfg: DictConfig):
    """PEFT's LoraConfig from model.lora (DPOTrainer wraps the policy; its reference is the adapters disabled)."""
    from peft import LoraConfig

    lo = cfg.model.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=models.lora_targets(lo.target_modules),
        task_type="CAUSAL_LM",
    )


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, tracker = run.env, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)

    # 1. Preference pairs, tokenized as every stage does; overlong pairs dropped and counted.
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    rows, held_out, source = preference_pairs(cfg, data_dir)
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or s.init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    chat.use(tokenizer, cfg.data.chat_template)
    lengths = LengthReport(s.max_length)
    train = pair_examples(rows, tokenizer, lengths)
    if lengths.too_long:
        log.warning(lengths.summary(source, "dropped"))
    if len(train) == 0:
        raise ValueError(f"{source}: every pair is longer than stage.max_length={s.max_length}")
    held = pair_examples(held_out, tokenizer, LengthReport(s.max_length))

    # 2. Derived sizes, computed once and logged.
    steps = steps_for(s, len(train))

    # 3. Policy (the reference is TRL's frozen copy of it, or the adapters disabled) and the trainer.
    model = models.load_causal_lm(
        s.init_from, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    models.disable_dropout(model)
    model.config.use_cache = False
    callbacks = [TrackerCallback(run.tracker), saving := CheckpointCallback(run)]
    args = trainer_arguments(
        TRLDPOConfig,
        run=run,
        ds_cfg=cfg.deepspeed,
        stage=s,
        steps=steps,
        dtype=next(model.parameters()).dtype,
        seed=cfg.seed,
        show_progress=cfg.logger.progress,
        with_eval=len(held) > 0,
        beta=s.beta,
        **dpo_loss_terms(str(s.loss), s.sft_weight),
        max_length=None,  # overlong pairs are dropped above, never truncated
        dataset_num_proc=None,
        disable_dropout=True,
    )
    trainer = PretokenizedDPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held if len(held) else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=lora_config(cfg) if cfg.model.lora.enabled else None,
    )
    # the policy as trained (PEFT-wrapped with LoRA: its adapters are what trains)
    n_params = models.count_parameters(trainer.model)
    n_trainable = models.count_parameters(trainer.model, trainable=True)
    log.info(
        "%d params | %s loss, beta %g, sft_weight %g | %d training pairs (%d dropped as too long) from %s, subset=%s | "
        "%d held-out pairs | %d steps of %d (%.2f epochs)",
        n_params,
        s.loss,
        s.beta,
        s.sft_weight,
        len(train),
        lengths.too_long,
        source,
        s.subset,
        len(held),
        steps,
        s.batch_size,
        steps * s.batch_size / len(train),
    )
    tracker.log(
        {
            "data/train_pairs": len(train),
            "data/dropped_too_long": lengths.too_long,
            "data/eval_pairs": len(held),
            "data/epochs": steps * s.batch_size / len(train),
        },
        step=0,
    )

    # 4. Train (from the checkpoint under resume=auto; a signal checkpoints and stops the stage).
    train_resumable(trainer, run, saving, run.resume)
    # compute.json (alignlab/compute.py): chosen and rejected positions trained, and the same positions through
    # the reference (a frozen copy, or the adapters disabled), every step
    tokens = trainer_tokens(trainer)
    ledger = compute.Ledger()
    ledger.train("train", n_params, n_trainable, tokens)
    ledger.forward("reference", n_params - (n_trainable if cfg.model.lora.enabled else 0), tokens)
    if env.is_main:
        compute.write(run.run_dir, "dpo", ledger, [s.init_from])

    # 5. Save: resumable engine state, then the policy (LoRA adapters merged) for the later stages.
    save_trainer_model(trainer, tokenizer, model_out, env, steps)

    # 6. TinyHH: the starting (SFT) and DPO models judged by the oracle on the same held-out prompts.
    if data_dir is not None and s.sample_eval and env.is_main:
        judge_start_end(
            model_out,
            start=s.init_from,
            data_dir=data_dir,
            n=s.sample_eval,
            max_new_tokens=s.eval_max_new_tokens,
            device=run.device,
            seed=cfg.seed,
            tracker=tracker,
            step=steps,
            samples_path=run.run_dir / "samples.jsonl",
            label=s.name,
        )
    tracker.close()
