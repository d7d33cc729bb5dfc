"""Typed config schema: one dataclass per group option, registered in Hydra's ConfigStore.

Hydra validates every override against these dataclasses, so an unknown key or a value of the wrong type fails
at composition time with Hydra's own message; so does a value outside a choice field's set (the Enums of
alignlab/choices.py). YAML files under conf/ only set values on top of a schema (`defaults:
[/schema/<group>@_here_]`), they never add keys.

One doc per field: the comment on its line, or the comment lines right above it (alignlab/config_help.py reads
them for `--help`). A field a subclass restates without a comment keeps its base class's doc.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from alignlab.choices import (
    Advantage,
    ChatTemplate,
    DPOLoss,
    DType,
    Judge,
    Keep,
    KLController,
    KLEstimator,
    KLPenalty,
    Launcher,
    Logger,
    Margin,
    MissingEOS,
    OldLogprobs,
    OnMalformed,
    Ranking,
    Resume,
    RewardKind,
    SourceFormat,
    Subset,
    TrainFrom,
    TrainOn,
    Truncated,
    WandbMode,
)
from alignlab.config_help import stage_help
from alignlab.rain.stage_config import TINYHH_JUDGE_TEMPLATE
from alignlab.stages import DEMO_STAGES, STAGES, demo_budget, stage_dir
from alignlab.tinyhh.world import SAFETY_PREPROMPTS


@dataclass
class LoraConfig:
    enabled: bool = False  # wrap the model with a PEFT LoRA adapter
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # adapter dropout (kept 0 for RL: dropout breaks log-prob consistency)
    # module names to adapt (a list), "all-linear", or None = PEFT's default for the architecture (Llama/Qwen2:
    # q_proj, v_proj; GPT-NeoX: query_key_value; GPT-2: c_attn). Any, so the string composes from the command line.
    target_modules: Any = None


@dataclass
class ArchConfig:
    """Llama architecture for models built from scratch (stage=pretrain on TinyHH)."""

    hidden_size: int = 128  # model width
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # attention heads
    intermediate_size: int = 384  # SwiGLU MLP width
    max_position_embeddings: int = 256  # longest sequence the model sees
    tie_word_embeddings: bool = False  # share input and output embeddings


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run names and logs
    name_or_path: str = MISSING  # hub name or local directory (save_pretrained layout)
    tokenizer: str | None = None  # tokenizer path/hub name; None = same as name_or_path
    dtype: DType = DType.float32  # float32 | bfloat16 | float16 | auto (the checkpoint's own)
    trust_remote_code: bool = False  # passed to from_pretrained
    # used only when a stage builds the model from scratch
    arch: ArchConfig = field(default_factory=ArchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # PEFT LoRA adapter (off by default)


@dataclass
class TinyHHConfig:
    """The sizes of TinyHH's generated data sets (alignlab/tinyhh/emitters.py's Sizes is this plus its cache key)."""

    seed: int = 0  # world sampling seed: same seed -> byte-identical files
    n_corpus: int = 24000  # pretraining documents (dialogues + self-evaluation examples)
    n_preprompt: int = 1500  # extra pretraining dialogues behind a safety preprompt (answered safely)
    n_sft: int = 1500  # SFT demonstrations
    n_pref: int = 4000  # preference pairs
    n_rl_prompts: int = 2000  # RL prompts
    n_eval: int = 200  # held-out eval prompts per kind (benign, harmful, harmful + attack suffix)
    # byte-level BPE vocabulary (a larger softmax costs more than the longer sequences save)
    vocab_size: int = 1024
    n_ranked: int = 1000  # InstructGPT-style ranked sets (K = 4..9 answers per prompt)
    heldout_topics: int = 0  # benign and harmful topics (each) kept out of SFT/preference/RL data; 0 = off
    heldout_suffixes: int = 0  # attack suffixes kept out of SFT/preference/RL data (not pretraining); 0 = off


@dataclass
class DataConfig:
    name: str = MISSING  # short name used in logs
    source: str = MISSING  # "tinyhh", a hub dataset name, or a local .jsonl/.json/.parquet file or directory
    format: SourceFormat = SourceFormat.text  # hh | prompt_completion | preference | messages | text
    # How conversations are rendered for the model (alignlab/data/chat.py): auto (as the model was trained, else
    # the tokenizer's chat template when it has one, else hh) | hh (HH transcript) | none (plain single-turn text)
    chat_template: ChatTemplate = ChatTemplate.auto
    train_split: str = "train"  # split (or slice, "train[:95%]") for training
    eval_split: str | None = None  # split for evaluation; None = hold out eval_fraction of train
    eval_fraction: float = 0.02  # held-out share of train when eval_split is None
    on_malformed: OnMalformed = OnMalformed.error  # error | skip (skipped rows are counted and logged)
    max_rows: int | None = None  # keep only the first N training rows (quick runs)
    cache_dir: str = "${paths.data}"  # where generated data (TinyHH) is written
    tinyhh: TinyHHConfig = field(default_factory=TinyHHConfig)  # data=tinyhh: the generated data sets' sizes
    # TinyHH's data, prompts and oracle are meant for a TinyHH model (one whose tokenizer is TinyHH's): with any
    # other model a stage refuses to start (data=tinyhh is the default, so this is usually a forgotten data=);
    # true runs them on any model on purpose
    tinyhh_any_model: bool = False


@dataclass
class LauncherConfig:
    name: Launcher = Launcher.local  # local | deepspeed | torchrun
    nproc: int = 1  # processes per node
    master_port: int = 0  # rendezvous port; 0 = pick a free one
    extra_args: list[str] = field(default_factory=list)  # passed to the runner before the module


@dataclass
class DeepSpeedConfig:
    name: str = "zero0"  # preset name
    zero_stage: int = 0  # ZeRO stage: 0 (DDP), 2 (optimizer + gradient sharding), 3 (+ parameter sharding)
    offload_optimizer: bool = False  # ZeRO-Offload optimizer states to CPU memory
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU memory
    overlap_comm: bool = False  # overlap gradient reduction with backward
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    extra: dict[str, Any] = field(default_factory=dict)  # merged verbatim into the DeepSpeed JSON config


@dataclass
class LoggerConfig:
    name: Logger = Logger.jsonl  # jsonl (metrics.jsonl only) | wandb (metrics.jsonl + W&B)
    project: str = "alignlab"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    group: str | None = "${experiment.name}"  # W&B run group (the stages of one experiment side by side)
    job_type: str | None = "${stage.name}"  # W&B job type (filter one stage across experiments)
    mode: WandbMode | None = None  # online | offline | disabled; None = WANDB_MODE or offline when no API key
    tags: list[str] = field(default_factory=list)  # W&B tags
    progress: bool = True  # tqdm progress bars with throughput


@dataclass
class ExperimentConfig:
    name: str = "tinyhh"  # runs go to ${paths.runs}/<name>/<stage>
    description: str = ""  # one line shown in logs and the W&B run notes


@dataclass
class PathsConfig:
    runs: str = "runs"  # root of run directories
    data: str = "data_cache"  # generated/cached datasets


@dataclass
class OptimizerConfig:
    """AdamW and the metrics / checkpoint cadence every training stage has. A base class, not a nested block, so the
    keys stay flat (stage.lr, stage.betas, ...); a stage restates a field to change its default."""

    lr: float = 2e-5  # peak learning rate (AdamW; Llama 2 SFT: 2e-5)
    weight_decay: float = 0.1  # AdamW weight decay (Llama 2: 0.1)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas (InstructGPT, Llama 2)
    grad_clip: float = 1.0  # global gradient-norm clip (PPO: policy and critic)
    # rows (sequences, comparisons or ranked sets; PPO: episodes) per forward per rank: gradient accumulation
    # fills the (mini)batch
    micro_batch_size: int = 16
    log_every: int = 10  # optimizer steps (PPO: iterations) between metrics.jsonl lines
    # optimizer steps (PPO: iterations) between resumable checkpoints in checkpoints/ (0 = only at the end)
    checkpoint_every: int = 0


@dataclass
class TrainerConfig(OptimizerConfig):
    """What the stages trained through transformers' Trainer share (SFT, RM, and the SFT loss of rejection sampling
    and context distillation)."""

    epochs: float = 2.0  # passes over the training rows (Llama 2 SFT: 2)
    steps: int = 0  # optimizer steps; 0 = derived from epochs
    # rows (sequences; RM: comparisons or ranked sets) per optimizer step, over all ranks
    batch_size: int = 32
    # longest tokenized prompt + answer: longer rows are truncated (SFT) or dropped (RM), counted and logged
    max_length: int = 256
    # Recompute activations during backward (memory for time: a big model on a small GPU). Off by default, unlike
    # TRL's SFTConfig/RewardConfig: on a model that fits it only slows training (1.2-1.3x, docs/benchmarks.md)
    gradient_checkpointing: bool = False
    lr_scheduler: str = "cosine_with_min_lr"  # transformers scheduler name
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr (InstructGPT: to 10%)
    warmup_ratio: float = 0.03  # share of steps in linear warmup (Llama 2: 3%)


@dataclass
class FinetuneConfig(TrainerConfig):
    """The SFT loss: stage=sft's, and on a stage's own generated data (rejection sampling, context distillation)."""

    # last_turn (Llama 2: every earlier turn masked) | all_assistant_turns
    train_on: TrainOn = TrainOn.last_turn
    # Batches of similar-length rows (Trainer's group_by_length sampler): less padding, faster steps, but batches
    # are no longer uniformly random
    group_by_length: bool = False
    # TRL's chunked LM-head kernel for the loss (never materialises the [tokens, vocab] logits: memory for a large
    # vocabulary on a GPU); off: one log-softmax over the logits, 1.2x faster per step on TinyHH (docs/benchmarks.md)
    fused_lm_head: bool = False
    # torch.compile the model in place (fused elementwise kernels): 1.3x per step on TinyHH's CPU model, same
    # numbers, after a one-time compile of ~35 s (docs/benchmarks.md): for runs longer than a few minutes
    compile: bool = False
    eval_every: int = 0  # steps between held-out answer-loss evaluations (0 = before and after training only)
    eval_rows: int = 32  # rows held out for the answer-token loss (generated rows: at most a fifth of them)


@dataclass
class PretrainConfig(OptimizerConfig):
    """Causal-LM pretraining (next-token NLL on every non-pad token) of a model built from scratch or loaded."""

    name: str = "pretrain"  # run subdirectory name (the recipe is chosen by `stage=`)
    # build model.arch with the data's tokenizer instead of loading model.name_or_path
    from_scratch: bool = True
    steps: int = 800  # optimizer steps (about 4 minutes on 2 CPU cores with the defaults)
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    seq_len: int = 256  # block length in tokens; whole documents are packed into blocks, never split
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of lr
    warmup_steps: int = 50  # linear warmup
    eval_every: int = 300  # steps between held-out loss evaluations (0 = only at the end)
    eval_batches: int = 8  # batches per held-out evaluation
    # TinyHH: held-out prompts per set (benign, harmful, attack, self-eval) judged at the end (0 = off)
    sample_eval: int = 200
    eval_max_new_tokens: int = 64  # generation budget of the end-of-run oracle evaluation


@dataclass
class SFTConfig(FinetuneConfig):
    """Supervised fine-tuning (TRL SFTTrainer): mean NLL over answer tokens only, prompt and earlier turns masked.
    FinetuneConfig's fields, plus the model, packing and the oracle evaluation."""

    name: str = "sft"  # run subdirectory name (the recipe is chosen by `stage=`)
    # model to fine-tune: the pretrain run's model/ on TinyHH, or a hub name
    init_from: str = "${model.name_or_path}"
    packing: bool = False  # TRL "bfd" padding-free packing; needs flash attention (GPU), refused on sdpa
    # held-out demonstrations for the answer-token loss (TinyHH: eval_fraction of sft rows)
    eval_rows: int = 200
    # TinyHH: held-out prompts per set (benign, harmful, attack, self-eval) judged at the end, for the starting
    # model and the fine-tuned one on the same prompts (0 = off)
    sample_eval: int = 200
    eval_max_new_tokens: int = 64  # generation budget of the oracle evaluation


@dataclass
class RMConfig(TrainerConfig):
    """Pairwise ranking reward model (TRL RewardTrainer; our K-way collator and loss for ranked sets)."""

    name: str = "rm"  # run subdirectory name; the two-RM setup uses rm_helpful and rm_safety
    init_from: str = "${stage_dir:sft}/model"  # backbone: the SFT model (InstructGPT, Llama 2)
    # all | helpful | safety: preference rows by their is_safety flag (Llama 2's two RMs)
    subset: Subset = Subset.all
    # pairwise (chosen/rejected) | kway (InstructGPT: K ranked answers per prompt)
    ranking: Ranking = Ranking.pairwise
    # Llama 2 margin by rating level: none | small (1, 2/3, 1/3, 0) | large (3, 2, 1, 0)
    margin: Margin = Margin.small
    # coef * mean((r_c + r_r)^2) keeps scores near 0 (TRL center_rewards_coefficient)
    center_coef: float = 0.0
    epochs: float = 1.0  # passes over the comparisons (longer overfits: InstructGPT, Llama 2)
    lr: float = 1e-4  # peak learning rate (Llama 2: 1e-5 at 7B+; the tiny model wants more)
    # held-out pairs for accuracy (at most a quarter of the data when data.eval_split is unset)
    eval_rows: int = 400
    # Reward normalisation (lm-human-preferences): gain/bias so the SFT model's own answers to this many RL prompts
    # score mean 0, std 1; stored in model/reward_normalization.json and applied by every reward= scorer (0 = off)
    normalize_samples: int = 256
    normalize_max_new_tokens: int = 64  # generation budget of the normalisation samples


@dataclass
class DPOConfig(TrainerConfig):
    """Direct preference optimisation (TRL DPOTrainer) of the SFT model on preference pairs, against the frozen
    starting model (with LoRA: the policy with its adapters disabled)."""

    name: str = "dpo"  # run subdirectory name
    # the policy's start and the reference (Rafailov et al.: the SFT model)
    init_from: str = "${stage_dir:sft}/model"
    # all | helpful | safety: preference rows by their is_safety flag
    subset: Subset = Subset.all
    # sigmoid (DPO: -log sigmoid(beta * margin)) | ipo (IPO: (margin / length - 1 / (2 beta))^2, TRL's form)
    loss: DPOLoss = DPOLoss.sigmoid
    # the KL strength: DPO's beta (Rafailov et al.: 0.1 on HH, 0.5 on TL;DR; at 0.1 TinyHH's DPO over-refuses on
    # one of two measured chains: docs/dpo.md); IPO's tau
    beta: float = 0.5
    # weight of the chosen answer's mean token NLL added to the loss (RPO, Pang et al. 2024: 1.0; 0 = DPO alone)
    sft_weight: float = 0.0
    epochs: float = 1.0  # passes over the pairs
    # peak learning rate (Rafailov et al.: 1e-6 at 2.8B+; the tiny model wants more: docs/dpo.md)
    lr: float = 2e-5
    # held-out pairs: the implicit reward's preference accuracy (at most a quarter of the data when
    # data.eval_split is unset)
    eval_rows: int = 400
    eval_every: int = 0  # steps between held-out evaluations (0 = before and after training only)
    # TinyHH: held-out prompts per set judged by the oracle for the starting model and the DPO model (0 = off)
    sample_eval: int = 200
    eval_max_new_tokens: int = 64  # generation budget of the oracle evaluation


@dataclass
class PPOConfig(OptimizerConfig):
    """KL-penalised PPO (InstructGPT / Ziegler et al.) and PPO-ptx: actor from SFT, critic from the reward model."""

    name: str = "ppo"  # run subdirectory name (stage=ppo_ptx writes ppo_ptx/, stage=grpo grpo/, ...)
    init_from: str = "${stage_dir:sft}/model"  # policy and frozen reference: the SFT model
    value_from: str = "${reward.reward_model}"  # critic initialisation: the reward model (InstructGPT)
    iterations: int = 100  # PPO iterations: roll out rollout_batch_size episodes, then ppo_epochs of updates
    rollout_batch_size: int = 64  # episodes per iteration, over all ranks (InstructGPT / Llama 2: 512)
    minibatch_size: int = 32  # episodes per optimizer step, over all ranks (InstructGPT / Llama 2: 64)
    ppo_epochs: int = 2  # passes over each rollout batch (InstructGPT: 1)
    max_prompt_length: int = 128  # longer prompts are dropped (counted and logged)
    max_new_tokens: int = 96  # response budget; an answer without EOS by then gets the missing-EOS treatment
    temperature: float = 1.0  # rollout temperature (InstructGPT 1.0; TRL 0.7); logits / T in every log-prob
    lr: float = 1e-5  # policy learning rate, constant (Llama 2: 1e-6 at 7B+; the tiny model wants more)
    value_lr: float = 3e-5  # critic learning rate (its own optimizer; InstructGPT: 9e-6 at 175B)
    adam_eps: float = 1e-5  # AdamW epsilon (Llama 2)
    weight_decay: float = 0.0  # AdamW weight decay (Llama 2: 0.1)
    clip_range: float = 0.2  # PPO ratio clip eps
    clip_range_value: float = 0.2  # value clip around the rollout's values
    # value-loss weight (the critic has its own optimizer; kept for parity with shared trunks)
    vf_coef: float = 0.1
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    # gae: a critic (value_from) and GAE, PPO | grpo: (R - group mean) / group std (DeepSeekMath) | rloo: R minus
    # the mean of the K - 1 other samples of its prompt (Ahmadian et al. 2024); grpo and rloo train no critic
    advantage: Advantage = Advantage.gae
    # K samples per prompt (grpo, rloo: >= 2; the rollout batch is rollout_batch_size / K prompts x K); gae: 1
    group_size: int = 1
    # reward: -beta * KL per token in the reward (PPO, RLOO) | loss: beta * KL (k3) of the current policy added
    # to the policy loss, per token (GRPO)
    kl_penalty: KLPenalty = KLPenalty.reward
    kl_coef: float = 0.2  # initial beta of the per-token KL penalty (InstructGPT 0.02; Llama 2 0.01 at 7B)
    # k1 = log pi - log pi_ref | k3 = (rho - 1) - log rho (never < 0)
    kl_estimator: KLEstimator = KLEstimator.k1
    kl_controller: KLController = KLController.fixed  # fixed | adaptive (Ziegler: beta follows kl_target)
    kl_target: float = 6.0  # adaptive controller's target of the per-sequence summed KL (nats)
    kl_horizon: int = 10000  # adaptive controller's horizon (episodes)
    score_clip: float = 5.0  # clip the normalised RM score to [-score_clip, score_clip] (0 = off)
    # what an answer without EOS within max_new_tokens scores: none (its RM score) | replace
    # (-missing_eos_penalty) | subtract (its RM score - missing_eos_penalty)
    missing_eos: MissingEOS = MissingEOS.replace
    missing_eos_penalty: float = 1.0  # penalty for an answer that did not end within max_new_tokens
    # whiten per-token rewards over the rollout batch (shift_mean=False; >= 8 per rank)
    whiten_rewards: bool = False
    whiten_advantages: bool = True  # whiten advantages over the rollout batch's valid tokens (pads stay 0)
    # the PPO ratio's old log-probs: forward (a full forward of the policy after sampling) | sampling (the sampling
    # pass's own logits: one policy forward fewer per episode, equal up to cached-attention rounding; bfloat16
    # rounds more; docs/ppo.md, docs/benchmarks.md)
    old_logprobs: OldLogprobs = OldLogprobs.forward
    # PPO-ptx (InstructGPT): loss = ppo_loss + ptx_coef * lm_loss on a separate pretraining micro-batch per PPO
    # micro-batch, one backward and one optimizer step. lm_loss is the mean NLL per token, the normalisation
    # ptx_coef multiplies (InstructGPT used gamma = 27.8 with its own, unpublished, normalisation). 0 = plain PPO.
    ptx_coef: float = 0.0
    ptx_source: str | None = None  # pretraining text (hub name or local file, `text` column); None = TinyHH's
    ptx_micro_batch_size: int = 8  # pretraining blocks (~4 TinyHH documents each) per PPO micro-batch
    ptx_seq_len: int = 256  # pretraining block length (documents packed whole, as in stage=pretrain)
    log_every: int = 1  # iterations between metrics.jsonl lines
    # iterations between sample tables (prompt, response, score) in samples.jsonl (0 = off)
    samples_every: int = 20
    samples_per_table: int = 8  # rows per sample table
    # iterations between held-out evaluations (0 = at the start and the end only); they leave training unchanged
    eval_every: int = 0
    # held-out RL prompts for RM score and KL (TinyHH: eval prompts not used in training)
    eval_prompts: int = 64
    # TinyHH: held-out prompts per set (benign, harmful, attack) judged by the oracle for the starting model and
    # the PPO model on the same prompts (0 = off); the pretraining loss (alignment tax) is measured alongside
    sample_eval: int = 200
    # generation budget for the oracle evaluation (TinyHH answers: up to ~95 tokens)
    eval_max_new_tokens: int = 96


# Llama 2's safety preprompts are of this kind; these are TinyHH's (its pretraining corpus contains them), so the
# TinyHH base model follows them.
DEFAULT_PREPROMPTS = list(SAFETY_PREPROMPTS)


@dataclass
class RejectionSamplingConfig:
    """Rejection-sampling fine-tuning (Llama 2 §3.2.3): K samples per prompt, the RM's best kept, SFT loss on them."""

    name: str = "rejection_sampling"  # run subdirectory name
    init_from: str = "${stage_dir:sft}/model"  # the starting model (samples iteration 1)
    # sample -> select -> fine-tune rounds; iteration i samples from iteration i-1's model
    iterations: int = 2
    prompts_per_iteration: int = 512  # prompts sampled per iteration (consecutive slices of a seeded order)
    samples_per_prompt: int = 8  # K answers per prompt; best-of-N curves run N = 1..K
    # sampling temperature per iteration, the last one repeated (Llama 2 re-tunes it per iteration; 1.2-1.3 was
    # best for 10-100 samples of its models)
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    keep: Keep = Keep.all  # all (Llama 2 RLHF-V3 on: best over the samples of ALL prior iterations) | last
    # start (each iteration fine-tunes init_from on the kept set) | previous
    train_from: TrainFrom = TrainFrom.start
    max_prompt_length: int = 128  # longer prompts are dropped (counted and logged)
    max_new_tokens: int = 96  # answer budget; answers without EOS by then get the missing-EOS treatment
    missing_eos: MissingEOS = MissingEOS.replace  # none | replace | subtract: as in stage=ppo
    missing_eos_penalty: float = 1.0  # penalty for an answer that did not end within max_new_tokens
    # answers without EOS within max_new_tokens: drop (Llama 2 fine-tunes on complete samples; a prompt whose every
    # answer is truncated keeps nothing) | keep (compete and train with an EOS appended: teaches stopping mid-answer)
    truncated: Truncated = Truncated.drop
    generation_batch_size: int = 64  # sequences per generate call per rank
    eval_prompts: int = 64  # held-out prompts (never sampled for training): mean RM score per model
    eval_temperature: float = 1.0  # sampling temperature of the held-out RM-score measurement
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the SFT loss on the kept samples
    # TinyHH: held-out prompts per set judged by the oracle for the starting and the final model (0 = off)
    sample_eval: int = 200
    eval_max_new_tokens: int = 96  # generation budget of the oracle evaluation


@dataclass
class ContextDistillationConfig:
    """Safety context distillation (Llama 2 §4.2.4): answers generated behind a safety preprompt, RM-gated, then
    distilled with the SFT loss into the model's answers to the prompt WITHOUT the preprompt."""

    name: str = "context_distillation"  # run subdirectory name
    init_from: str = "${stage_dir:sft}/model"  # teacher (with preprompt) and student
    n_prompts: int = 512  # prompts distilled (safety-tagged ones only when only_safety)
    # Llama 2: adversarial prompts only (on helpful prompts CD raises false refusals)
    only_safety: bool = True
    preprompts: list[str] = field(default_factory=lambda: list(DEFAULT_PREPROMPTS))  # one drawn per prompt
    # optional per-risk-category answer templates appended to the preprompt, keyed by the prompt row's
    # category_field value ("{category}" in a template is replaced by it); rows without a match get none.
    # Add one on the command line: '+stage.answer_templates.violence="Refuse ... {category} ..."'
    answer_templates: dict[str, str] = field(default_factory=dict)
    category_field: str = "category"  # prompt-row column naming the risk category
    # how the preprompt joins the prompt text (HH: before "Human:")
    prompt_template: str = "{preprompt}{prompt}"
    # Llama 2: keep a sample only when the gate RM scores it above the un-preprompted answer
    gate: bool = True
    # the (safety) RM of the gate; reward=llama2: ${reward.safety_model}
    gate_model: str = "${reward.reward_model}"
    gate_margin: float = 0.0  # required score gain of the preprompted answer over the plain one
    temperature: float = 1.0  # sampling temperature of both answers
    max_prompt_length: int = 160  # longest preprompted prompt in tokens; longer prompts are dropped (counted)
    max_new_tokens: int = 96  # answer budget
    # preprompted answers without EOS within max_new_tokens: drop (never distilled, counted) | keep (distilled with
    # an EOS appended: teaches stopping mid-answer)
    truncated: Truncated = Truncated.drop
    generation_batch_size: int = 64  # sequences per generate call per rank
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the SFT loss on the distilled rows
    # TinyHH: held-out prompts per set judged by the oracle for the starting model (with and without a preprompt)
    # and the distilled model (0 = off)
    sample_eval: int = 200
    eval_max_new_tokens: int = 96  # generation budget of the oracle evaluation


@dataclass
class SystemConfig:
    """One system of stage=eval: a model with a decoding, or the answers another stage already wrote."""

    model: str | None = None  # model directory or hub name (None: answers= gives the answers)
    # sample (temperature) | greedy | best_of_n (n samples, the reward model's best) | args (reward-guided
    # decoding, Khanov et al. 2024: top_k candidates per token, log p + reward_weight x RM score, the best) |
    # blockwise (Mudgal et al. 2024: n sampled continuations of block_size tokens, the RM's best, block by block)
    decoding: str = "sample"
    # sampling temperature of sample / best_of_n / blockwise; args: 0 = ARGS-greedy, > 0 = ARGS-stochastic
    temperature: float = 1.0
    n: int = 8  # best_of_n: samples per prompt; blockwise: candidate continuations per block
    top_k: int = 10  # args: candidate tokens per step (ARGS's k)
    reward_weight: float = 1.0  # args: w, the weight of the RM score against the log-probability
    block_size: int = 8  # blockwise: tokens per block
    preprompt: str = ""  # text shown before every prompt (a prompting baseline); the judge never sees it
    # a samples.jsonl with {set, prompt, <answers_field>} rows for the same prompts
    answers: str | None = None
    answers_field: str = "response"  # the field holding the answer (stage=rain's samples.jsonl: rain)
    # systems this one's rates are also differenced against (Newcombe intervals), besides stage.baseline
    compare_to: list[str] = field(default_factory=list)


def _default_systems() -> dict[str, Any]:
    def model(stage: str) -> str:
        return f"${{stage_dir:{stage}}}/model"

    systems = {
        "base": SystemConfig(model=model("pretrain")),
        # the RAIN paper's vanilla: the base model through HF generate()'s default, greedy decoding
        "base_greedy": SystemConfig(model=model("pretrain"), decoding="greedy"),
        "sft": SystemConfig(model=model("sft")),
        "sft_preprompt": SystemConfig(model=model("sft"), preprompt=DEFAULT_PREPROMPTS[0]),
        "sft_best_of_8": SystemConfig(model=model("sft"), decoding="best_of_n", n=8),
        # reward-guided decoding of SFT with the RM (alignlab/guided.py): ARGS-stochastic at T = 1, compared with
        # sampling SFT at T = 1; blockwise best-of-4 continuations of 8 tokens
        "sft_args": SystemConfig(model=model("sft"), decoding="args"),
        "sft_blockwise": SystemConfig(model=model("sft"), decoding="blockwise", n=4),
        "dpo": SystemConfig(model=model("dpo")),
        "ppo": SystemConfig(model=model("ppo")),
        "ppo_ptx": SystemConfig(model=model("ppo_ptx")),
        "grpo": SystemConfig(model=model("grpo")),
        "rloo": SystemConfig(model=model("rloo")),
        "rejection_sampling": SystemConfig(model=model("rejection_sampling")),
        "context_distillation": SystemConfig(model=model("context_distillation")),
        # RAIN against greedy (the paper's comparison) first, then against sampling at T = 1 (ours)
        "rain": SystemConfig(
            answers="${stage_dir:rain}/samples.jsonl",
            answers_field="rain",
            compare_to=["base_greedy", "base"],
        ),
    }
    # every field present, so stage.systems.x.n=4 overrides
    return {name: asdict(c) for name, c in systems.items()}


@dataclass
class EvalConfig:
    """Side-by-side evaluation: every system answers the same prompts, one judge, one report (results.json,
    report.md, PNG plots)."""

    name: str = "eval"  # run subdirectory name
    # name -> system (SystemConfig fields; unset ones take its defaults, checked when the stage starts); add one
    # with +stage.systems.<name>.model=..., drop one with ~stage.systems.<name>
    systems: dict[str, Any] = field(default_factory=_default_systems)
    skip_missing: bool = True  # skip (and list) systems whose model or answers file does not exist yet
    baseline: str = "sft"  # the system every other one is compared with first (win rates, report order)
    # oracle (TinyHH) | rm (the reward= model's score) | template (model-as-judge)
    judge: Judge = Judge.oracle
    judge_model: str = "${stage_dir:pretrain}/model"  # judge=template: the judging model
    # judge=template: {dialogue} {option_a} {option_b} (RAIN's format)
    judge_template: str = TINYHH_JUDGE_TEMPLATE
    # TinyHH eval sets
    prompt_sets: list[str] = field(default_factory=lambda: ["benign", "harmful", "attack"])
    # a TinyHH world with a held-out split (data.tinyhh.heldout_*): also its held-out sets (held-out topics,
    # held-out attack suffixes), reported as *_heldout rates beside the seen ones
    heldout: bool = True
    prompts: str = "tinyhh"  # tinyhh, or a file / hub dataset with `prompt` (and `set`) columns
    n_prompts: int = 200  # prompts per set (0 = all)
    max_new_tokens: int = 96  # answer budget
    batch_size: int = 32  # prompts per generate call
    reference: str = "${stage_dir:sft}/model"  # KL reference for sampled systems
    rm_score: bool = True  # also score every answer with the reward= model (when it exists)
    # held-out pretraining blocks per model for the alignment tax, tokenized with each model's own tokenizer (0 = off)
    ptx_blocks: int = 32
    # pretraining text of the tax (hub name or local file, `text` column; its first tenth, PPO's held-out split);
    # None = TinyHH's ptx data on data=tinyhh, otherwise the tax is not measured (logged, noted in report.md)
    ptx_source: str | None = None
    # answers a deployment serves, over which training compute is spread: a system's total cost is its training
    # FLOPs (every stage behind its models after pretraining, compute.json) + served_answers x its inference FLOPs
    # per answer (report.md's total column, total_cost.png)
    served_answers: int = 10000
    # training curves to plot (reward and KL per iteration): run directories with ppo/* metrics
    curves: list[str] = field(
        default_factory=lambda: [f"${{stage_dir:{s}}}" for s in ("ppo", "ppo_ptx", "grpo", "rloo")]
    )


@dataclass
class PipelineConfig:
    """Every stage in its own run directory, in dependency order, skipping finished ones; ends with stage=eval's
    report. Each stage runs as `python -m alignlab stage=<s>` with this command line's other overrides."""

    name: str = "pipeline"  # run subdirectory name (the pipeline's log, per-stage logs and pipeline.json)
    # stages to run (a subset is fine); by default those of `make demo` (docs/pipeline.md's table: all but dpo)
    stages: list[str] = field(default_factory=lambda: list(DEMO_STAGES))
    # stage -> extra overrides for that stage only, e.g. 'stage.overrides.ppo=["stage.kl_coef=0.05"]' (replaces
    # that stage's list). The defaults fit `make demo` into 20 minutes on 2 CPU cores (docs/pipeline.md).
    # alignlab/stages.py: the demo budget
    overrides: dict[str, list[str]] = field(default_factory=demo_budget)
    # stages to run again although finished with the same config
    rerun: list[str] = field(default_factory=list)
    # stages run at once when their inputs are ready (0 = auto: 1 with a GPU, else min(4, cores))
    jobs: int = 0
    # CPU threads per stage (OMP_NUM_THREADS; 0 = the cores shared among the stages that can run when it starts,
    # so a stage alone gets them all); an exported OMP_NUM_THREADS wins
    threads: int = 0
    refresh_s: float = 1.0  # seconds between progress updates


@dataclass
class RewardConfig:
    """How PPO and rejection sampling score a response: one reward model, or Llama 2's helpfulness + safety pair."""

    name: str = "rm"  # preset name
    # single (reward_model) | llama2 (helpful_model and safety_model, combined)
    kind: RewardKind = RewardKind.single
    reward_model: str = "${stage_dir:rm}/model"  # the RM for kind=single
    # helpfulness RM for kind=llama2 (stage=rm, stage.name=)
    helpful_model: str = "${stage_dir:rm_helpful}/model"
    safety_model: str = "${stage_dir:rm_safety}/model"  # safety RM for kind=llama2 (stage=rm, stage.name=)
    # Llama 2: use the safety score when sigmoid(R_s) < this, even on benign prompts
    safety_threshold: float = 0.15
    normalize: bool = True  # apply each RM's stored gain/bias (reward_normalization.json) before combining
    whiten: bool = True  # kind=llama2: whiten logit(R_c) per batch (Llama 2); kind=single ignores it
    batch_size: int = 32  # sequences per scoring forward


@dataclass
class Config:
    stage: Any = MISSING  # the stage to run; see `stage=` options in --help
    model: ModelConfig = MISSING  # model=<preset>: the model a stage builds or starts from
    data: DataConfig = MISSING  # data=<preset>: the data set (TinyHH, a hub data set or a local file)
    launcher: LauncherConfig = MISSING  # launcher=<preset>: how many processes run the stage, and how
    deepspeed: DeepSpeedConfig = MISSING  # deepspeed=<preset>: the ZeRO stage of the training engines
    logger: LoggerConfig = MISSING  # logger=<preset>: where metrics go besides metrics.jsonl
    experiment: ExperimentConfig = MISSING  # experiment=<preset>: a named set of presets
    reward: RewardConfig = MISSING  # reward=<preset>: how PPO and rejection sampling score an answer
    paths: PathsConfig = field(default_factory=PathsConfig)  # where runs and data go
    seed: int = 0  # global seed (torch, numpy, python; data shuffling)
    # the ONE directory this stage writes; in a -m sweep each job's own <hydra.sweep.dir>/<hydra.sweep.subdir>
    run_dir: str = "${alignlab_run_dir:${stage_dir:${stage.name}}}"
    # never: start fresh | auto: continue a training stage from the newest intact checkpoint in
    # <run_dir>/checkpoints whose config matches (else start fresh, saying why); the sbatch templates set auto
    resume: Resume = Resume.never
    keep_checkpoints: int = 2  # resumable checkpoints kept per run (older ones are deleted after a save)


def sweep_aware_run_dir(default: str) -> str:
    """run_dir's default: `default` (<runs>/<experiment>/<stage>) in a single run; in a -m sweep (basic launcher or
    submitit) the job's <hydra.sweep.dir>/<hydra.sweep.subdir>, so sweep points never share a run directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        if hydra.mode == RunMode.MULTIRUN:
            return f"{hydra.sweep.dir}/{hydra.sweep.subdir}"
    return default


def register_configs() -> None:
    """Register the schema, every stage of the registry (alignlab/stages.py) and the path resolvers (idempotent)."""
    OmegaConf.register_new_resolver("alignlab_run_dir", sweep_aware_run_dir, replace=True)
    OmegaConf.register_new_resolver("stage_dir", stage_dir, replace=True)
    OmegaConf.register_new_resolver("alignlab_stage_help", stage_help, replace=True)  # --help's stage.* block
    cs = ConfigStore.instance()
    cs.store(name="alignlab_schema", node=Config)
    for name, spec in STAGES.items():
        cs.store(group="stage", name=name, node=spec.schema_node())
    schemas = {
        "model": ModelConfig,
        "data": DataConfig,
        "launcher": LauncherConfig,
        "deepspeed": DeepSpeedConfig,
        "logger": LoggerConfig,
        "experiment": ExperimentConfig,
        "reward": RewardConfig,
    }
    for group, node in schemas.items():
        cs.store(group=f"schema/{group}", name="base", node=node)
