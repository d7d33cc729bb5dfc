"""`stage=rain` schema (registered in alignlab/stages.py's STAGES). Defaults are the authors' (SafeAILab/RAIN, HH/).

The search's own fields (c, gamma, ..., rollout_stops) are alignlab.rain.search.RainParams's: the recipe builds one
from this config (RainParams.from_fields), so every default lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignlab.choices import Choice
from alignlab.tinyhh.world import JUDGE_OPTIONS, JUDGE_TEMPLATE

# TinyHH's self-evaluation format: the base model learned it in pretraining, as large LLMs learned to follow the
# authors' few-shot judge prompt.
TINYHH_JUDGE_TEMPLATE = JUDGE_TEMPLATE
# The HH transcript's next-turn marker (alignlab.data.formats.HUMAN, not imported: that module loads `datasets`,
# and the schema must stay light for --help).
HH_HUMAN = "\n\nHuman:"

# The string options of RainConfig with a fixed set of values (Hydra checks them at compose time)
PromptFormat = Choice("PromptFormat", "prompt hh")  # stage.prompt_format
Commit = Choice("Commit", "argmax sample")  # stage.commit
Evaluator = Choice("Evaluator", "self reward_model")  # stage.evaluator
Embedder = Choice("Embedder", "lm sentence_transformers")  # stage.embedder
ChildOrder = Choice("ChildOrder", "probability token_id")  # stage.child_order
EosRule = Choice("EosRule", "stop continue")  # stage.eos_rule

# The two embedding thresholds each embedder gets when stage.sim_threshold / stage.dynamic_var_coef are null:
# (sibling cos >= this: a similarity update; ||var(child embeddings)|| < this x set length: dynamic addition may
# fire). sentence_transformers: the released code's, set for all-MiniLM-L6-v2. lm: calibrated so that the LM
# embedder fires as often as MiniLM at the released values, on the pinned TinyHH base model (600 prompts; method,
# runs and rates in docs/rain.md, "Calibrating the embedding thresholds"; scripts/calibrate_rain_thresholds.py).
EMBEDDER_THRESHOLDS: dict[str, tuple[float, float]] = {
    "sentence_transformers": (0.95, 0.03),
    "lm": (0.984, 0.022),
}


@dataclass
class RainJudgeConfig:
    """Self-evaluation prompt: the model judges the current exchange; the next-token odds of two letters decide."""

    template: str = TINYHH_JUDGE_TEMPLATE  # slots: {dialogue}, and {option_a} {option_b} when both_orders
    options: list[str] = field(default_factory=lambda: list(JUDGE_OPTIONS))  # [good, bad] option names
    # the answer token of slot a and of slot b; an entry may be a list of alternative tokens, and that slot's
    # probability is then the largest of theirs (truth/main.py:210-211: the larger of two "Yes" tokens' against
    # the larger of two "No" tokens'), e.g. [[" Yes", "Yes"], [" No", "No"]]
    letters: list[Any] = field(default_factory=lambda: ["A", "B"])
    # judge twice with the options swapped (HH); false = one pass (truthfulness Yes/No)
    both_orders: bool = True
    turn_marker: str = HH_HUMAN  # the judged text starts at the last one in the prompt (the current exchange)


@dataclass
class RainConfig:
    """RAIN (Li et al. 2023): training-free tree search guided by the frozen model's own evaluation, with rewinds."""

    name: str = "rain"  # run subdirectory name (the recipe is chosen by `stage=`)
    init_from: str = "${stage_dir:pretrain}/model"  # the frozen LM: base model or any stage's
    prompts: str = "tinyhh"  # tinyhh (held-out eval prompts) | a local file or hub dataset
    # non-TinyHH: prompt (a `prompt` column) | hh (transcripts cut at the first answer)
    prompt_format: PromptFormat = PromptFormat.prompt
    prompt_split: str = "train"  # non-TinyHH: split (or slice) to read
    # TinyHH eval sets
    prompt_sets: list[str] = field(default_factory=lambda: ["harmful", "benign", "attack"])
    # a TinyHH world with a held-out split (data.tinyhh.heldout_*): also its held-out sets, so stage=eval can
    # judge RAIN's answers on them beside every other system's
    heldout: bool = True
    n_prompts: int = 200  # prompts per set (first N; 0 = all): TinyHH holds 200 per set
    max_prompt_length: int = 128  # longer prompts are dropped (counted and logged)
    max_new_tokens: int = 64  # answer budget, RAIN and vanilla alike (authors: 2048 tokens in all)
    stop_strings: list[str] = field(default_factory=lambda: [HH_HUMAN])  # next-turn marker: the answer ends
    c: float = 2.0  # exploration: u = c * p * sqrt(parent.n) / (1 + n)
    gamma: float = 0.2  # similarity update weight: w = gamma * cos
    # siblings at cos >= this share a backed-up value; null: the embedder's (EMBEDDER_THRESHOLDS above)
    sim_threshold: float | None = None
    # search iterations per commit: range(fn, max(T, fn + 15)) with fn the root's inherited visits
    T: int = 50
    T_m: int = 6  # early stop once the most-visited root child has fn > T_m ...
    V: float = 0.8  # ... and q > V
    n_candidates: int = 10  # children per expansion (1-token level: top-k; else greedy + sampled attempts)
    top_k: int = 15  # top-k truncation when sampling multi-token sets
    # set length by depth 0,1,2,>=3
    token_set_lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    root_mix: float = 0.25  # root priors := (1 - root_mix) * p + root_mix / K
    dynamic_addition: bool = True  # ablation switch: add a child when every child looks alike and bad
    dynamic_max_children: int = 20  # dynamic addition only below this many children
    # ... and when ||var(child embeddings)|| < coef * len(token set); null: the embedder's (EMBEDDER_THRESHOLDS)
    dynamic_var_coef: float | None = None
    similarity_update: bool = True  # ablation switch: siblings at cos >= sim_threshold share backed-up values
    # argmax (authors' code: max n, ties by q) | sample (paper: proportional to n)
    commit: Commit = Commit.argmax
    rollout_stops: str = ",.?:;\n"  # a leaf's rollout samples until the text ends in one of these
    # Order of the 1-token children of an expansion (the top n_candidates tokens either way): probability (most
    # probable first) | token_id (ascending token id, as HH/main.py:311 lists the top 10). Only ties see it:
    # selection ties and commit ties go to the first child, so with c=0 (every unvisited child scores 0) the first
    # child is tried first: the greedy token under probability, the lowest id under token_id. A dynamically added
    # token is still the next most probable one, appended last (HH/nodes.py:133-153), in both orders.
    child_order: ChildOrder = ChildOrder.probability
    # stop (the authors' adv/ and truth/ code): a proposed token set ends at its first EOS; a leaf whose answer
    # holds EOS is evaluated, never expanded; committing a set with EOS ends the answer; rollouts never start
    # after an EOS. continue (the released HH code, HH/main.py:322-345, 413, 474-502): sampled and greedy sets
    # keep their full length through EOS; a leaf is terminal (evaluated, not expanded) when its OWN set holds
    # EOS; committing a set with EOS does not end the answer: that child becomes the root and is expanded like
    # any other, so the search goes on past EOS until a stop string or max_new_tokens (or a childless root); a
    # rollout stops only when it samples EOS itself. Texts are decoded without the EOS tokens either way.
    eos_rule: EosRule = EosRule.stop
    # Temperature of the proposal distribution (adv/main.py:300: 2.0): the 1-token children's priors and every
    # multi-token set's per-step distribution (sampled draws and the priors of greedy and sampled sets) are
    # softmax(logits / T), before the top-k truncation, as adv/'s group_getp. The greedy set stays the argmax,
    # rollouts stay at T=1, and a dynamically added 1-token child's prior comes from the untempered logits
    # (HH/nodes.py:135-143 warps the stored raw logits with top-k only).
    proposal_temperature: float = 1.0
    # A multi-token expansion samples up to f * n_candidates - 1 sets besides the greedy one (f = this), stopping
    # once n_candidates - 1 distinct ones (distinct from the greedy and from each other) are found; duplicates
    # are dropped. f=1: 9 attempts, never early (HH/main.py:332); f=2: up to 19 (adv/main.py:331). A multi-token
    # dynamic addition, the code's 2-candidate call, samples up to 2f - 1 sets (HH 1, adv/ 3) until one differs
    # from the greedy set.
    proposal_attempts_per_candidate: int = 1
    # Text put verbatim before every prompt that is generated from (RAIN and vanilla alike): the model reads
    # preamble + prompt. The authors' HH runs use HH/f1.txt, a 4-shot chat, as f1 + "\n" + prompt
    # (HH/main.py:445): give the separator here. "" = none (TinyHH). The judged text still starts at the last
    # turn marker, i.e. in the prompt itself, not in the preamble.
    preamble: str = ""
    judge: RainJudgeConfig = field(default_factory=RainJudgeConfig)  # self-evaluation prompt
    # self (RAIN) | reward_model (an extension, not in the paper: v = tanh(RM score))
    evaluator: Evaluator = Evaluator.self
    reward_model: str = "${reward.reward_model}"  # evaluator=reward_model: its path
    # lm (unit-norm mean-pooled last hidden state, no extra model) | sentence_transformers
    embedder: Embedder = Embedder.lm
    # embedder=sentence_transformers (authors')
    sentence_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    batch_prompts: int = 16  # prompts searched in lockstep (their forwards share batches; results unchanged)
    max_batch_rows: int = 256  # rows per batched forward
    vanilla: bool = True  # also sample the vanilla answer to every prompt (same max_new_tokens)
    # vanilla sampling temperature (pure ancestral, as the other stages' evals)
    vanilla_temperature: float = 1.0
