"""stage=sft: supervised fine-tuning with TRL's SFTTrainer on the shared DeepSpeed engine.

Loss: mean NLL over answer tokens only. Prompts (and, by default, every earlier turn) are masked with -100; the
EOS that ends an answer keeps its label even where pad == eos (labels come from masks built by position, see
alignlab/data/examples.py). On TinyHH the run ends by judging the starting model and the fine-tuned one on the
same held-out prompts with the oracle.
"""

from __future__ import annotations

from omegaconf import DictConfig

from alignlab import compute
from alignlab.data.formats import SkipReport, canonicalize
from alignlab.data.loading import load_rows
from alignlab.data.splits import seeded_split
from alignlab.errors import DataError
from alignlab.evaluation.tinyhh import judge_start_end
from alignlab.finetune import finetune
from alignlab.lifecycle import check_init_from, start_run, tinyhh_dir


def load_demonstrations(cfg: DictConfig, data_dir) -> tuple[list[dict], list[dict], str, SkipReport]:
    """(train rows, held-out rows, source, the training split's SkipReport) as canonical prompt/completion rows (HH,
    messages, TRL formats converted); each row's "row" is its row in the source, for messages that name rows."""
    s = cfg.data
    if data_dir is not None:
        source, fmt = str(data_dir / "sft.jsonl"), "prompt_completion"
    else:
        source, fmt = s.source, s.format

    def rows_of(split: str) -> tuple[list[dict], SkipReport]:
        ds = load_rows(source, split)
        if s.max_rows is not None and split == s.train_split:
            ds = ds.select(range(min(s.max_rows, len(ds))))
        ds, report = canonicalize(ds, fmt, "prompt_completion", source=source, on_malformed=s.on_malformed)
        rows = ds.select_columns(["prompt", "completion"]).to_list()
        return [{**r, "row": n} for r, n in zip(rows, report.kept, strict=True)], report

    rows, report = rows_of(s.train_split)
    if s.eval_split:
        return rows, rows_of(s.eval_split)[0][: cfg.stage.eval_rows], source, report
    # never more than a fifth of the data (but one row of a tiny set)
    train, held_out = seeded_split(rows, cfg.stage.eval_rows, cfg.seed, max_share=5, share_floor=1)
    return train, held_out, source, report


def no_demonstrations_error(
    cfg: DictConfig, source: str, report: SkipReport, eval_rows: list[dict]
) -> DataError:
    """The error for an empty training set: rows read, skipped as malformed (and why), held out, and the fix."""
    d = cfg.data
    skipped = report.summary() if report.total else "none skipped as malformed"
    held = (
        f"{len(eval_rows)} held out for the answer-token loss (data.eval_split unset: taken from the training rows)"
        if not d.eval_split
        else f"held-out rows come from data.eval_split={d.eval_split}"
    )
    return DataError(
        f"{source}: no demonstrations left to train on: {report.rows} row(s) read from split {d.train_split}; "
        f"{skipped}; {held}. Give it more (well-formed) data, set data.eval_split to a separate held-out split, "
        "or lower stage.eval_rows"
    )


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    run = start_run(cfg, resumable=True)
    env, tracker = run.env, run.tracker
    model_out = check_init_from(s.init_from, run.run_dir)

    # 1. Demonstrations (TinyHH's, or any prompt/completion, HH or messages data through `datasets`).
    data_dir = tinyhh_dir(cfg) if cfg.data.source == "tinyhh" else None
    train_rows, eval_rows, source, report = load_demonstrations(cfg, data_dir)
    if not train_rows:
        raise no_demonstrations_error(cfg, source, report, eval_rows)

    # 2-5. Tokenize, train on the shared DeepSpeed engine, save model/ (and the engine state in checkpoints/).
    result = finetune(
        run,
        cfg,
        s,
        init_from=s.init_from,
        train_rows=train_rows,
        eval_rows=eval_rows,
        model_out=model_out,
        source=source,
        resume_from=run.resume,
    )
    steps = result["steps"]
    if env.is_main:  # compute.json: the fine-tune's FLOPs (alignlab/compute.py)
        ledger = compute.Ledger()
        ledger.add("train", result["train_flops"], result["train_tokens"])
        compute.write(run.run_dir, "sft", ledger, [s.init_from])

    # 6. TinyHH: the starting and fine-tuned models judged on the same held-out prompts (rank 0; reloaded).
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
            label="sft",
        )
    tracker.close()
