"""stage=pretrain: causal-LM pretraining on packed documents, a clean loop on the shared DeepSpeed engine.

On TinyHH this builds the tiny Llama base model from scratch on the world's (unaligned) corpus and ends by
sampling the saved model's answers to held-out prompts and judging them with the oracle.

run() steps: 1 text and tokenizer, 2 derived sizes, 3 model and engine, 4 the loop (train_step; every log_every
steps the running loss, every eval_every steps the held-out loss), 5 save, 6 the TinyHH oracle's report.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignlab import compute, distributed, models
from alignlab.checkpoint import load_resumable, save_pretrained, save_resumable
from alignlab.data.packing import EpochOrder, Packed, unigram_loss
from alignlab.data.splits import seeded_split
from alignlab.data.text_blocks import BlockStream, load_texts, pack_texts
from alignlab.evaluation.lm_loss import lm_eval_loss
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.lifecycle import Run, deepspeed_json, start_run, step_boundary, tinyhh_dir

log = logging.getLogger("alignlab.pretrain")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms and biases keep their scale (the GPT-2 / nanoGPT convention)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # DeepSpeed drops empty groups (LoRA trains matrices only), which would desynchronise the LR scheduler.
    return [g for g in groups if g["params"]]


def load_corpus(cfg: DictConfig, data_dir: Path | None) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: TinyHH's generated corpus, or any text/HH/prompt-completion/messages data
    through `datasets`; held out: data.eval_split, else a seeded data.eval_fraction of the training split."""
    if data_dir is not None:
        source, fmt = str(data_dir / "corpus.jsonl"), "text"
    else:
        source, fmt = cfg.data.source, cfg.data.format
    on_malformed = cfg.data.on_malformed
    texts = load_texts(
        source, fmt, cfg.data.train_split, on_malformed=on_malformed, max_rows=cfg.data.max_rows
    )
    if cfg.data.eval_split:
        return texts, load_texts(source, fmt, cfg.data.eval_split, on_malformed=on_malformed, max_rows=None)
    # the seeded held-out split: data.eval_fraction of the documents, at least one
    return seeded_split(texts, int(len(texts) * cfg.data.eval_fraction), cfg.seed, at_least=1)


def load_tokenizer(cfg: DictConfig, data_dir: Path | None, model_out: Path):
    """TinyHH's tokenizer (or model.tokenizer) for a model built from scratch, else the one the model was trained
    with; refuses to continue into this run's own output."""
    if cfg.stage.from_scratch:
        if data_dir is None and not cfg.model.tokenizer:
            raise ValueError(
                "stage.from_scratch=true on your own data needs model.tokenizer=<path or hub name>"
            )
        return models.load_tokenizer(
            str(data_dir / "tokenizer") if data_dir is not None else cfg.model.tokenizer
        )
    if models.same_path(cfg.model.name_or_path, model_out):
        raise ValueError(
            f"model.name_or_path={cfg.model.name_or_path} is this run's own output; continue from another "
            "run's model/ or set run_dir= (or experiment.name=) to write somewhere else"
        )
    return models.load_tokenizer(
        cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )


def pack_corpus(
    texts: list[str], eval_texts: list[str], tokenizer, s: DictConfig, seed: int, world_size: int
) -> tuple[Packed, Packed]:
    """(train, held-out) blocks of stage.seq_len tokens; held out: a fixed random subset of eval_batches global
    micro-batches (packing puts the longest documents first, so the first blocks would not be representative)."""
    train = pack_texts(texts, tokenizer, s.seq_len)
    held_out = pack_texts(eval_texts, tokenizer, s.seq_len)
    if train.truncated or held_out.truncated:
        log.warning(
            "%d train and %d eval documents are longer than stage.seq_len=%d and were truncated",
            train.truncated,
            held_out.truncated,
            s.seq_len,
        )
    eval_order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    return train, held_out.subset(eval_order[: s.eval_batches * s.micro_batch_size * world_size])


def build_model(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """A Llama of model.arch from scratch, or model.name_or_path to continue; with LoRA adapters if enabled."""
    s = cfg.stage
    if s.from_scratch:
        if cfg.model.lora.enabled:
            raise ValueError(
                "model.lora.enabled=true with stage.from_scratch=true: LoRA needs pretrained weights"
            )
        a = cfg.model.arch
        if s.seq_len > a.max_position_embeddings:
            raise ValueError(
                f"stage.seq_len={s.seq_len} > model.arch.max_position_embeddings={a.max_position_embeddings}"
            )
        model = models.llama_from_arch(tokenizer, a, dtype=cfg.model.dtype)
    else:
        model = models.load_causal_lm(
            cfg.model.name_or_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but {cfg.model.name_or_path} embeds only "
                f"{model.get_input_embeddings().num_embeddings}: model.tokenizer does not belong to this model"
            )
    if cfg.model.lora.enabled:
        lo = cfg.model.lora
        model = models.apply_lora(
            model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules
        )
    model.config.use_cache = False  # training never reuses a KV cache; restored before saving
    return model


def build_engine(cfg: DictConfig, model: torch.nn.Module, accum: int, world_size: int):
    """(engine, scheduler): AdamW (decay on matrices only), warmup + cosine schedule, the DeepSpeed engine."""
    s = cfg.stage
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(s.warmup_steps, s.steps, s.min_lr_ratio)
    )
    ds_config = deepspeed_json(
        cfg.deepspeed,
        micro_batch_size=s.micro_batch_size,
        grad_accum=accum,
        world_size=world_size,
        grad_clip=s.grad_clip,
        dtype=next(model.parameters()).dtype,
    )
    engine, _, scheduler = distributed.wrap(model, optimizer, scheduler, ds_config)
    return engine, scheduler


@dataclass
class PretrainState:
    """The loop's state: the engine, and this rank's running training loss since the last log line."""

    run: Run
    engine: Any
    loss_sum: float = 0.0
    loss_n: int = 0


def save_checkpoint(st: PretrainState, step: int) -> Path:
    """The engine, every rank's RNG and running loss (collective)."""
    return save_resumable(
        st.run.checkpoints,
        step,
        {"model": st.engine},
        state={},
        rank_state={"loss_sum": st.loss_sum, "loss_n": st.loss_n},  # this rank's, since the last log line
        config=st.run.config,
        keep=st.run.keep_checkpoints,
    )


def train_step(st: PretrainState, stream: BlockStream, step: int, accum: int, device) -> None:
    """Optimizer step `step` (from 1): accum micro-batches of this rank's slice of the step's global batch."""
    env = st.run.env
    for m in range(accum):
        batch = stream.batch(step - 1, m, env.rank, env.world_size, device)
        loss = st.engine(input_ids=batch.tokens, labels=batch.labels).loss
        st.engine.backward(loss)
        st.engine.step()
        st.loss_sum, st.loss_n = st.loss_sum + loss.item(), st.loss_n + 1


def train_row(st: PretrainState, step: int, scheduler, tokens_per_s: float) -> dict[str, float]:
    """The running training loss (averaged over ranks; NaN/inf stops the run), learning rate, throughput, grad
    norm; the running loss starts over."""
    train_loss = distributed.mean_over_ranks(st.loss_sum / st.loss_n)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"train/loss is {train_loss} at step {step}; lower stage.lr")
    row = {
        "train/loss": train_loss,
        "train/lr": scheduler.get_last_lr()[0],
        "perf/tokens_per_s": tokens_per_s,
    }
    if st.engine.get_global_grad_norm() is not None:  # DeepSpeed reports it only where it computes it
        row["train/grad_norm"] = st.engine.get_global_grad_norm()
    st.loss_sum, st.loss_n = 0.0, 0
    return row


def log_sizes(run: Run, s: DictConfig, n_params: int, train: Packed, held_out: Packed, accum: int) -> float:
    """Step 2's derived sizes, once, in the log and as step-0 metrics; returns the unigram baseline (nats)."""
    epochs = s.steps * s.batch_size / len(train)
    baseline = unigram_loss(train, held_out)
    log.info(
        "%d params | %d train blocks x %d tokens, %.0f%% filled (%.2f epochs) | batch %d = %d micro x %d accum x "
        "%d ranks | unigram baseline %.3f nats",
        *(n_params, len(train), s.seq_len, 100 * train.fill, epochs),
        *(s.batch_size, s.micro_batch_size, accum, run.env.world_size, baseline),
    )
    run.tracker.log(
        {
            "data/train_blocks": len(train),
            "data/eval_blocks": len(held_out),
            "data/epochs": epochs,
            "data/block_fill": train.fill,
            "data/truncated_docs": train.truncated,
            "model/params": n_params,
            "eval/unigram_loss": baseline,
        },
        step=0,
    )
    return baseline


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, device, tracker = run.env, run.device, run.tracker
    model_out = run.run_dir / "model"
    if not s.from_scratch:  # fail before any data work
        models.require_input(cfg.model.name_or_path, "model.name_or_path")

    # 1. Text: TinyHH's generated corpus, or any text/HH/prompt-completion/messages data through `datasets`.
    #    Tokenizer: TinyHH's for a model built from scratch, else the one the model was trained with.
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    texts, eval_texts = load_corpus(cfg, data_dir)
    tokenizer = load_tokenizer(cfg, data_dir, model_out)
    train, held_out = pack_corpus(texts, eval_texts, tokenizer, s, cfg.seed, env.world_size)

    # 2. Derived sizes, computed once (and logged with the model's size below).
    accum = distributed.grad_accum_steps(s.batch_size, s.micro_batch_size, env.world_size)
    tokens_per_step = s.batch_size * s.seq_len  # throughput counts block slots, padding included

    # 3. Model, optimizer, schedule, DeepSpeed engine.
    model = build_model(cfg, tokenizer)
    n_params = models.count_parameters(model)
    engine, scheduler = build_engine(cfg, model, accum, env.world_size)
    engine.train()
    baseline = log_sizes(run, s, n_params, train, held_out, accum)

    # 4. The loop. Step s reads one global batch from a seeded per-epoch order of the blocks; rank r reads its own
    #    micro-batches of it, so any world size reads the same data in the same order.
    stream = BlockStream(train, EpochOrder(len(train), cfg.seed), s.micro_batch_size, s.batch_size)
    st = PretrainState(run, engine)
    save = functools.partial(save_checkpoint, st)
    if run.resume:  # resume=auto: engine, RNG and the running loss of the interrupted run
        state = load_resumable(run.resume, {"model": engine})
        st.loss_sum, st.loss_n = state["loss_sum"], state["loss_n"]
    t_last, steps_since = time.perf_counter(), 0
    bar = tracker.progress(s.steps, "pretrain", initial=run.resume_step)
    for step in range(run.resume_step + 1, s.steps + 1):
        train_step(st, stream, step, accum, device)
        bar.update(1)
        steps_since += 1
        if step % s.log_every == 0 or step == s.steps:
            tok_s = tokens_per_step * steps_since / (time.perf_counter() - t_last)
            row = train_row(st, step, scheduler, tok_s)
            tracker.log(row, step=step)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tok_s:,.0f}")
            t_last, steps_since = time.perf_counter(), 0
        if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
            # every rank its share of the blocks, token sums in float64, token-weighted over ranks
            shard = (env.rank, env.world_size)
            ev = lm_eval_loss(
                engine, held_out, s.micro_batch_size, device, collective=True, shard=shard, token_sums=True
            )
            tracker.log({"eval/loss": ev, "eval/loss_vs_unigram": ev / baseline}, step=step)
            t_last, steps_since = time.perf_counter(), 0  # evaluation time is not training throughput
        step_boundary(run, step, s.steps, s.checkpoint_every, save, bar)
    bar.close()

    # 5. Save: resumable engine state, then the model for the next stage (gathered on rank 0 under ZeRO-3).
    if run.resume_step < s.steps:
        save(s.steps)
    state = distributed.full_state_dict(engine)
    if env.is_main:
        engine.module.config.use_cache = True  # generation in later stages wants the KV cache
        save_pretrained(engine.module, tokenizer, model_out, state_dict=state)
        log.info("saved %s", model_out)
        # compute.json (alignlab/compute.py): every block slot of every step, forward and backward
        ledger = compute.Ledger()
        ledger.train(
            "train", n_params, models.count_parameters(model, trainable=True), tokens_per_step * s.steps
        )
        compute.write(run.run_dir, "pretrain", ledger, [] if s.from_scratch else [cfg.model.name_or_path])
    distributed.barrier()

    # 6. TinyHH: judge a sample of the saved base model's answers with the oracle (rank 0; reloads from disk).
    if data_dir is not None and s.sample_eval and env.is_main:
        judge_start_end(
            model_out,
            start=None,
            data_dir=data_dir,
            n=s.sample_eval,
            max_new_tokens=s.eval_max_new_tokens,
            device=device,
            seed=cfg.seed,
            tracker=tracker,
            step=s.steps,
            samples_path=run.run_dir / "samples.jsonl",
            label="base model",
        )
    tracker.close()
