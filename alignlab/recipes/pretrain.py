"""stage=pretrain: causal-LM pretraining on packed text blocks, a clean loop on the shared DeepSpeed engine.

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
from omegaconf import DictConfig

from alignlab import distributed, models
from alignlab.checkpoint import atomic_write_text, save_engine_checkpoint, save_pretrained
from alignlab.data.formats import canonicalize
from alignlab.data.loading import load_rows
from alignlab.recipes.common import start_run, tinyhh_dir

log = logging.getLogger("alignlab.pretrain")
EVAL_SETS = ("eval_benign", "eval_harmful", "eval_attack", "eval_selfeval")


def load_texts(source: str, fmt: str, split: str, *, on_malformed: str, max_rows: int | None) -> list[str]:
    ds = load_rows(source, split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds, skipped = canonicalize(ds, fmt, "text", source=source, on_malformed=on_malformed)
    if skipped.total:
        log.warning("%s: %s", source, skipped.summary())
    return ds["text"]


def pack(texts: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, int]:
    """Whole documents (BOS + text + EOS) packed into [n_blocks, seq_len] blocks, right-padded; never split.

    A document cut at a block boundary would lose the context its last tokens depend on (a judgement without
    the dialogue it judges), so documents are placed whole, best fit, longest first. Returns the number of
    documents longer than seq_len, which are truncated (and should be logged by the caller).
    """
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, verbose=False)["input_ids"]]
    truncated = sum(len(d) > seq_len for d in docs)
    docs = [d[:seq_len] for d in docs]
    # bins_by_room[r] holds the blocks with exactly r free slots; best fit = the smallest room that fits.
    blocks: list[list[int]] = []
    bins_by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
    for i in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        need = len(docs[i])
        room = next((r for r in range(need, seq_len + 1) if bins_by_room[r]), None)
        if room is None:
            blocks.append([])
            b = len(blocks) - 1
        else:
            b = bins_by_room[room].pop()
        blocks[b].extend(docs[i])
        bins_by_room[seq_len - len(blocks[b])].append(b)
    out = torch.full((len(blocks), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    for b, ids in enumerate(blocks):
        out[b, : len(ids)] = torch.tensor(ids)
    return out, truncated


def lm_labels(blocks: torch.Tensor, pad_id: int) -> torch.Tensor:
    return blocks.masked_fill(blocks == pad_id, -100)


def unigram_loss(train: torch.Tensor, held_out: torch.Tensor, pad_id: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model on held-out targets: the floor an LM must beat."""
    vocab = int(max(train.max(), held_out.max())) + 1
    counts = torch.bincount(train[train != pad_id], minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    targets = held_out[:, 1:]  # position 0 is never a target, as in the LM loss
    return -logp[targets[targets != pad_id]].mean().item()


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
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@torch.no_grad()
def eval_loss(engine, blocks: torch.Tensor, pad_id: int, micro: int, n_batches: int, env, device) -> float:
    """Mean LM loss over the first n_batches * micro held-out blocks, sharded over ranks."""
    engine.eval()
    chosen = blocks[: n_batches * micro]
    mine = chosen[env.rank :: env.world_size]
    total, count = 0.0, 0
    for start in range(0, len(mine), micro):
        x = mine[start : start + micro].to(device)
        n_targets = (x[:, 1:] != pad_id).sum().item()  # the loss is a mean over non-pad targets
        total += engine(input_ids=x, labels=lm_labels(x, pad_id)).loss.item() * n_targets
        count += n_targets
    engine.train()
    # Token-weighted over ranks, so the result does not depend on how blocks were sharded.
    return distributed.mean_over_ranks(total) / max(1e-9, distributed.mean_over_ranks(float(count)))


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg)
    env, device, tracker = run.env, run.device, run.tracker
    is_tinyhh = cfg.data.source == "tinyhh"

    # 1. Tokenizer and text: TinyHH's generated corpus, or any text/HH/prompt-completion data through `datasets`.
    if is_tinyhh:
        data_dir = tinyhh_dir(cfg)
        source, fmt = str(data_dir / "corpus.jsonl"), "text"
        tokenizer = models.load_tokenizer(str(data_dir / "tokenizer"))
    else:
        source, fmt = cfg.data.source, cfg.data.format
        tokenizer = models.load_tokenizer(
            cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
        )
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
    train_blocks, truncated = pack(texts, tokenizer, s.seq_len)
    eval_blocks, eval_truncated = pack(eval_texts, tokenizer, s.seq_len)
    if truncated or eval_truncated:
        log.warning(
            "%d train and %d eval documents are longer than stage.seq_len=%d and were truncated",
            truncated,
            eval_truncated,
            s.seq_len,
        )
    pad_id = tokenizer.pad_token_id
    fill = (train_blocks != pad_id).float().mean().item()

    # 2. Derived sizes, computed once and logged.
    accum = distributed.grad_accum_steps(s.batch_size, s.micro_batch_size, env.world_size)
    tokens_per_step = s.batch_size * s.seq_len  # throughput counts block slots, padding included
    epochs = s.steps * s.batch_size / len(train_blocks)
    baseline = unigram_loss(train_blocks, eval_blocks, pad_id)

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
    if cfg.model.lora.enabled:
        lo = cfg.model.lora
        model = models.apply_lora(
            model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=list(lo.target_modules)
        )
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(s.warmup_steps, s.steps, s.min_lr_ratio)
    )
    ds = cfg.deepspeed
    ds_config = distributed.deepspeed_config(
        zero_stage=ds.zero_stage,
        micro_batch_size=s.micro_batch_size,
        grad_accum=accum,
        world_size=env.world_size,
        grad_clip=s.grad_clip,
        dtype=next(model.parameters()).dtype,
        offload_optimizer=ds.offload_optimizer,
        offload_param=ds.offload_param,
        overlap_comm=ds.overlap_comm,
        reduce_bucket_size=ds.reduce_bucket_size,
        extra=dict(ds.extra),
    )
    n_params = models.count_parameters(model)
    engine, optimizer, scheduler = distributed.wrap(model, optimizer, scheduler, ds_config)
    engine.train()
    log.info(
        "%d params | %d train blocks x %d tokens, %.0f%% filled (%.2f epochs) | batch %d = %d micro x %d accum x %d ranks | "
        "unigram baseline %.3f nats",
        n_params,
        len(train_blocks),
        s.seq_len,
        100 * fill,
        epochs,
        s.batch_size,
        s.micro_batch_size,
        accum,
        env.world_size,
        baseline,
    )
    tracker.log(
        {
            "data/train_blocks": len(train_blocks),
            "data/eval_blocks": len(eval_blocks),
            "data/epochs": epochs,
            "data/block_fill": fill,
            "data/truncated_docs": truncated,
            "model/params": n_params,
            "eval/unigram_loss": baseline,
        },
        step=0,
    )

    # 4. The loop. Every step sees one global batch of a seeded per-epoch permutation; rank r takes its own
    #    micro-batches of it, so any world size sees the same data in the same order.
    g = torch.Generator().manual_seed(cfg.seed)
    perm, perm_epoch = torch.randperm(len(train_blocks), generator=g), 0
    bar = tracker.progress(s.steps, "pretrain")
    t_last, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    for step in range(1, s.steps + 1):
        first = (step - 1) * s.batch_size
        epoch = first // len(train_blocks)
        while perm_epoch < epoch:  # epochs roll over lazily; the permutation sequence stays seeded
            perm, perm_epoch = torch.randperm(len(train_blocks), generator=g), perm_epoch + 1
        for m in range(accum):
            offset = first + (m * env.world_size + env.rank) * s.micro_batch_size
            idx = [(offset + i) % len(train_blocks) for i in range(s.micro_batch_size)]
            x = train_blocks[perm[idx]].to(device)
            loss = engine(input_ids=x, labels=lm_labels(x, pad_id)).loss
            engine.backward(loss)
            engine.step()
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)
        if step % s.log_every == 0 or step == s.steps:
            now = time.perf_counter()
            tok_s = tokens_per_step * min(s.log_every, step) / (now - t_last)
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
            t_last, loss_sum, loss_n = time.perf_counter(), 0.0, 0
        if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
            ev = eval_loss(engine, eval_blocks, pad_id, s.micro_batch_size, s.eval_batches, env, device)
            tracker.log({"eval/loss": ev, "eval/loss_vs_unigram": ev / baseline}, step=step)
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if s.checkpoint_every and step % s.checkpoint_every == 0 and step != s.steps:
            save_engine_checkpoint(engine, run.run_dir / "checkpoints", step, {"step": step})
    bar.close()

    # 5. Save: resumable engine state, then the model for the next stage (gathered on rank 0 under ZeRO-3).
    save_engine_checkpoint(engine, run.run_dir / "checkpoints", s.steps, {"step": s.steps})
    state = distributed.full_state_dict(engine)
    if env.is_main:
        save_pretrained(engine.module, tokenizer, run.run_dir / "model", state_dict=state)
        log.info("saved %s", run.run_dir / "model")
    distributed.barrier()

    # 6. TinyHH: judge a sample of the saved base model's answers with the oracle (rank 0; reloads from disk).
    if is_tinyhh and s.sample_eval and env.is_main:
        metrics = sample_eval(
            run.run_dir / "model", data_dir, s.sample_eval, s.max_new_tokens, device, cfg.seed
        )
        tracker.log(metrics, step=s.steps)
        log.info(
            "base model on held-out prompts: %s",
            json.dumps({k: round(v, 3) for k, v in metrics.items() if not k.endswith(("_low", "_high"))}),
        )
    tracker.close()


def sample_eval(model_dir: Path, data_dir: Path, n: int, max_new_tokens: int, device, seed: int) -> dict:
    from alignlab.evaluation.tinyhh import evaluate

    model = models.load_causal_lm(str(model_dir)).to(device)
    tokenizer = models.load_tokenizer(str(model_dir))
    sets = {}
    for name in EVAL_SETS:
        rows = load_rows(str(data_dir / f"{name}.jsonl"))
        sets[name] = rows.select(range(min(n, len(rows)))).to_list()
    torch.manual_seed(seed)
    metrics, samples = evaluate(model, tokenizer, sets, max_new_tokens=max_new_tokens)
    atomic_write_text(model_dir.parent / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    return metrics
