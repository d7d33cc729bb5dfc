"""The Trainer bridge (alignlab/trainer_bridge.py): real TrainerCallbacks, namespaced metric names, step counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import TrainerCallback, TrainerControl, TrainerState

from alignlab.trainer_bridge import CheckpointCallback, TrackerCallback, steps_for, trainer_metric_name


class FakeTracker:
    def __init__(self):
        self.rows = []

    def log(self, row, step):
        self.rows.append((step, row))


def test_callbacks_are_trainer_callbacks_and_a_misspelled_hook_is_not_swallowed():
    run = SimpleNamespace(preemption=None, config={}, env=None, keep_checkpoints=2)
    for cb in (TrackerCallback(FakeTracker()), CheckpointCallback(run)):
        assert isinstance(cb, TrainerCallback)
        assert callable(cb.on_epoch_end)  # a hook it does not override: TrainerCallback's no-op
        with pytest.raises(AttributeError):
            cb.on_step_ending  # noqa: B018  (no such hook: an error, not a silent no-op)


def test_metric_names_by_hand():
    assert trainer_metric_name("loss") == "train/loss"
    assert trainer_metric_name("learning_rate") == "train/lr"
    assert trainer_metric_name("eval_loss") == "eval/loss"
    assert trainer_metric_name("num_tokens") == "train/num_tokens"
    assert trainer_metric_name("total_flos") is None
    # TRL's DPO keys: one name under the namespace, never eval/<something>/<metric> (stage=eval's system keys)
    assert trainer_metric_name("rewards/accuracies") == "train/reward_accuracy"
    assert trainer_metric_name("eval_rewards/margins") == "eval/reward_margin"
    assert trainer_metric_name("eval_logps/chosen") == "eval/logp_chosen"
    assert trainer_metric_name("some/new_key") == "train/some_new_key"


def test_tracker_callback_logs_namespaced_keys_at_the_offset_step():
    tracker = FakeTracker()
    cb = TrackerCallback(tracker, step_offset=100)
    state = TrainerState(global_step=3, max_steps=10)
    state.is_world_process_zero = True
    cb.on_log(
        None, state, TrainerControl(), logs={"loss": 1.5, "eval_loss": 2.0, "total_flos": 9.0, "s": "x"}
    )
    assert tracker.rows == [(103, {"train/loss": 1.5, "eval/loss": 2.0})]
    cb.on_evaluate(None, state, TrainerControl(), metrics={"eval_loss": 2.0})
    assert cb.evaluations == [(103, {"eval_loss": 2.0})]
    # the Trainer's end-of-training summary of a run a signal stopped early is not the run's mean loss
    cb.on_log(None, state, TrainerControl(), logs={"train_loss": 1.0})
    assert len(tracker.rows) == 1


def test_steps_for_by_hand():
    stage = SimpleNamespace(steps=0, epochs=2, batch_size=8)
    assert steps_for(stage, 20) == 5  # ceil(2 * 20 / 8)
    assert steps_for(stage, 0) == 1  # at least one step
    assert steps_for(SimpleNamespace(steps=7, epochs=2, batch_size=8), 20) == 7
