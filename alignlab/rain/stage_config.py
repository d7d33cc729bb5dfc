"""`stage=rain` schema (registered in alignlab/config.py's STAGES). Defaults are the authors' (SafeAILab/RAIN, HH/)."""

from __future__ import annotations

from dataclasses import dataclass, field

# TinyHH's self-evaluation format (alignlab/tinyhh/emitters.py JUDGE_TEMPLATE): the base model learned it in
# pretraining, as large LLMs learned to follow the authors' few-shot judge prompt.
TINYHH_JUDGE_TEMPLATE = (
    "Judge the chat below.{dialogue}\n\nIs the last answer harmful?\nOptions: (A) {option_a} (B) {option_b}\n"
    "The answer is: ("
)

# The string options of RainConfig, each with its choices (checked before a run starts: alignlab/validate.py)
PROMPT_FORMATS = ("prompt", "hh")  # stage.prompt_format
COMMITS = ("argmax", "sample")  # stage.commit
EVALUATORS = ("self", "reward_model")  # stage.evaluator
EMBEDDERS = ("lm", "sentence_transformers")  # stage.embedder


@dataclass
class RainJudgeConfig:
    """Self-evaluation prompt: the model judges the current exchange; the next-token odds of two letters decide."""

    template: str = TINYHH_JUDGE_TEMPLATE  # slots: {dialogue}, and {option_a} {option_b} when both_orders
    options: list[str] = field(default_factory=lambda: ["harmless", "harmful"])  # [good, bad] option names
    letters: list[str] = field(default_factory=lambda: ["A", "B"])  # the answer tokens of slot a and slot b
    both_orders: bool = (
        True  # judge twice with the options swapped (HH); false = one pass (truthfulness Yes/No)
    )
    turn_marker: str = (
        "\n\nHuman:"  # the judged text starts at the last one in the prompt (the current exchange)
    )


@dataclass
class RainConfig:
    """RAIN (Li et al. 2023): training-free tree search guided by the frozen model's own evaluation, with rewinds."""

    name: str = "rain"  # run subdirectory name (the recipe is chosen by `stage=`)
    init_from: str = (
        "${paths.runs}/${experiment.name}/pretrain/model"  # the frozen LM: base model or any stage's
    )
    prompts: str = "tinyhh"  # tinyhh (held-out eval prompts) | a local file or hub dataset
    prompt_format: str = (
        "prompt"  # non-TinyHH: prompt (a `prompt` column) | hh (transcripts cut at 1st answer)
    )
    prompt_split: str = "train"  # non-TinyHH: split (or slice) to read
    prompt_sets: list[str] = field(
        default_factory=lambda: ["harmful", "benign", "attack"]
    )  # TinyHH eval sets
    n_prompts: int = 200  # prompts per set (first N; 0 = all): TinyHH holds 200 per set
    max_prompt_length: int = 128  # longer prompts are dropped (counted and logged)
    max_new_tokens: int = 64  # answer budget, RAIN and vanilla alike (authors: 2048 tokens in all)
    stop_strings: list[str] = field(
        default_factory=lambda: ["\n\nHuman:"]
    )  # next-turn marker: the answer ends
    c: float = 2.0  # exploration: u = c * p * sqrt(parent.n) / (1 + n)
    gamma: float = 0.2  # similarity update weight: w = gamma * cos
    sim_threshold: float = 0.95  # siblings at cos >= this share a backed-up value
    T: int = (
        50  # search iterations per commit: range(fn, max(T, fn + 15)) with fn the root's inherited visits
    )
    T_m: int = 6  # early stop once the most-visited root child has fn > T_m ...
    V: float = 0.8  # ... and q > V
    n_candidates: int = 10  # children per expansion (1-token level: top-k; else greedy + sampled attempts)
    top_k: int = 15  # top-k truncation when sampling multi-token sets
    token_set_lengths: list[int] = field(
        default_factory=lambda: [1, 2, 4, 10]
    )  # set length by depth 0,1,2,>=3
    root_mix: float = 0.25  # root priors := (1 - root_mix) * p + root_mix / K
    dynamic_addition: bool = True  # ablation switch: add a child when every child looks alike and bad
    dynamic_max_children: int = 20  # dynamic addition only below this many children
    dynamic_var_coef: float = 0.03  # ... and when ||var(child embeddings)|| < coef * len(token set)
    similarity_update: bool = True  # ablation switch: siblings at cos >= sim_threshold share backed-up values
    commit: str = "argmax"  # argmax (authors' code: max n, ties by q) | sample (paper: proportional to n)
    rollout_stops: str = ",.?:;\n"  # a leaf's rollout samples until the text ends in one of these
    judge: RainJudgeConfig = field(default_factory=RainJudgeConfig)  # self-evaluation prompt
    evaluator: str = "self"  # self (RAIN) | reward_model (extension, not in the paper: v = tanh(RM score))
    reward_model: str = "${reward.reward_model}"  # evaluator=reward_model: its path
    embedder: str = (
        "lm"  # lm (unit-norm mean-pooled last hidden state, no extra model) | sentence_transformers
    )
    sentence_model: str = (
        "sentence-transformers/all-MiniLM-L6-v2"  # embedder=sentence_transformers (authors')
    )
    batch_prompts: int = 16  # prompts searched in lockstep (their forwards share batches; results unchanged)
    max_batch_rows: int = 256  # rows per batched forward
    vanilla: bool = True  # also sample the vanilla answer to every prompt (same max_new_tokens)
    vanilla_temperature: float = (
        1.0  # vanilla sampling temperature (pure ancestral, as the other stages' evals)
    )
