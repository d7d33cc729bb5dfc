"""stage=pretrain: causal-LM pretraining on packed documents, a clean loop on the shared DeepSpeed engine.

On TinyHH this builds the tiny Llama base model from scratch on the world's (unaligned) corpus and ends by
sampling the saved model's answers to held-out prompts and judging them with the oracle.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from alignlab import distributed, models
from alignlab.checkpoint import atomic_write_text, load_resumable, save_pretrained, save_resumable
from alignlab.data.formats import canonicalize
from alignlab.data.loading import load_rows
from alignlab.data.packing import (
    EpochOrder,
    Packed,
    lm_labels,
    micro_batch_positions,
    pack_documents,
    unigram_loss,
)
from alignlab.evaluation.tinyhh import judge_model_dir
from alignlab.recipes.common import deepspeed_json, start_run, step_boundary, tinyhh_dir

log = logging.getLogger("alignlab.pretrain")


def load_texts(source: str, fmt: str, split: str, *, on_malformed: str, max_rows: int | None) -> list[str]:
    ds = load_rows(source, split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds, skipped = canonicalize(ds, fmt, "text", source=source, on_malformed=on_malformed)
    if skipped.total:
        log.warning("%s: %s", source, skipped.summary())
    return ds["text"]


def tokenize(texts: list[str], tokenizer, seq_len: int) -> Packed:
    """BOS (the tokenizer's own) + text + EOS per document, packed whole into blocks."""
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, verbose=False)["input_ids"]]
    return pack_documents(docs, seq_len, tokenizer.pad_token_id)


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


@torch.no_grad()
def eval_loss(engine, data: Packed, micro: int, env, device) -> float:
    """Mean next-token NLL over every non-pad target of `data`, sharded over ranks.

    Every rank runs the same number of forwards (an all-padding block where its shard ran out): under ZeRO-3
    each forward gathers parameters collectively, and a rank that stopped early would hang the others.
    """
    engine.eval()
    mine = data.subset(list(range(env.rank, len(data), env.world_size)))
    n_forwards = math.ceil(len(data) / (env.world_size * micro))
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(n_forwards):
        part = mine.subset(list(range(i * micro, min((i + 1) * micro, len(mine)))))
        if len(part) == 0:
            part = Packed(data.tokens[:1], torch.zeros(1, dtype=torch.long), 0)
        x = part.tokens.to(device)
        labels = lm_labels(x, part.lengths)[:, 1:]
        logits = engine(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        ).cpu()
        count += int((labels != -100).sum())
    engine.train()
    # Token-weighted over ranks, so the result does not depend on how blocks were sharded.
    return distributed.mean_over_ranks(total.item()) / max(1e-9, distributed.mean_over_ranks(float(count)))


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, device, tracker = run.env, run.device, run.tracker
    is_tinyhh = cfg.data.source == "tinyhh"
    model_out = run.run_dir / "model"
    if not s.from_scratch:  # fail before any data work
        models.require_input(cfg.model.name_or_path, "model.name_or_path")

    # 1. Text: TinyHH's generated corpus, or any text/HH/prompt-completion/messages data through `datasets`.
    #    Tokenizer: TinyHH's for a model built from scratch, else the one the model was trained with.
    if is_tinyhh:
        data_dir = tinyhh_dir(cfg)
        source, fmt = str(data_dir / "corpus.jsonl"), "text"
    else:
        source, fmt = cfg.data.source, cfg.data.format
    texts = load_texts(
        source, fmt, cfg.data.train_split, on_malformed=cfg.data.on_malformed, max_rows=cfg.data.max_rows
    )
    if cfg.data.eval_split:
        eval_texts = load_texts(
            source, fmt, cfg.data.eval_split, on_malformed=cfg.data.on_malformed, max_rows=None
        )
    else:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, int(len(texts) * cfg.data.eval_fraction))
        eval_texts = [texts[i] for i in order[:n_eval]]
        texts = [texts[i] for i in order[n_eval:]]
    if s.from_scratch:
        if not is_tinyhh and not cfg.model.tokenizer:
            raise ValueError(
                "stage.from_scratch=true on your own data needs model.tokenizer=<path or hub name>"
            )
        tokenizer = models.load_tokenizer(str(data_dir / "tokenizer") if is_tinyhh else cfg.model.tokenizer)
    else:
        if models.same_path(cfg.model.name_or_path, model_out):
            raise ValueError(
                f"model.name_or_path={cfg.model.name_or_path} is this run's own output; continue from another "
                "run's model/ or set run_dir= (or experiment.name=) to write somewhere else"
            )
        tokenizer = models.load_tokenizer(
            cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
        )
    train = tokenize(texts, tokenizer, s.seq_len)
    held_out = tokenize(eval_texts, tokenizer, s.seq_len)
    if train.truncated or held_out.truncated:
        log.warning(
            "%d train and %d eval documents are longer than stage.seq_len=%d and were truncated",
            train.truncated,
            held_out.truncated,
            s.seq_len,
        )
    # Evaluate on a fixed random subset: packing puts the longest documents first.
    eval_order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(cfg.seed))
    held_out = held_out.subset(eval_order[: s.eval_batches * s.micro_batch_size * env.world_size])

    # 2. Derived sizes, computed once and logged.
    accum = distributed.grad_accum_steps(s.batch_size, s.micro_batch_size, env.world_size)
    tokens_per_step = s.batch_size * s.seq_len  # throughput counts block slots, padding included
    epochs = s.steps * s.batch_size / len(train)
    baseline = unigram_loss(train, held_out)

    # 3. Model, optimizer, schedule, DeepSpeed engine.
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
        model = models.build_llama(
            tokenizer,
            hidden_size=a.hidden_size,
            num_hidden_layers=a.num_hidden_layers,
            num_attention_heads=a.num_attention_heads,
            intermediate_size=a.intermediate_size,
            max_position_embeddings=a.max_position_embeddings,
            tie_word_embeddings=a.tie_word_embeddings,
            dtype=cfg.model.dtype,
        )
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
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(s.warmup_steps, s.steps, s.min_lr_ratio)
    )
    ds_config = deepspeed_json(
        cfg.deepspeed,
        micro_batch_size=s.micro_batch_size,
        grad_accum=accum,
        world_size=env.world_size,
        grad_clip=s.grad_clip,
        dtype=next(model.parameters()).dtype,
    )
    n_params = models.count_parameters(model)
    engine, optimizer, scheduler = distributed.wrap(model, optimizer, scheduler, ds_config)
    engine.train()
    log.info(
        "%d params | %d train blocks x %d tokens, %.0f%% filled (%.2f epochs) | batch %d = %d micro x %d accum x "
        "%d ranks | unigram baseline %.3f nats",
        n_params,
        len(train),
        s.seq_len,
        100 * train.fill,
        epochs,
        s.batch_size,
        s.micro_batch_size,
        accum,
        env.world_size,
        baseline,
    )
    tracker.log(
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

    # 4. The loop. Step s reads one global batch from a seeded per-epoch order of the blocks; rank r reads its own
    #    micro-batches of it, so any world size reads the same data in the same order.
    order = EpochOrder(len(train), cfg.seed)
    t_last, steps_since, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0

    def save(step: int) -> Path:
        return save_resumable(
            run.checkpoints,
            step,
            {"model": engine},
            state={},
            rank_state={"loss_sum": loss_sum, "loss_n": loss_n},  # this rank's, since the last log line
            config=run.config,
            keep=run.keep_checkpoints,
        )

    if run.resume:  # resume=auto: engine, RNG and the running loss of the interrupted run
        state = load_resumable(run.resume, {"model": engine})
        loss_sum, loss_n = state["loss_sum"], state["loss_n"]
    bar = tracker.progress(s.steps, "pretrain", initial=run.resume_step)
    for step in range(run.resume_step + 1, s.steps + 1):
        for m in range(accum):
            positions = micro_batch_positions(
                step - 1, m, env.rank, env.world_size, s.micro_batch_size, s.batch_size
            )
            batch = train.subset(order(positions))
            x = batch.tokens.to(device)
            loss = engine(input_ids=x, labels=lm_labels(x, batch.lengths)).loss
            engine.backward(loss)
            engine.step()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        steps_since += 1
        if step % s.log_every == 0 or step == s.steps:
            tok_s = tokens_per_step * steps_since / (time.perf_counter() - t_last)
            train_loss = distributed.mean_over_ranks(loss_sum / loss_n)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train/loss is {train_loss} at step {step}; lower stage.lr")
            row = {
                "train/loss": train_loss,
                "train/lr": scheduler.get_last_lr()[0],
                "perf/tokens_per_s": tok_s,
            }
            if engine.get_global_grad_norm() is not None:  # DeepSpeed reports it only where it computes it
                row["train/grad_norm"] = engine.get_global_grad_norm()
            tracker.log(row, step=step)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
            t_last, steps_since, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
            ev = eval_loss(engine, held_out, s.micro_batch_size, env, device)
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
    distributed.barrier()

    # 6. TinyHH: judge a sample of the saved base model's answers with the oracle (rank 0; reloads from disk).
    if is_tinyhh and s.sample_eval and env.is_main:
        metrics, samples = judge_model_dir(
            model_out, data_dir, s.sample_eval, s.max_new_tokens, device, cfg.seed
        )
        atomic_write_text(run.run_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
        tracker.log(metrics, step=s.steps)
        log.info(
            "base model on held-out prompts: %s",
            json.dumps({k: round(v, 3) for k, v in metrics.items() if not k.endswith(("_low", "_high"))}),
        )
    tracker.close()
