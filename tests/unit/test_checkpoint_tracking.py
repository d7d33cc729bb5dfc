import json

import pytest

from alignlab.checkpoint import atomic_dir, atomic_write_json
from alignlab.tracking import Tracker, read_metrics, resolve_wandb_mode


def test_atomic_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "weights").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp debris


def test_atomic_dir_replaces_on_success(tmp_path):
    out = tmp_path / "model"
    for v in ("v1", "v2"):
        with atomic_dir(out) as d:
            (d / "weights").write_text(v)
    assert (out / "weights").read_text() == "v2"


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_tracker_writes_only_on_main(tmp_path):
    main, other = Tracker(tmp_path / "a", is_main=True), Tracker(tmp_path / "b", is_main=False)
    for t in (main, other):
        t.log({"train/loss": 1.5, "bad": float("nan")}, step=3)
        t.close()
    assert read_metrics(tmp_path / "a")[0]["train/loss"] == 1.5
    assert read_metrics(tmp_path / "a")[0]["bad"] == "nan"
    assert not (tmp_path / "b").exists()


def test_wandb_mode_resolution():
    assert resolve_wandb_mode(None, {}) == "offline"
    assert resolve_wandb_mode(None, {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode(None, {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "offline"}) == "online"


# W&B through Tracker (read back from the offline run, media, resume, the sync hint): test_tracking_wandb.py
