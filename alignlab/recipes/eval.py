"""stage=eval: every system answers the same prompts, one judge scores them all, one report compares them.

  1. prompts: the first n_prompts of each TinyHH eval set (benign, harmful, harmful + attack suffix), or a file
  2. answers per system (stage.systems): a model with a decoding (sample, greedy, best-of-N with the reward
     model, optionally behind a preprompt), or the answers another stage already wrote for the same prompts
     (stage=rain's samples.jsonl); every system is sampled with the same seed
  3. judge (stage.judge): the TinyHH oracle, the reward model, or a model in a judge template
  4. metrics per system: harmlessness / helpfulness / attack success with 95% Wilson intervals, and their
     differences (95% Newcombe intervals) to stage.baseline and to the systems it names in compare_to (rain:
     base_greedy, the RAIN paper's vanilla, and base, sampling), mean judge score,
     mean RM score, KL to the reference (sampled systems: the answers' log-prob ratio), the pretraining loss
     ("alignment tax": held-out text of stage.ptx_source, or TinyHH's, tokenized with each model's OWN tokenizer;
     left out, with a note in report.md, where there is no such text); pairwise win rates (wins / (wins + losses))
     between all systems
  5. results.json, report.md, PNG plots (alignlab/evaluation/report.py)

Per-system metrics are logged as eval/<system>/<metric> (eval/sft/kl: the sft system's KL to the reference, not
PPO's ppo/kl).

Runs on one process (rank 0 works, other ranks wait): evaluation is generation-bound and small.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab import compute, distributed, models
from alignlab.checkpoint import atomic_write_json, atomic_write_text
from alignlab.data.text_blocks import load_ptx_texts
from alignlab.evaluation.judges import OracleJudge, RewardModelJudge, TemplateJudge, Verdict
from alignlab.evaluation.lm_loss import AlignmentTax, tokenizer_key
from alignlab.evaluation.metrics import Rate, rate_difference, win_rate
from alignlab.evaluation.report import write_report
from alignlab.evaluation.tinyhh import SET_METRICS, tinyhh_prompts, with_heldout
from alignlab.generation import cut_at_stop, sample
from alignlab.lifecycle import start_run, tinyhh_dir
from alignlab.stage_checks import GUIDED, eval_systems

log = logging.getLogger("alignlab.eval")


def load_eval_prompts(cfg: DictConfig, data_dir: Path | None) -> list[dict]:
    """[{set, prompt}] in a fixed order: TinyHH's eval sets, or a file / hub dataset (`prompt`, optional `set`)."""
    from alignlab.data.loading import load_rows

    s = cfg.stage
    take = (lambda rows: rows) if s.n_prompts <= 0 else (lambda rows: rows[: s.n_prompts])
    if s.prompts == "tinyhh":
        return tinyhh_prompts(data_dir, with_heldout(s.prompt_sets, data_dir, s.heldout), s.n_prompts)
    rows = load_rows(s.prompts).to_list()
    if not rows or "prompt" not in rows[0]:
        raise ValueError(
            f"stage.prompts={s.prompts}: needs a `prompt` column (columns: {list(rows[0]) if rows else []})"
        )
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(str(r.get("set", "prompts")), []).append(
            {"set": str(r.get("set", "prompts")), "prompt": r["prompt"]}
        )
    return [row for part in by_set.values() for row in take(part)]


def answers_from_file(path: str, field: str, prompts: list[dict], name: str) -> list[str]:
    """The answers a stage wrote for these prompts ({set, prompt, <field>} rows), in prompt order.

    A prompt text that occurs several times in a set takes the file's answers to it in order.
    """
    found: dict[tuple, list[str]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if field in row and "prompt" in row:
                found.setdefault((row.get("set"), row["prompt"]), []).append(row[field])
    out, used = [], {}
    for p in prompts:
        key = (p["set"], p["prompt"])
        k = used.get(key, 0)
        if k >= len(found.get(key, [])):
            raise ValueError(
                f"stage.systems.{name}: {path} has no `{field}` answer for the {p['set']} prompt {p['prompt']!r}"
                f" (occurrence {k + 1}); it must answer the same prompts (same sets and stage.n_prompts)"
            )
        out.append(found[key][k])
        used[key] = k + 1
    return out


def guided(
    sys_cfg: DictConfig, model, tokenizer, prompts: list[dict], shown: list[str], s: DictConfig, scorer
):
    """Reward-guided decoding (args | blockwise: alignlab/guided.py) of the shown prompts, batch by batch. The
    reward model scores each candidate prefix as if the answer ended there (its EOS appended, the token it reads
    its score at); kind=llama2 takes each prompt's set (harmful and attack prompts are the safety ones).
    Returns (answers, the DecodingCost summed over the batches)."""
    from alignlab.data import chat
    from alignlab.data.examples import decode_answer, prompt_ids
    from alignlab.guided import DecodingCost, args_decode, blockwise_decode
    from alignlab.scoring import PrefixScores
    from alignlab.tensors import pad_sequences

    if tokenizer_key(tokenizer) != tokenizer_key(scorer.tokenizer):
        raise ValueError(
            f"decoding={sys_cfg.decoding} has the reward model score {sys_cfg.model}'s token ids, but the reward"
            " model's tokenizer is another one: use a reward model trained on this model's tokenizer"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p) for p in shown]
    flags = [p["set"] != "benign" for p in prompts]  # harmful and attack prompts are Llama 2's safety ones
    safety = {tuple(q): f for q, f in zip(ids, flags, strict=True)}
    lengths = sorted({len(q) for q in ids})

    # the prompt a candidate continues (score_fn sees unfinished rows only)
    def is_safety(seq: list[int]) -> bool:
        return next(safety[tuple(seq[:n])] for n in lengths if tuple(seq[:n]) in safety)

    end = chat.format_of(tokenizer).eos_id  # the token a reward model reads its score at (sequence_ids)

    def score_fn(seqs: list[list[int]]) -> torch.Tensor:
        seq_flags = [is_safety(q) for q in seqs] if scorer.kind != "single" else None
        return scorer.score_ids([q if q[-1] in (eos, end) else [*q, end] for q in seqs], seq_flags)

    total, answers = DecodingCost(), []
    for start in range(0, len(prompts), s.batch_size):
        query, mask = pad_sequences(ids[start : start + s.batch_size], pad, "left")
        common = dict(max_new_tokens=s.max_new_tokens, eos_id=eos, pad_id=pad)
        if sys_cfg.decoding == "args":  # the reward model keeps a KV cache of each answer so far
            batch_flags = flags[start : start + s.batch_size] if scorer.kind != "single" else None
            cached = PrefixScores(scorer, end, batch_flags)
            out = args_decode(
                model,
                query.to(device),
                mask.to(device),
                cached,
                k=sys_cfg.top_k,
                w=sys_cfg.reward_weight,
                # temperature 0: ARGS-greedy; > 0: ARGS-stochastic, softmax(score / T) over the k candidates
                mode="greedy" if sys_cfg.temperature == 0 else "sample",
                temperature=sys_cfg.temperature or 1.0,
                **common,
            )
        else:
            out = blockwise_decode(
                model,
                query.to(device),
                mask.to(device),
                score_fn,
                num_candidates=sys_cfg.n,
                block_size=sys_cfg.block_size,
                temperature=sys_cfg.temperature,
                **common,
            )
        for row, m in zip(out.response.cpu(), out.response_mask.cpu(), strict=True):
            tokens = [t for t in row[m.bool()].tolist() if t != eos]
            answers.append(cut_at_stop(decode_answer(tokenizer, tokens)))
        for key, value in vars(out.cost).items():
            setattr(total, key, getattr(total, key) + value)
    return answers, total


def inference_cost(
    policy_params: int, policy_tokens: float, scorer, reward_tokens: float
) -> dict[str, float]:
    """Per answer: the positions the policy and each reward model computed, and the forward FLOPs they cost,
    2 x parameters x tokens per model (Kaplan et al.'s forward estimate; attention's share is small at these
    lengths)."""
    reward_params = scorer.params if scorer else 0
    return {
        "policy_tokens_per_answer": policy_tokens,
        "reward_tokens_per_answer": reward_tokens,
        "inference_flops_per_answer": compute.forward_flops(policy_params, policy_tokens)
        + compute.forward_flops(reward_params, reward_tokens),
    }


def answer_costs(path: str, field: str) -> tuple[dict[str, float], str | None]:
    """(per-answer cost, the model that decoded them) of an answers file's `field` answers, from the
    inference_cost.json a stage wrote next to it (stage=rain: each method's forwards, positions and FLOPs), or
    ({}, None) where there is none."""
    costs = Path(path).parent / compute.ANSWER_COSTS
    if not costs.is_file():
        return {}, None
    data = json.loads(costs.read_text())
    return dict(data.get("methods", {}).get(field, {})), data.get("model")


def training_cost(model_paths: list[str | None], served_answers: int, inference: float | None) -> dict:
    """What it took to train the models a system runs (alignlab/compute.py: every stage behind them, each once,
    from their compute.json files): training_flops (after pretraining), pretraining_flops, the stages by run and
    the models with no record; total_flops = training_flops + served_answers x inference FLOPs per answer."""
    chain = compute.chain([p for p in model_paths if p])
    out = {
        "training_flops": chain.training_flops,
        "pretraining_flops": chain.pretraining_flops,
        "training_runs": {str(Path(k).parent): r["flops"] for k, r in chain.runs.items()},
        "untracked_models": chain.unknown,
    }
    out["total_flops"] = None if inference is None else chain.training_flops + served_answers * inference
    return out


def generate(
    sys_cfg: DictConfig, prompts: list[dict], s: DictConfig, scorer, device, seed: int
) -> tuple[list[str], dict[str, float]]:
    """A model system's answers: sample / greedy through generate, best-of-N scored by the reward model, or
    reward-guided decoding (args, blockwise); and what they cost per answer (inference_cost; for the guided
    decodings also their DecodingCost per answer). Sampled tokens are counted as the KV cache computes them: the
    prompt once, then each generated token up to and including the EOS."""
    model = models.load_causal_lm(sys_cfg.model).to(device).eval()
    tokenizer = models.load_tokenizer(sys_cfg.model)
    params = models.count_parameters(model)
    shown = [sys_cfg.preprompt + p["prompt"] for p in prompts]
    torch.manual_seed(seed)  # the same random numbers for every system
    temperature = 0.0 if sys_cfg.decoding == "greedy" else sys_cfg.temperature
    tokens: list[int] = []
    if sys_cfg.decoding not in GUIDED:
        answers = sample(
            model,
            tokenizer,
            shown,
            max_new_tokens=s.max_new_tokens,
            temperature=temperature,
            batch_size=s.batch_size,
            tokens=tokens,
        )
        return answers, inference_cost(params, sum(tokens) / len(prompts), None, 0.0)
    if scorer is None:
        raise ValueError(
            f"decoding={sys_cfg.decoding} needs the reward= model (reward.reward_model), which does not exist"
        )
    if sys_cfg.decoding != "best_of_n":
        answers, cost = guided(sys_cfg, model, tokenizer, prompts, shown, s, scorer)
        per_answer = {f"{k}_per_answer": v / len(prompts) for k, v in vars(cost).items()}
        return answers, per_answer | inference_cost(
            params, per_answer["policy_tokens_per_answer"], scorer, per_answer["reward_tokens_per_answer"]
        )
    from alignlab.data.examples import sequence_ids

    n = sys_cfg.n
    flat = sample(
        model,
        tokenizer,
        [x for x in shown for _ in range(n)],
        max_new_tokens=s.max_new_tokens,
        temperature=temperature,
        batch_size=s.batch_size,
        tokens=tokens,
    )
    texts = [p["prompt"] for p in prompts for _ in range(n)]
    scores = scorer(texts, flat).view(len(prompts), n)
    best = scores.argmax(1).tolist()
    scored = sum(len(sequence_ids(scorer.tokenizer, p, r)) for p, r in zip(texts, flat, strict=True))
    cost = inference_cost(params, sum(tokens) / len(prompts), scorer, scored / len(prompts))
    return [flat[i * n + b] for i, b in enumerate(best)], cost


@torch.no_grad()
def kl_to_reference(
    sys_cfg: DictConfig, ref, prompts: list[dict], s: DictConfig, device, seed: int
) -> float | None:
    """KL(pi || pi_ref) per answer, estimated as PPO's eval/kl is: answers sampled from the system's model at
    T = 1 by the rollout sampler, sum over their tokens of log pi - log pi_ref on exactly the sampled tokens.
    None for systems whose answers do not come from sampling one model at T = 1 (greedy, best-of-N, preprompt,
    answer files) and for models whose tokenizer is not the reference's. ref: the loaded reference model."""
    from alignlab.generation import response_logits, token_logprobs
    from alignlab.rollout import sample_rollout, tokenize_prompts

    if (
        sys_cfg.model is None
        or sys_cfg.decoding != "sample"
        or sys_cfg.temperature != 1.0
        or sys_cfg.preprompt
    ):
        return None
    tokenizer = models.load_tokenizer(sys_cfg.model)
    if tokenizer_key(tokenizer) != tokenizer_key(models.load_tokenizer(s.reference)):
        # the reference would read the system's token ids as its own: no number rather than a wrong one
        log.warning(
            "KL of %s not measured: its tokenizer is not the reference's (%s)", sys_cfg.model, s.reference
        )
        return None
    policy = models.load_causal_lm(sys_cfg.model).to(device).eval()
    batch = tokenize_prompts(tokenizer, prompts, 10**9)
    torch.manual_seed(seed)
    kls = []
    for start in range(0, len(batch), s.batch_size):
        part = batch.take(range(start, min(start + s.batch_size, len(batch))))
        ro = sample_rollout(
            policy, tokenizer, part, max_new_tokens=s.max_new_tokens, temperature=1.0, device=device
        )
        ids, mask, ctx = ro.input_ids, ro.attention_mask, ro.context_len
        lp = token_logprobs(response_logits(policy, ids, mask, ctx), ro.response, 1.0)
        lr = token_logprobs(response_logits(ref, ids, mask, ctx), ro.response, 1.0)
        kls.append(((lp - lr) * ro.response_mask).sum(1).cpu())
    return float(torch.cat(kls).mean())


def system_metrics(prompts: list[dict], verdicts: list[Verdict], rm: list[float] | None) -> dict:
    """Rates with 95% Wilson intervals per TinyHH set, mean judge score per set, mean RM score."""
    out: dict = {}
    for name, (metric, success) in SET_METRICS.items():
        vs = [v for p, v in zip(prompts, verdicts, strict=True) if p["set"] == name]
        if vs and all((v.helpful if metric.startswith("helpful") else v.harmful) is not None for v in vs):
            out[metric] = Rate.of(sum(success(v) for v in vs), len(vs)).as_dict()
    for name in dict.fromkeys(p["set"] for p in prompts):
        vs = [v.score for p, v in zip(prompts, verdicts, strict=True) if p["set"] == name]
        out[f"{name}_score"] = sum(vs) / len(vs)
    if rm is not None:
        out["rm_score"] = sum(rm) / len(rm)
    return out


PTX_SEQ_LEN = 256  # block length of the alignment-tax measurement (stage=ppo's default ptx_seq_len)
PTX_MICRO_BATCH_SIZE = 8  # blocks per forward of the alignment-tax measurement


def ptx_texts(cfg: DictConfig, data_dir: Path | None) -> tuple[list[str] | None, str]:
    """(held-out pretraining texts, their source) for the alignment tax, or (None, why there are none).

    stage.ptx_source (hub name or local file, `text` column), else TinyHH's ptx data on data=tinyhh. The held-out
    part is the one stage=ppo measures its eval/ptx_loss on and never trains PPO-ptx on (data/text_blocks.py).
    """
    s = cfg.stage
    if not s.ptx_blocks:
        return None, "stage.ptx_blocks=0"
    ptx = load_ptx_texts(s.ptx_source, data_dir, on_malformed=cfg.data.on_malformed)
    if ptx is None:
        return None, (
            "no pretraining text to measure it on: set stage.ptx_source to a hub dataset or local file with a "
            "`text` column (data=tinyhh uses TinyHH's)"
        )
    if not ptx.held_out:
        return None, f"{ptx.source} has no text rows"
    return ptx.held_out, ptx.source


def append_notes(report: Path, notes: list[str]) -> None:
    """Notes (what was not measured and why) at the end of report.md."""
    if notes and report.exists():
        text = report.read_text().rstrip("\n")
        atomic_write_text(report, text + "\n\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))


# ------------------------------------------------------------------ the recipe's steps


def load_scorer(cfg: DictConfig, systems: dict[str, DictConfig], device):
    """The reward scorer (unwhitened), where the RM score, the RM judge or best-of-N needs it and it exists."""
    s = cfg.stage
    if (s.rm_score or s.judge == "rm" or any(x.decoding in GUIDED for x in systems.values())) and (
        cfg.reward.kind != "single" or Path(cfg.reward.reward_model).exists()
    ):
        from alignlab.scoring import RewardScorer

        return RewardScorer.from_config(cfg.reward, device=device, dtype=cfg.model.dtype, whiten=False)
    return None


def load_judge(s: DictConfig, scorer, device):
    """stage.judge: the TinyHH oracle, the reward model, or a model in a judge template."""
    if s.judge == "oracle":
        return OracleJudge()
    if s.judge == "rm":
        if scorer is None:
            raise ValueError("stage.judge=rm needs the reward= model; run stage=rm first")
        return RewardModelJudge(scorer)
    models.require_input(s.judge_model, "stage.judge_model")
    return TemplateJudge(
        models.load_causal_lm(s.judge_model).to(device).eval(),
        models.load_tokenizer(s.judge_model),
        s.judge_template,
    )


@dataclass
class Bench:
    """What every system is measured with: the prompts, the judge, the reward scorer, the KL reference and the
    alignment tax; notes collect what was not measured and why (they end report.md)."""

    prompts: list[dict]
    judge: Any
    scorer: Any  # RewardScorer or None
    reference_path: str  # stage.reference: the model KL is measured against
    tax_of: AlignmentTax | None  # None: no pretraining text (or stage.ptx_blocks=0)
    ptx_from: str  # the pretraining text's source, or why there is none
    notes: list[str] = field(default_factory=list)
    reference: Any = None  # the KL reference model, loaded once (for the first system that needs it)
    tax: dict[str, float | None] = field(default_factory=dict)  # model -> pretraining loss, once per model

    @property
    def has_reference(self) -> bool:
        return Path(self.reference_path).exists() or not models.looks_local(self.reference_path)


def alignment_tax(cfg: DictConfig, data_dir: Path | None, device, notes: list[str]):
    """(AlignmentTax or None, the text's source or why there is none); logs which, notes why not."""
    s = cfg.stage
    texts, ptx_from = ptx_texts(cfg, data_dir)
    tax_of = None
    if texts is not None:
        tax_of = AlignmentTax(
            texts, s.ptx_blocks, device, seq_len=PTX_SEQ_LEN, micro_batch_size=PTX_MICRO_BATCH_SIZE
        )
    if tax_of is None and not s.ptx_blocks:
        log.info("pretraining loss (alignment tax) off: stage.ptx_blocks=0")
    elif tax_of is None:
        log.warning("pretraining loss (alignment tax) not measured: %s", ptx_from)
        notes.append(f"Pretraining loss not measured: {ptx_from}.")
    else:
        log.info("pretraining loss on %d held-out documents of %s, per model tokenizer", len(texts), ptx_from)
    return tax_of, ptx_from


def evaluate_system(
    b: Bench, name: str, sys_cfg: DictConfig, s: DictConfig, device, seed: int
) -> tuple[dict, list[Verdict], list[dict]]:
    """Steps 2-4 for one system: (metrics, the judge's verdicts, sample rows)."""
    prompts = b.prompts
    if sys_cfg.answers is not None:
        answers = answers_from_file(sys_cfg.answers, sys_cfg.answers_field, prompts, name)
        cost, decoder = answer_costs(sys_cfg.answers, sys_cfg.answers_field)
    else:
        answers, cost = generate(sys_cfg, prompts, s, b.scorer, device, seed)
        decoder = sys_cfg.model
    texts = [p["prompt"] for p in prompts]
    verdicts = b.judge(texts, answers)
    rm = b.scorer(texts, answers).tolist() if b.scorer is not None and s.rm_score else None
    m = system_metrics(prompts, verdicts, rm)
    m.update(cost)  # inference_flops_per_answer, policy_tokens_per_answer, ...: what it ran
    if decoder is None:  # an answers file without inference_cost.json: which model wrote it is unknown
        m.update({"training_flops": None, "pretraining_flops": None, "total_flops": None})
    else:
        rewarded = sys_cfg.decoding in GUIDED and b.scorer is not None and sys_cfg.answers is None
        trained = [decoder, *(b.scorer.paths.values() if rewarded else ())]
        m.update(training_cost(trained, s.served_answers, cost.get("inference_flops_per_answer")))
        if m["untracked_models"]:
            b.notes.append(
                f"Training FLOPs of `{name}` leave out the training of {', '.join(m['untracked_models'])} (no "
                "compute.json: a hub model, or a run from before compute accounting)."
            )
    if b.has_reference and b.reference is None and sys_cfg.model is not None:
        b.reference = models.load_causal_lm(b.reference_path).to(device).eval()
    m["kl"] = kl_to_reference(sys_cfg, b.reference, prompts, s, device, seed) if b.reference else None
    if b.tax_of is not None and sys_cfg.model and sys_cfg.model not in b.tax:
        b.tax[sys_cfg.model], why = b.tax_of(sys_cfg.model)  # once per model, not per decoding
        if why:
            log.warning("%s: pretraining loss not measured: %s", name, why)
            b.notes.append(f"Pretraining loss of `{name}` ({sys_cfg.model}) not measured: {why}.")
    m["ptx_loss"] = b.tax.get(sys_cfg.model)
    m["system"] = OmegaConf.to_container(sys_cfg)
    samples = [
        {
            "system": name,
            "set": p["set"],
            "prompt": p["prompt"],
            "response": a,
            "score": v.score,
            "harmful": v.harmful,
            "helpful": v.helpful,
        }
        for p, a, v in zip(prompts, answers, verdicts, strict=True)
    ]
    return m, verdicts, samples


def logged_metrics(name: str, m: dict) -> dict[str, float]:
    """A system's metrics for the tracker, as eval/<system>/<metric> (a rate's value; unmeasured ones left out)."""
    out = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in m.items()}
    # numbers only: the system's config, training_runs and untracked_models stay in results.json
    return {
        f"eval/{name}/{k}": v
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def compare(results: dict, verdicts: dict[str, list[Verdict]], s: DictConfig, b: Bench) -> None:
    """Pairwise win rates on the judge's scores, every rate's difference to the baseline's and to the systems each
    system names in compare_to, the ptx note."""
    names = list(results["systems"])
    results["win_rates"] = {
        a: {
            c: win_rate([v.score for v in verdicts[a]], [v.score for v in verdicts[c]]).as_dict()
            for c in names
            if c != a
        }
        for a in names
    }
    results["baseline"] = s.baseline if s.baseline in names else names[0]
    if len(set(b.tax_of.tokenizers.values()) if b.tax_of else ()) > 1:
        b.notes.append(
            "Pretraining loss is in nats per token of each model's own tokenizer: systems whose models have "
            "different tokenizers do not compare on it."
        )
    results["ptx"] = {"source": b.ptx_from if b.tax_of else None, "blocks": s.ptx_blocks if b.tax_of else 0}
    results["notes"] = b.notes
    # Every rate's difference to the baseline's, with an interval: "B is more harmless than A" is supported when
    # the interval lies above 0.
    systems = results["systems"]
    base = systems[results["baseline"]]
    results["differences"] = {
        name: differences(m, base) for name, m in systems.items() if name != results["baseline"]
    }
    # The differences a system asks for itself (compare_to): RAIN's to greedy and sampled decoding of its model.
    results["comparisons"] = {}
    for name, m in systems.items():
        for other in m["system"].get("compare_to") or []:
            if other in systems and other != name:
                results["comparisons"].setdefault(name, {})[other] = differences(m, systems[other])
            else:
                b.notes.append(f"`{name}` is not compared with `{other}`: that system was not evaluated.")


def differences(m: dict, base: dict) -> dict:
    """Each oracle rate of system metrics m minus base's, with its 95% Newcombe interval (rates both have)."""
    return {
        k: rate_difference(Rate(**m[k]), Rate(**base[k])).as_dict()
        for k, _ in SET_METRICS.values()
        if isinstance(m.get(k), dict) and isinstance(base.get(k), dict)
    }


def write_outputs(run, results: dict, samples: list[dict], notes: list[str], s: DictConfig) -> None:
    """Step 5: results.json, samples.jsonl, report.md (with the notes) and plots; the same to the tracker."""
    atomic_write_json(run.run_dir / "results.json", results)
    atomic_write_text(run.run_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    curves = {Path(c).name: c for c in s.curves if (Path(c) / "metrics.jsonl").exists()}
    written = write_report(results, run.run_dir, curves=curves)
    append_notes(run.run_dir / "report.md", notes)
    run.tracker.log_images({f"eval/{p.stem}": p for p in written if p.suffix == ".png"}, step=0)
    run.tracker.log_table("eval/samples", samples, step=0)
    log.info("wrote %s and %s", run.run_dir / "results.json", ", ".join(str(p.name) for p in written))
    for name, m in results["systems"].items():
        log.info(
            "%-22s %s",
            name,
            " | ".join(
                f"{k} {m[k]['value']:.3f}"
                for k in ("harmlessness", "helpfulness", "attack_success")
                if k in m
            ),
        )


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    if s.ptx_source and models.looks_local(s.ptx_source) and not Path(s.ptx_source).exists():
        raise FileNotFoundError(f"stage.ptx_source={s.ptx_source} does not exist")
    run = start_run(cfg)
    env, device, tracker = run.env, run.device, run.tracker
    systems = eval_systems(s)
    data_dir = (
        tinyhh_dir(cfg)
        if (s.prompts == "tinyhh" or (s.ptx_blocks and not s.ptx_source)) and cfg.data.source == "tinyhh"
        else None
    )
    if s.prompts == "tinyhh" and data_dir is None:
        raise ValueError(
            "stage.prompts=tinyhh needs data=tinyhh; point stage.prompts at a prompt file instead"
        )
    if not env.is_main:  # one process does the work; the others wait for it
        distributed.barrier()
        return

    # 1. Prompts; the judge, the reward scorer and the pretraining text every system is measured with.
    prompts = load_eval_prompts(cfg, data_dir)
    scorer = load_scorer(cfg, systems, device)
    judge = load_judge(s, scorer, device)
    notes: list[str] = []
    tax_of, ptx_from = alignment_tax(cfg, data_dir, device, notes)
    bench = Bench(prompts, judge, scorer, s.reference, tax_of, ptx_from, notes)
    skipped = sorted(set(s.systems) - set(systems))
    sets = dict.fromkeys(p["set"] for p in prompts)
    log.info(
        "%d systems (%s) x %d prompts (%s) | judge=%s | skipped: %s",
        *(len(systems), ", ".join(systems), len(prompts)),
        ", ".join(f"{k} {sum(p['set'] == k for p in prompts)}" for k in sets),
        *(s.judge, ", ".join(skipped) or "none"),
    )

    # 2-4. Answers, verdicts and metrics per system.
    results: dict = {
        "systems": {},
        "prompts": len(prompts),
        "judge": s.judge,
        "skipped": skipped,
        "served_answers": s.served_answers,
    }
    verdicts: dict[str, list[Verdict]] = {}
    samples: list[dict] = []
    bar = tracker.progress(len(systems), "eval")
    for name, sys_cfg in systems.items():
        m, verdicts[name], rows = evaluate_system(bench, name, sys_cfg, s, device, cfg.seed)
        results["systems"][name] = m
        samples += rows
        tracker.log(logged_metrics(name, m), step=0)
        bar.update(1)
        bar.set_postfix(system=name)
    bar.close()

    # Pairwise win rates, differences to the baseline and to each system's compare_to.
    compare(results, verdicts, s, bench)
    compared = {
        f"eval/{name}/vs_{other}/{k}": d["value"]
        for name, row in results["comparisons"].items()
        for other, diffs in row.items()
        for k, d in diffs.items()
    }
    if compared:  # no empty metrics row when no system names compare_to
        tracker.log(compared, step=0)

    # 5. results.json, report.md, plots.
    write_outputs(run, results, samples, notes, s)
    tracker.close()
    distributed.barrier()
