"""Training compute: the FLOPs a stage spent, counted from tokens and parameters, and the chain of stages behind a
model (what stage=eval charges a system for).

The estimate is Kaplan et al.'s (2020, "Scaling laws", C = 6ND): a forward pass costs 2 FLOPs per parameter per
token, the backward pass twice that. The backward pass has two halves: gradients with respect to the activations,
computed through every layer (2 x all parameters), and gradients of the trainable weights (2 x trainable
parameters). So training N parameters of which T are trainable costs (4N + 2T) per token: 6N for full
fine-tuning, about 4N with LoRA. Attention's context-dependent share is left out, as in C = 6ND; it is small at
these lengths.

Counted: every forward and backward a stage needs to train: the optimisation's own, the frozen models' forwards it
reads (DPO's reference, PPO's reference and critic), the answers it samples (through the KV cache: each position
once) and their scoring. Not counted: held-out evaluation (losses, the end-of-stage oracle judge), which does not
change the model.

Each training stage writes compute.json into its run directory: the FLOPs by part, the tokens by part, and the
models it started from (`inputs`). `chain` follows those inputs back to a model without a compute.json (a hub
model, or one trained elsewhere), so a system is charged for every stage behind it, each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alignlab.checkpoint import atomic_write_json

FORWARD_PER_PARAM_TOKEN = 2.0  # FLOPs per parameter per token of a forward pass
BACKWARD_PER_PARAM_TOKEN = 2.0  # each half of the backward pass: activation gradients, weight gradients
COMPUTE_FILE = "compute.json"
# next to an answers file (stage=rain's samples.jsonl): what each answer cost to decode, per answer field
ANSWER_COSTS = "inference_cost.json"
PRETRAIN_RECIPE = "pretrain"  # the recipe whose FLOPs are the base model's, reported apart from alignment's


def forward_flops(params: float, tokens: float) -> float:
    """A forward pass of `params` parameters over `tokens` positions."""
    return FORWARD_PER_PARAM_TOKEN * params * tokens


def train_flops(params: float, trainable: float, tokens: float) -> float:
    """Forward and backward over `tokens` positions: (4 x params + 2 x trainable) per token (6 x params when every
    parameter trains)."""
    return (FORWARD_PER_PARAM_TOKEN + BACKWARD_PER_PARAM_TOKEN) * params * tokens + (
        BACKWARD_PER_PARAM_TOKEN * trainable * tokens
    )


@dataclass
class Ledger:
    """A stage's compute by part (e.g. "train", "rollout", "reference", "reward"): FLOPs and token positions.

    Every rank must hold the same ledger (add what all ranks together computed), so any rank can write it and a
    checkpoint's copy resumes it."""

    flops: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)

    def add(self, part: str, flops: float, tokens: float) -> None:
        self.flops[part] = self.flops.get(part, 0.0) + float(flops)
        self.tokens[part] = self.tokens.get(part, 0.0) + float(tokens)

    def forward(self, part: str, params: float, tokens: float) -> None:
        self.add(part, forward_flops(params, tokens), tokens)

    def train(self, part: str, params: float, trainable: float, tokens: float) -> None:
        self.add(part, train_flops(params, trainable, tokens), tokens)

    def merge(self, other: Ledger) -> None:
        for part in other.flops:
            self.add(part, other.flops[part], other.tokens.get(part, 0.0))

    @property
    def total(self) -> float:
        return sum(self.flops.values())

    def as_dict(self) -> dict:
        return {"flops": dict(self.flops), "tokens": dict(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict | None) -> Ledger:
        d = d or {}
        return cls(dict(d.get("flops", {})), dict(d.get("tokens", {})))


def write(run_dir: str | Path, recipe: str, ledger: Ledger, inputs: list[str | Path | None]) -> Path:
    """compute.json: the recipe that ran (pretrain, sft, rm, ...; not the run's configurable name), its FLOPs
    (total and by part), its tokens by part, and the models it was trained from (inputs: the starting model, the
    reward and value models; None entries are left out)."""
    path = Path(run_dir) / COMPUTE_FILE
    atomic_write_json(
        path,
        {
            "recipe": recipe,
            "flops": ledger.total,
            "parts": ledger.flops,
            "tokens": ledger.tokens,
            "inputs": sorted({str(Path(p)) for p in inputs if p}),
        },
    )
    return path


def record_of(model_path: str | Path) -> Path | None:
    """The compute.json of the run that wrote a model directory (the directory itself, or its run directory one or
    two levels up: <run>/model, <run>/iteration_<i>/model), or None (a hub name, a model trained elsewhere)."""
    p = Path(model_path)
    for d in (p, p.parent, p.parent.parent):
        if (d / COMPUTE_FILE).is_file():
            return d / COMPUTE_FILE
    return None


@dataclass
class Chain:
    """The stages behind some models: each run's FLOPs once (a shared SFT model is charged once)."""

    runs: dict[str, dict] = field(default_factory=dict)  # compute.json path -> its record
    unknown: list[str] = field(
        default_factory=list
    )  # models without a record (their own training is not counted)

    @property
    def pretraining_flops(self) -> float:
        return sum(r["flops"] for r in self.runs.values() if r["recipe"] == PRETRAIN_RECIPE)

    @property
    def training_flops(self) -> float:
        """Every stage after pretraining: the alignment compute behind the models."""
        return sum(r["flops"] for r in self.runs.values() if r["recipe"] != PRETRAIN_RECIPE)


def chain(model_paths: list[str | Path]) -> Chain:
    """Follow each model's compute.json and its inputs back to models without one."""
    out = Chain()
    todo = [str(p) for p in model_paths if p]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        record = record_of(path)
        if record is None:
            out.unknown.append(path)
            continue
        key = str(record.resolve())
        if key in out.runs:
            continue
        try:
            out.runs[key] = data = json.loads(record.read_text())
        except ValueError as e:
            raise ValueError(
                f"{record}: not valid JSON ({e}); delete it or re-run the stage that wrote it"
            ) from e
        todo += [p for p in data.get("inputs", []) if p not in seen]
    out.unknown.sort()
    return out
