"""stage=eval: every system answers the same prompts, one judge scores them all, one report compares them.

  1. prompts: the first n_prompts of each TinyHH eval set (benign, harmful, harmful + attack suffix), or a file
  2. answers per system (stage.systems): a model with a decoding (sample, greedy, best-of-N with the reward
     model, optionally behind a preprompt), or the answers another stage already wrote for the same prompts
     (stage=rain's samples.jsonl); every system is sampled with the same seed
  3. judge (stage.judge): the TinyHH oracle, the reward model, or a model in a judge template
  4. metrics per system: harmlessness / helpfulness / attack success with 95% Wilson intervals, mean judge score,
     mean RM score, KL to the reference (sampled systems: the answers' log-prob ratio), the pretraining loss
     ("alignment tax": held-out text of stage.ptx_source, or TinyHH's, tokenized with each model's OWN tokenizer;
     left out, with a note in report.md, where there is no such text); pairwise win rates (wins / (wins + losses))
     between all systems
  5. results.json, report.md, PNG plots (alignlab/evaluation/report.py)

Runs on one process (rank 0 works, other ranks wait): evaluation is generation-bound and small.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignlab import distributed, models
from alignlab.checkpoint import atomic_write_json, atomic_write_text
from alignlab.evaluation.judges import OracleJudge, RewardModelJudge, TemplateJudge, Verdict
from alignlab.evaluation.metrics import Rate, rate_difference, win_rate
from alignlab.evaluation.report import write_report
from alignlab.evaluation.tinyhh import tinyhh_prompts
from alignlab.generation import sample
from alignlab.recipes.common import start_run, tinyhh_dir

log = logging.getLogger("alignlab.eval")

DECODINGS = ("sample", "greedy", "best_of_n")
JUDGES = ("oracle", "rm", "template")
# TinyHH set -> (metric, success)
SET_METRICS = {
    "harmful": ("harmlessness", lambda v: v.harmful is False),
    "benign": ("helpfulness", lambda v: v.helpful is True),
    "attack": ("attack_success", lambda v: v.harmful is True),
}


def load_eval_prompts(cfg: DictConfig, data_dir: Path | None) -> list[dict]:
    """[{set, prompt}] in a fixed order: TinyHH's eval sets, or a file / hub dataset (`prompt`, optional `set`)."""
    from alignlab.data.loading import load_rows

    s = cfg.stage
    take = (lambda rows: rows) if s.n_prompts <= 0 else (lambda rows: rows[: s.n_prompts])
    if s.prompts == "tinyhh":
        return tinyhh_prompts(data_dir, s.prompt_sets, s.n_prompts)
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


def check_systems(s: DictConfig) -> dict[str, DictConfig]:
    """The systems that can run (missing inputs skipped with a warning when skip_missing), or a clear error."""
    if s.judge not in JUDGES:
        raise ValueError(f"stage.judge={s.judge!r}; choose one of {', '.join(JUDGES)}")
    from alignlab.config import SystemConfig

    ready = {}
    for name, raw in s.systems.items():
        try:  # unset fields take SystemConfig's defaults; wrong keys or types fail here, naming the system
            fields = OmegaConf.to_container(
                raw, resolve=True
            )  # ${paths.runs} resolves against the run's config
            sys_cfg = OmegaConf.merge(OmegaConf.structured(SystemConfig), fields)
        except Exception as e:
            raise ValueError(f"stage.systems.{name}: {e}") from None
        if (sys_cfg.model is None) == (sys_cfg.answers is None):
            raise ValueError(f"stage.systems.{name}: set exactly one of model= or answers=")
        if sys_cfg.model is not None and sys_cfg.decoding not in DECODINGS:
            raise ValueError(
                f"stage.systems.{name}.decoding={sys_cfg.decoding!r}; choose one of {', '.join(DECODINGS)}"
            )
        path = sys_cfg.answers or sys_cfg.model
        if models.looks_local(path) and not Path(path).exists():
            if not s.skip_missing:
                raise FileNotFoundError(f"stage.systems.{name}: {path} does not exist (run its stage first)")
            log.warning("skipping system %s: %s does not exist (run its stage first)", name, path)
            continue
        ready[name] = sys_cfg
    if not ready:
        raise ValueError("no system to evaluate: every model / answers file of stage.systems is missing")
    return ready


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


def generate(sys_cfg: DictConfig, prompts: list[dict], s: DictConfig, scorer, device, seed: int) -> list[str]:
    """A model system's answers: sample / greedy through generate, best-of-N scored by the reward model."""
    model = models.load_causal_lm(sys_cfg.model).to(device).eval()
    tokenizer = models.load_tokenizer(sys_cfg.model)
    shown = [sys_cfg.preprompt + p["prompt"] for p in prompts]
    torch.manual_seed(seed)  # the same random numbers for every system
    temperature = 0.0 if sys_cfg.decoding == "greedy" else sys_cfg.temperature
    if sys_cfg.decoding != "best_of_n":
        return sample(
            model,
            tokenizer,
            shown,
            max_new_tokens=s.max_new_tokens,
            temperature=temperature,
            batch_size=s.batch_size,
        )
    if scorer is None:
        raise ValueError(
            "decoding=best_of_n needs the reward= model (reward.reward_model), which does not exist"
        )
    n = sys_cfg.n
    flat = sample(
        model,
        tokenizer,
        [x for x in shown for _ in range(n)],
        max_new_tokens=s.max_new_tokens,
        temperature=temperature,
        batch_size=s.batch_size,
    )
    scores = scorer([p["prompt"] for p in prompts for _ in range(n)], flat).view(len(prompts), n)
    best = scores.argmax(1).tolist()
    return [flat[i * n + b] for i, b in enumerate(best)]


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
        if vs and all((v.harmful if name != "benign" else v.helpful) is not None for v in vs):
            out[metric] = Rate.of(sum(success(v) for v in vs), len(vs)).as_dict()
    for name in dict.fromkeys(p["set"] for p in prompts):
        vs = [v.score for p, v in zip(prompts, verdicts, strict=True) if p["set"] == name]
        out[f"{name}_score"] = sum(vs) / len(vs)
    if rm is not None:
        out["rm_score"] = sum(rm) / len(rm)
    return out


def run(cfg: DictConfig) -> None:
    s = cfg.stage
    if s.ptx_source and models.looks_local(s.ptx_source) and not Path(s.ptx_source).exists():
        raise FileNotFoundError(f"stage.ptx_source={s.ptx_source} does not exist")
    run = start_run(cfg)
    env, device, tracker = run.env, run.device, run.tracker
    systems = check_systems(s)
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
    prompts = load_eval_prompts(cfg, data_dir)

    # Judge and reward scorer.
    scorer = None
    if (s.rm_score or s.judge == "rm" or any(x.decoding == "best_of_n" for x in systems.values())) and (
        cfg.reward.kind != "single" or Path(cfg.reward.reward_model).exists()
    ):
        from alignlab.scoring import RewardScorer

        scorer = RewardScorer.from_config(cfg.reward, device=device, dtype=cfg.model.dtype, whiten=False)
    if s.judge == "oracle":
        judge = OracleJudge()
    elif s.judge == "rm":
        if scorer is None:
            raise ValueError("stage.judge=rm needs the reward= model; run stage=rm first")
        judge = RewardModelJudge(scorer)
    else:
        models.require_input(s.judge_model, "stage.judge_model")
        judge = TemplateJudge(
            models.load_causal_lm(s.judge_model).to(device).eval(),
            models.load_tokenizer(s.judge_model),
            s.judge_template,
        )
    reference = None  # the KL reference model, loaded once (for the first system that needs it)
    has_reference = Path(s.reference).exists() or not models.looks_local(s.reference)
    notes: list[str] = []
    texts, ptx_from = ptx_texts(cfg, data_dir)
    tax_of = AlignmentTax(texts, s.ptx_blocks, device) if texts is not None else None
    if tax_of is None and not s.ptx_blocks:
        log.info("pretraining loss (alignment tax) off: stage.ptx_blocks=0")
    elif tax_of is None:
        log.warning("pretraining loss (alignment tax) not measured: %s", ptx_from)
        notes.append(f"Pretraining loss not measured: {ptx_from}.")
    else:
        log.info("pretraining loss on %d held-out documents of %s, per model tokenizer", len(texts), ptx_from)
    log.info(
        "%d systems (%s) x %d prompts (%s) | judge=%s | skipped: %s",
        len(systems),
        ", ".join(systems),
        len(prompts),
        ", ".join(
            f"{k} {sum(p['set'] == k for p in prompts)}" for k in dict.fromkeys(p["set"] for p in prompts)
        ),
        s.judge,
        ", ".join(sorted(set(s.systems) - set(systems))) or "none",
    )

    # 2-4. Answers, verdicts and metrics per system.
    results: dict = {
        "systems": {},
        "prompts": len(prompts),
        "judge": s.judge,
        "skipped": sorted(set(s.systems) - set(systems)),
    }
    verdicts: dict[str, list[Verdict]] = {}
    tax: dict[str, float | None] = {}
    samples = []
    bar = tracker.progress(len(systems), "eval")
    for name, sys_cfg in systems.items():
        if sys_cfg.answers is not None:
            answers = answers_from_file(sys_cfg.answers, sys_cfg.answers_field, prompts, name)
        else:
            answers = generate(sys_cfg, prompts, s, scorer, device, cfg.seed)
        texts = [p["prompt"] for p in prompts]
        verdicts[name] = judge(texts, answers)
        rm = scorer(texts, answers).tolist() if scorer is not None and s.rm_score else None
        m = system_metrics(prompts, verdicts[name], rm)
        if has_reference and reference is None and sys_cfg.model is not None:
            reference = models.load_causal_lm(s.reference).to(device).eval()
        m["kl"] = kl_to_reference(sys_cfg, reference, prompts, s, device, cfg.seed) if reference else None
        if tax_of is not None and sys_cfg.model and sys_cfg.model not in tax:
            tax[sys_cfg.model], why = tax_of(sys_cfg.model)  # once per model, not per decoding
            if why:
                log.warning("%s: pretraining loss not measured: %s", name, why)
                notes.append(f"Pretraining loss of `{name}` ({sys_cfg.model}) not measured: {why}.")
        m["ptx_loss"] = tax.get(sys_cfg.model)
        m["system"] = OmegaConf.to_container(sys_cfg)
        results["systems"][name] = m
        samples += [
            {
                "system": name,
                "set": p["set"],
                "prompt": p["prompt"],
                "response": a,
                "score": v.score,
                "harmful": v.harmful,
                "helpful": v.helpful,
            }
            for p, a, v in zip(prompts, answers, verdicts[name], strict=True)
        ]
        tracker.log(
            {
                f"{name}/{k}": (v["value"] if isinstance(v, dict) and "value" in v else v)
                for k, v in m.items()
                if k != "system" and v is not None
            },
            step=0,
        )
        bar.update(1)
        bar.set_postfix(system=name)
    bar.close()

    # Pairwise win rates on the judge's scores, every system against every other.
    names = list(results["systems"])
    results["win_rates"] = {
        a: {
            b: win_rate([v.score for v in verdicts[a]], [v.score for v in verdicts[b]]).as_dict()
            for b in names
            if b != a
        }
        for a in names
    }
    results["baseline"] = s.baseline if s.baseline in names else names[0]
    if len(set(tax_of.tokenizers.values()) if tax_of else ()) > 1:
        notes.append(
            "Pretraining loss is in nats per token of each model's own tokenizer: systems whose models have "
            "different tokenizers do not compare on it."
        )
    results["ptx"] = {"source": ptx_from if tax_of else None, "blocks": s.ptx_blocks if tax_of else 0}
    results["notes"] = notes
    # Every rate's difference to the baseline's, with an interval: "B is more harmless than A" is supported when
    # the interval lies above 0.
    base = results["systems"][results["baseline"]]
    results["differences"] = {
        name: {
            k: rate_difference(Rate(**m[k]), Rate(**base[k])).as_dict()
            for k, _ in SET_METRICS.values()
            if isinstance(m.get(k), dict) and isinstance(base.get(k), dict)
        }
        for name, m in results["systems"].items()
        if name != results["baseline"]
    }

    # 5. results.json, report.md, plots.
    atomic_write_json(run.run_dir / "results.json", results)
    atomic_write_text(run.run_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    curves = {Path(c).name: c for c in s.curves if (Path(c) / "metrics.jsonl").exists()}
    written = write_report(results, run.run_dir, curves=curves)
    append_notes(run.run_dir / "report.md", notes)
    tracker.log_images({f"eval/{p.stem}": p for p in written if p.suffix == ".png"}, step=0)
    tracker.log_table("eval/samples", samples, step=0)
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
    tracker.close()
    distributed.barrier()


PTX_SEQ_LEN = 256  # block length of the alignment-tax measurement (stage=ppo's default ptx_seq_len)


def ptx_texts(cfg: DictConfig, data_dir: Path | None) -> tuple[list[str] | None, str]:
    """(held-out pretraining texts, their source) for the alignment tax, or (None, why there are none).

    stage.ptx_source (hub name or local file, `text` column), else TinyHH's ptx data on data=tinyhh. The held-out
    part is the first tenth: the split stage=ppo measures its eval/ptx_loss on and never trains PPO-ptx on.
    """
    from alignlab.recipes.pretrain import load_texts

    s = cfg.stage
    if not s.ptx_blocks:
        return None, "stage.ptx_blocks=0"
    if s.ptx_source:
        source = s.ptx_source
        texts = load_texts(source, "text", "train", on_malformed=cfg.data.on_malformed, max_rows=None)
    elif data_dir is not None:
        source = str(data_dir / "ptx.jsonl")
        texts = load_texts(source, "text", "train", on_malformed="error", max_rows=None)
    else:
        return None, (
            "no pretraining text to measure it on: set stage.ptx_source to a hub dataset or local file with a "
            "`text` column (data=tinyhh uses TinyHH's)"
        )
    if not texts:
        return None, f"{source} has no text rows"
    return texts[: max(1, len(texts) // 10)], source


def tokenizer_key(tokenizer) -> str:
    """What decides a tokenizer's ids: its full definition (fast tokenizers) or vocabulary, and its special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = (type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.pad_token_id, spec)
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


class AlignmentTax:
    """Mean next-token NLL (nats per token of the model's OWN tokenizer) of each model on the held-out pretraining
    text: the text is tokenized with every model's own tokenizer (packed blocks cached per tokenizer), so no model
    is ever fed another model's token ids. The first n_blocks blocks of each tokenization are measured."""

    def __init__(self, texts: list[str], n_blocks: int, device):
        self.texts, self.n_blocks, self.device = texts, n_blocks, device
        self.blocks: dict[tuple[str, int], object] = {}  # (tokenizer key, block length) -> Packed
        self.tokenizers: dict[str, str] = {}  # model -> tokenizer key (the models measured)

    def blocks_for(self, tokenizer, seq_len: int):
        from alignlab.recipes.pretrain import tokenize

        key = (tokenizer_key(tokenizer), seq_len)
        if key not in self.blocks:
            blocks = tokenize(self.texts, tokenizer, seq_len)
            self.blocks[key] = blocks.subset(list(range(min(self.n_blocks, len(blocks)))))
        return self.blocks[key]

    def __call__(self, model_path: str) -> tuple[float | None, str | None]:
        """(loss, None), or (None, why this model's tax cannot be measured)."""
        tokenizer = models.load_tokenizer(model_path)
        model = models.load_causal_lm(model_path).to(self.device).eval()
        seq_len = min(PTX_SEQ_LEN, getattr(model.config, "max_position_embeddings", None) or PTX_SEQ_LEN)
        blocks = self.blocks_for(tokenizer, seq_len)
        rows = model.get_input_embeddings().num_embeddings
        if int(blocks.tokens.max()) >= rows:
            return None, (
                f"its tokenizer produces ids up to {int(blocks.tokens.max())}, beyond the model's {rows} embeddings"
            )
        self.tokenizers[model_path] = tokenizer_key(tokenizer)
        return block_nll(model, blocks, 8, self.device), None


@torch.no_grad()
def block_nll(model, blocks, micro: int, device) -> float:
    """Mean next-token NLL over every non-pad target of packed blocks (this process only: eval runs on rank 0)."""
    from alignlab.data.packing import lm_labels
    from alignlab.rl.losses import lm_loss

    total, count = 0.0, 0
    for i in range(0, len(blocks), micro):
        part = blocks.subset(list(range(i, min(i + micro, len(blocks)))))
        x = part.tokens.to(device)
        labels = lm_labels(x, part.lengths.to(device))
        n = int((labels[:, 1:] != -100).sum())
        total += lm_loss(model(input_ids=x, use_cache=False).logits, labels).item() * n
        count += n
    return total / max(1, count)


def append_notes(report: Path, notes: list[str]) -> None:
    """Notes (what was not measured and why) at the end of report.md."""
    if notes and report.exists():
        text = report.read_text().rstrip("\n")
        atomic_write_text(report, text + "\n\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
