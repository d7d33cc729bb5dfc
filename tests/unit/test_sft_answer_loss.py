"""AnswerLossSFTTrainer (alignlab/finetune.py) computes TRL's loss (and its metrics) without TRL's chunked LM-head
kernel."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from alignlab.data.examples import sft_example
from alignlab.finetune import AnswerLossSFTTrainer

ROWS = [
    ("Human : hi Assistant :", "hello ."),
    ("Human : how like this ? Assistant :", "yes like this . no"),
    ("Human : a b c d ? Assistant : sure . Human : no ? Assistant :", "a b"),
    ("Human : hello Assistant :", "hi hi hi hi hi hi ."),
]


def trainer(cls, lm, tokenizer, tmp_path, accum: int = 1):
    data = Dataset.from_list([sft_example(tokenizer, p, c, "last_turn") for p, c in ROWS])
    args = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accum,
        max_steps=1, report_to=[], use_cpu=True, completion_only_loss=True, max_length=64,
        activation_checkpointing=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return cls(model=lm, args=args, train_dataset=data, processing_class=tokenizer)


def test_same_loss_gradients_and_metrics_as_trl(tiny_lm, tokenizer, tmp_path):
    ours = trainer(AnswerLossSFTTrainer, copy.deepcopy(tiny_lm), tokenizer, tmp_path / "a")
    trl = trainer(SFTTrainer, copy.deepcopy(tiny_lm), tokenizer, tmp_path / "b")
    batch = next(iter(ours.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (
        batch["attention_mask"] == 0
    ).any()  # masked prompt and padding
    results = {}
    for name, t in (("ours", ours), ("trl", trl)):
        t.model.train()
        for n_items in (
            None,
            torch.tensor(37),
        ):  # grad accumulation: TRL divides by the accumulated token count
            t.model.zero_grad()
            loss = t.compute_loss(t.model, dict(batch), num_items_in_batch=n_items)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])
            results[name, n_items is None] = (loss.detach(), grads)
        results[name, "metrics"] = {k: v[0] for k, v in t._metrics["train"].items()}
    for key in (True, False):
        assert torch.allclose(results["ours", key][0], results["trl", key][0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(results["ours", key][1], results["trl", key][1], rtol=1e-4, atol=1e-6)
    ours_m, trl_m = results["ours", "metrics"], results["trl", "metrics"]
    assert set(ours_m) == set(trl_m) == {"entropy", "mean_token_accuracy", "num_tokens"}
    for k in ours_m:
        assert abs(ours_m[k] - trl_m[k]) < 1e-4 * max(1.0, abs(trl_m[k])), k


def test_packed_batches_take_trls_path(tiny_lm, tokenizer, tmp_path):
    t = trainer(AnswerLossSFTTrainer, tiny_lm, tokenizer, tmp_path)
    batch = next(iter(t.get_train_dataloader()))
    assert t._plain(batch)
    t.args.padding_free = True
    assert not t._plain(batch)
    t.args.padding_free, t.fused_lm_head = False, True  # stage.fused_lm_head=true: TRL's chunked kernel
    assert not t._plain(batch)


def test_trainer_stages_do_not_checkpoint_activations_unless_asked(tmp_path):
    """TRL's SFTConfig/RewardConfig default to activation checkpointing; alignlab's stages turn it on only by config."""
    from types import SimpleNamespace

    from trl import RewardConfig

    from alignlab.trainer_bridge import trainer_arguments
    from tests.config.test_compose import compose_cfg

    run = SimpleNamespace(env=SimpleNamespace(world_size=1, is_main=True), run_dir=tmp_path)
    for stage, cls in (("sft", SFTConfig), ("rm", RewardConfig)):
        for overrides, expected in (((), False), (("stage.gradient_checkpointing=true",), True)):
            cfg = compose_cfg(f"stage={stage}", *overrides)
            args = trainer_arguments(
                cls, run=run, ds_cfg=cfg.deepspeed, stage=cfg.stage, steps=10, dtype=torch.float32, seed=0,
                show_progress=False, with_eval=stage == "sft",
            )  # fmt: skip
            assert args.activation_checkpointing is expected, (stage, overrides)
    cfg = compose_cfg("stage=sft", "stage.group_by_length=true")
    args = trainer_arguments(
        SFTConfig, run=run, ds_cfg=cfg.deepspeed, stage=cfg.stage, steps=10, dtype=torch.float32, seed=0,
        show_progress=False,
    )  # fmt: skip
    assert args.train_sampling_strategy == "group_by_length"


def test_stage_compile_keeps_the_numbers_and_the_saved_weights(tiny_lm, tokenizer, tmp_path):
    """stage.compile=true compiles the model in place (nn.Module.compile): same loss, same state-dict keys."""
    eager = trainer(AnswerLossSFTTrainer, copy.deepcopy(tiny_lm), tokenizer, tmp_path / "a")
    compiled_lm = copy.deepcopy(tiny_lm)
    compiled_lm.compile(dynamic=True)
    compiled = trainer(AnswerLossSFTTrainer, compiled_lm, tokenizer, tmp_path / "b")
    batch = next(iter(eager.get_train_dataloader()))
    losses = [t.compute_loss(t.model, dict(batch)).detach() for t in (eager, compiled)]
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert list(compiled_lm.state_dict()) == list(tiny_lm.state_dict())
