"""stage=rm: a pairwise ranking reward model on the shared DeepSpeed engine.

pairwise: TRL's RewardTrainer, -log sigmoid(r_c - r_r - m) with Llama 2's margin m from the rating level and an
optional centering term. kway: InstructGPT's ranked sets, all untied pairs of a prompt in one batch element
weighted 1/C(K,2), each answer forwarded once (our collator and loss on transformers' Trainer).
The backbone starts from the SFT model; the score is read at the last non-pad token (the answer's EOS).
After training: held-out accuracy (overall, per rating level, against the oracle where known), mean margin,
and the reward normalisation (gain/bias) stored with the model for PPO and rejection sampling.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import Trainer, TrainingArguments
from trl import RewardConfig, RewardTrainer

from alignlab import compute, models
from alignlab.data import chat
from alignlab.data.examples import LengthReport, sequence_ids
from alignlab.data.formats import MalformedRowError
from alignlab.data.loading import load_rows
from alignlab.data.preferences import SUBSETS, in_subset, load_pairs
from alignlab.data.splits import seeded_split
from alignlab.errors import DataError
from alignlab.generation import sample
from alignlab.lifecycle import Run, check_init_from, start_run, tinyhh_dir
from alignlab.rl.ranking import MARGINS, kway_loss, margin_for, ranked_pairs
from alignlab.rl.rewards import Normalization
from alignlab.scoring import save_normalization, score_texts
from alignlab.tensors import pad_sequences
from alignlab.trainer_bridge import (
    CheckpointCallback,
    TrackerCallback,
    save_trainer_model,
    steps_for,
    train_resumable,
    trainer_arguments,
    trainer_tokens,
)

log = logging.getLogger("alignlab.rm")


def check_ranked(row: dict) -> str | None:
    """The problem with one ranked-set row, or None."""
    responses, ranks = row.get("responses"), row.get("ranks")
    if not isinstance(responses, list) or not isinstance(ranks, list) or len(responses) != len(ranks):
        return "responses and ranks must be lists of the same length"
    if any(not isinstance(r, str) or not r.strip() for r in responses):
        return "empty response"
    if len(set(ranks)) < 2:
        return "every response has the same rank (no comparison to learn from)"
    return None


def load_comparisons(cfg: DictConfig, data_dir, split: str) -> tuple[list[dict], str, str]:
    """(rows, source, what was skipped as malformed: "" for nothing): preference rows ({prompt, chosen, rejected,
    rating?, is_safety?, row, ...}; row: the source row) or ranked sets ({prompt, responses, ranks, ...}), filtered
    to stage.subset."""
    s, d = cfg.stage, cfg.data
    kway = s.ranking == "kway"
    if data_dir is not None:
        source, fmt = str(data_dir / ("ranked.jsonl" if kway else "preferences.jsonl")), "preference"
    else:
        source, fmt = d.source, d.format
    max_rows = d.max_rows if split == d.train_split else None
    if not kway:
        rows, skipped = load_pairs(
            source, fmt, split, max_rows=max_rows, on_malformed=d.on_malformed, subset=s.subset
        )
        return rows, source, skipped
    ds = load_rows(source, split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    missing = [c for c in ("prompt", "responses", "ranks") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source}: stage.ranking=kway needs column(s) {missing}; present: {ds.column_names}"
        )
    rows, skipped = [], 0
    for i, row in enumerate(ds.to_list()):
        problem = check_ranked(row)
        if problem and d.on_malformed == "error":
            raise MalformedRowError(source, i, problem)
        skipped += problem is not None
        if problem is None:
            rows.append(row)
    skipped = f"{source}: skipped {skipped} of {len(ds)} malformed ranked sets" if skipped else ""
    if skipped:
        log.warning(skipped)
    return in_subset(rows, s.subset, source), source, skipped


def split_held_out(rows: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) comparisons: n held out, never more than a quarter of the data (but one of a tiny set)."""
    return seeded_split(rows, n, seed, max_share=4, share_floor=1)


def has_rating(row: dict) -> bool:
    """Whether a preference row carries a rating level (a missing column, None or "" is no rating)."""
    return row.get("rating") not in (None, "")


def pair_margins(rows: list[dict], margin_table: str, source: str = "") -> list[float] | None:
    """Llama 2's margin per pair from its rating under stage.margin, 0 for a pair without a rating; None when no
    margins are used (margin=none, or no row has a rating). An unknown rating value is an error naming the row."""
    if margin_table not in MARGINS:
        raise ValueError(f"stage.margin={margin_table!r}; choose one of {', '.join(MARGINS)}")
    if margin_table == "none" or not any(has_rating(r) for r in rows):
        return None
    margins = []
    for i, r in enumerate(rows):
        if not has_rating(r):
            # No rating says nothing about how much better chosen is: the plain loss, -log sigmoid(r_c - r_r).
            margins.append(0.0)
            continue
        try:
            margins.append(margin_for(r["rating"], margin_table))
        except ValueError as e:
            where = f"{source}: row {r['row']}" if "row" in r else f"training pair {i}"  # row: the source row
            raise ValueError(
                f"{where} (prompt {r['prompt'][:60]!r}): {e}; fix the rating, leave it empty (no margin), or set "
                "stage.margin=none"
            ) from None
    return margins


def margin_summary(rated: int, pairs: int, margin_table: str) -> str:
    """The log line saying how many of the training pairs get a margin (rated: pairs with a rating)."""
    if margin_table == "none":
        return "margin=none: training without margins"
    if not rated:
        return f"margin={margin_table}: no pair has a rating: training without margins"
    if rated == pairs:
        return f"margin={margin_table}: all {rated:,} pairs have a rating and get margins"
    return (
        f"margin={margin_table}: {rated:,} of {pairs:,} pairs have a rating and get margins; "
        f"{pairs - rated:,} without one train with margin 0"
    )


def pairwise_examples(
    rows, tokenizer, margin_table: str, report: LengthReport, source: str = ""
) -> tuple[Dataset, int]:
    """chosen_ids / rejected_ids (+ margin) for RewardTrainer, and how many of them have a rating (a margin);
    pairs longer than max_length are dropped, counted."""
    margins = pair_margins(rows, margin_table, source)
    out, rated = [], 0
    for i, r in enumerate(rows):
        chosen, rejected = (
            sequence_ids(tokenizer, r["prompt"], r["chosen"]),
            sequence_ids(tokenizer, r["prompt"], r["rejected"]),
        )
        if report.add(i, max(len(chosen), len(rejected))):
            continue
        ex = {"chosen_ids": chosen, "rejected_ids": rejected}
        if margins is not None:
            ex["margin"] = margins[i]
        out.append(ex)
        rated += has_rating(r)
    return Dataset.from_list(out), rated


def kway_examples(rows, tokenizer, report: LengthReport) -> Dataset:
    out = []
    for i, r in enumerate(rows):
        seqs = [sequence_ids(tokenizer, r["prompt"], x) for x in r["responses"]]
        if report.add(i, max(len(x) for x in seqs)):
            continue
        out.append({"sequences": seqs, "ranks": list(r["ranks"])})
    return Dataset.from_list(out)


class KWayCollator:
    """Ranked sets -> every answer once: input_ids/attention_mask [N, T]; labels [N, 2] = (set index, rank)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for g, ex in enumerate(examples):
            seqs += ex["sequences"]
            labels += [(g, rank) for rank in ex["ranks"]]
        ids, mask = pad_sequences(seqs, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}


def kway_trainer_loss(center_coef: float):
    def loss(outputs, labels, num_items_in_batch=None):
        return kway_loss(outputs.logits.squeeze(-1).float(), labels[:, 0], labels[:, 1], center_coef)

    return loss


@torch.no_grad()
def score_pairs(
    model, tokenizer, rows: list[dict], device, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) [len(rows)] for preference rows."""
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    responses = [r[k] for r in rows for k in ("chosen", "rejected")]
    flat = score_texts(model, tokenizer, prompts, responses, device, batch_size)
    return flat[0::2], flat[1::2]


def accuracy_metrics(rows: list[dict], r_c: torch.Tensor, r_r: torch.Tensor) -> dict[str, float]:
    """rm/accuracy, rm/mean_margin, per rating level, and against the oracle where label noise is marked."""
    right = (r_c > r_r).float()
    m = {
        "rm/accuracy": right.mean().item(),
        "rm/mean_margin": (r_c - r_r).mean().item(),
        "rm/eval_pairs": len(rows),
    }
    by_level = defaultdict(list)
    for row, ok in zip(rows, right.tolist(), strict=True):
        if has_rating(row):
            by_level[row["rating"]].append(ok)
    for level, oks in by_level.items():
        m[f"rm/accuracy_{level.replace(' ', '_')}"] = sum(oks) / len(oks)
    if rows and "label_flipped" in rows[0]:
        flipped = torch.tensor([bool(r["label_flipped"]) for r in rows])
        m["rm/accuracy_vs_oracle"] = torch.where(flipped, 1 - right, right).mean().item()
    return m


def no_comparisons_error(cfg: DictConfig, source: str, read: int, skipped: str, held_out: int) -> DataError:
    """The error for an empty training set: rows read, skipped as malformed (and why), held out, and the fix."""
    s, d = cfg.stage, cfg.data
    held = (
        f"{held_out} held out for accuracy (data.eval_split unset: taken from the training rows)"
        if not d.eval_split
        else f"held-out pairs come from data.eval_split={d.eval_split}"
    )
    return DataError(
        f"{source}: no training comparisons: {read} usable row(s) read from split {d.train_split} "
        f"(stage.subset={s.subset}){'; ' + skipped if skipped else ''}; {held}. Give it more data, set "
        "data.eval_split to a separate held-out split, or lower stage.eval_rows"
    )


def comparisons(cfg: DictConfig, data_dir) -> tuple[list[dict], list[dict], str]:
    """(training rows, held-out preference pairs, source): the held-out pairs from data.eval_split, or from
    TinyHH's pairwise preferences (kway trains on ranked sets), or held out from the training rows."""
    s, d = cfg.stage, cfg.data
    rows, source, skipped = load_comparisons(cfg, data_dir, d.train_split)
    read = len(rows)
    if d.eval_split:
        held_out = load_comparisons(cfg, data_dir, d.eval_split)[0]
    elif (
        s.ranking == "kway" and data_dir is not None
    ):  # TinyHH: ranked sets train, the pairwise preferences evaluate
        held_out = split_held_out(tinyhh_pairs(data_dir, s.subset), s.eval_rows, cfg.seed)[1]
    else:
        rows, held_out = split_held_out(rows, s.eval_rows, cfg.seed)
    if not rows:
        raise no_comparisons_error(cfg, source, read, skipped, 0 if d.eval_split else read - len(rows))
    return rows, as_pairs(held_out)[: s.eval_rows], source


def training_examples(
    rows: list[dict], tokenizer, s: DictConfig, source: str
) -> tuple[Dataset, int, int, LengthReport]:
    """(examples, comparisons, pairs with a margin, the length report): ranked sets or pairs, overlong rows dropped."""
    lengths = LengthReport(s.max_length)
    if s.ranking == "kway":
        train, rated = kway_examples(rows, tokenizer, lengths), 0
        comparisons = sum(len(ranked_pairs(r)) for r in train["ranks"])
    else:
        train, rated = pairwise_examples(rows, tokenizer, s.margin, lengths, source)
        comparisons = len(train)
        log.info(margin_summary(rated, len(train), s.margin))
    if lengths.too_long:
        log.warning(lengths.summary(source, "dropped"))
    if len(train) == 0:
        raise ValueError(f"{source}: every row is longer than stage.max_length={s.max_length}")
    # training pairs with a Llama 2 margin from their rating (the rest train with margin 0)
    return train, comparisons, rated if "margin" in train.column_names else 0, lengths


def reward_model(cfg: DictConfig, tokenizer):
    """The score head on the SFT backbone, LoRA adapters on it when model.lora.enabled."""
    model = models.load_reward_model(
        cfg.stage.init_from,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.use_cache = False
    if cfg.model.lora.enabled:
        lo = cfg.model.lora
        model = models.apply_lora(
            model,
            r=lo.r,
            alpha=lo.alpha,
            dropout=lo.dropout,
            target_modules=lo.target_modules,
            task_type="SEQ_CLS",
        )
    return model


def reward_trainer(
    cfg: DictConfig, run: Run, model, tokenizer, train: Dataset, steps: int
) -> tuple[Trainer, CheckpointCallback]:
    """TRL's RewardTrainer (pairwise) or transformers' Trainer with our k-way loss, on the DeepSpeed engine."""
    s = cfg.stage
    common = dict(
        run=run,
        ds_cfg=cfg.deepspeed,
        stage=s,
        steps=steps,
        dtype=next(model.parameters()).dtype,
        seed=cfg.seed,
        with_eval=False,
        show_progress=cfg.logger.progress,
    )
    callbacks = [TrackerCallback(run.tracker), saving := CheckpointCallback(run)]
    if s.ranking == "kway":
        trainer = Trainer(
            model=model,
            args=trainer_arguments(TrainingArguments, remove_unused_columns=False, **common),
            train_dataset=train,
            data_collator=KWayCollator(tokenizer.pad_token_id),
            compute_loss_func=kway_trainer_loss(s.center_coef),
            callbacks=callbacks,
        )
    else:
        args = trainer_arguments(
            RewardConfig,
            max_length=None,
            center_rewards_coefficient=s.center_coef or None,
            dataset_num_proc=None,
            **common,
        )
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=callbacks
        )
    return trainer, saving


def held_out_metrics(
    cfg: DictConfig, model_out, tokenizer, data_dir, rows, held_out, device, ledger: compute.Ledger
) -> dict[str, float]:
    """On the reloaded model (rank 0): held-out accuracy, then the normalisation PPO will apply (saved with it;
    its sampling and scoring are part of the stage's compute, added to ledger)."""
    s = cfg.stage
    rm = models.load_reward_model(str(model_out)).to(device).eval()
    metrics = {}
    if held_out:
        r_c, r_r = score_pairs(rm, tokenizer, held_out, device)
        metrics = accuracy_metrics(held_out, r_c, r_r)
        log.info("held-out: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if s.normalize_samples:
        norm = fit_normalization(cfg, rm, tokenizer, data_dir, rows, device, ledger)
        save_normalization(norm, model_out)
        metrics.update(
            {
                "rm/norm_gain": norm.gain,
                "rm/norm_bias": norm.bias,
                "rm/raw_mean": norm.mean,
                "rm/raw_std": norm.std,
            }
        )
        log.info(
            "normalisation on %d SFT samples: raw mean %.3f std %.3f -> gain %.3f bias %.3f",
            norm.fitted_on,
            norm.mean,
            norm.std,
            norm.gain,
            norm.bias,
        )
    return metrics


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, tracker = run.env, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)

    # 1. Comparisons: preference pairs (or ranked sets), held-out pairs for evaluation; overlong rows dropped.
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    rows, held_out, source = comparisons(cfg, data_dir)
    tokenizer = models.load_tokenizer(
        cfg.model.tokenizer or s.init_from, trust_remote_code=cfg.model.trust_remote_code
    )
    chat.use(tokenizer, cfg.data.chat_template)  # conversations in the model's chat format (recorded with it)
    train, comparisons_n, with_margin, lengths = training_examples(rows, tokenizer, s, source)
    held_out = drop_long_pairs(held_out, tokenizer, s.max_length)

    # 2. Derived sizes, computed once and logged.
    steps = steps_for(s, len(train))

    # 3. Reward model (score head on the SFT backbone), LoRA optional, and the trainer on the DeepSpeed engine.
    model = reward_model(cfg, tokenizer)
    n_params, n_trainable = models.count_parameters(model), models.count_parameters(model, trainable=True)
    trainer, saving = reward_trainer(cfg, run, model, tokenizer, train, steps)
    log.info(
        "%d params | %s: %d training rows (%d comparisons, %d dropped as too long) from %s, subset=%s, margin=%s | "
        "%d held-out pairs | %d steps of %d (%.2f epochs)",
        n_params,
        s.ranking,
        len(train),
        comparisons_n,
        lengths.too_long,
        source,
        s.subset,
        "none" if s.ranking == "kway" else s.margin,
        len(held_out),
        steps,
        s.batch_size,
        steps * s.batch_size / len(train),
    )
    tracker.log(
        {
            "data/train_rows": len(train),
            "data/comparisons": comparisons_n,
            "data/dropped_too_long": lengths.too_long,
            "data/eval_pairs": len(held_out),
            "data/epochs": steps * s.batch_size / len(train),
            "data/pairs_with_margin": with_margin,
        },
        step=0,
    )

    # 4. Train (from the checkpoint under resume=auto; a signal checkpoints and stops the stage).
    train_resumable(trainer, run, saving, run.resume)
    ledger = (
        compute.Ledger()
    )  # compute.json (alignlab/compute.py): both answers of a pair are trained positions
    ledger.train("train", n_params, n_trainable, trainer_tokens(trainer))

    # 5. Save: resumable engine state, then the reward model (the PPO critic and scorers start from it).
    save_trainer_model(trainer, tokenizer, model_out, env, steps)

    # 6. Rank 0, on the reloaded model: held-out accuracy, then the normalisation PPO will apply.
    if env.is_main:
        metrics = held_out_metrics(cfg, model_out, tokenizer, data_dir, rows, held_out, run.device, ledger)
        tracker.log(metrics, step=steps)
        compute.write(run.run_dir, "rm", ledger, [s.init_from])
    tracker.close()


def tinyhh_pairs(data_dir, subset: str) -> list[dict]:
    rows = load_rows(str(data_dir / "preferences.jsonl")).to_list()
    return [r for r in rows if SUBSETS[subset] is None or bool(r["is_safety"]) == SUBSETS[subset]]


def as_pairs(rows: list[dict]) -> list[dict]:
    """Preference rows as they are; ranked sets as their untied (better, worse) pairs."""
    out = []
    for r in rows:
        if "responses" not in r:
            out.append(r)
            continue
        for i, j in ranked_pairs(r["ranks"]):
            out.append({"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]})
    return out


def drop_long_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    report, kept = LengthReport(max_length), []
    for i, r in enumerate(rows):
        n = max(len(sequence_ids(tokenizer, r["prompt"], r[k])) for k in ("chosen", "rejected"))
        if not report.add(i, n):
            kept.append(r)
    if report.too_long:
        log.warning(report.summary("held-out pairs", "left out of the evaluation"))
    return kept


def fit_normalization(
    cfg, rm, tokenizer, data_dir, rows: list[dict], device, ledger: compute.Ledger | None = None
) -> Normalization:
    """Gain/bias so the starting (SFT) policy's own answers to RL prompts score mean 0, std 1. ledger: gets the
    sampling's policy positions and their scoring (the same positions through the reward model)."""
    s = cfg.stage
    if data_dir is not None:
        prompt_rows = load_rows(str(data_dir / "rl_prompts.jsonl")).to_list()
        wanted = SUBSETS[s.subset]
        prompts = [r["prompt"] for r in prompt_rows if wanted is None or bool(r["is_safety"]) == wanted]
    else:
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    prompts = prompts[: s.normalize_samples]
    policy = models.load_causal_lm(s.init_from).to(device)
    torch.manual_seed(cfg.seed)
    tokens: list[int] = []
    answers = sample(policy, tokenizer, prompts, max_new_tokens=s.normalize_max_new_tokens, tokens=tokens)
    answers = [a if a.strip() else " " for a in answers]
    if ledger is not None:
        ledger.forward("normalize_sample", models.count_parameters(policy), sum(tokens))
        ledger.forward("normalize_score", models.count_parameters(rm), sum(tokens))
    return Normalization.fit(score_texts(rm, tokenizer, prompts, answers, device))
