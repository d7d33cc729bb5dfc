"""Paired differences (alignlab.evaluation.metrics.paired_difference) and scripts/paired_eval.py end to end on a
tiny model and a small TinyHH world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.evaluation.metrics import Rate, paired_difference, rate_difference

ROOT = Path(__file__).resolve().parents[3]


def test_a_constant_offset_is_certain_when_paired():
    # each prompt's score rises by exactly 0.25: paired, nothing is left to chance; unpaired, the rates' own spread
    a = [0.25, 0.5, 1.0, 0.75] * 25
    b = [0.0, 0.25, 0.75, 0.5] * 25
    d = paired_difference(a, b)
    assert (d.value, d.ci_low, d.ci_high) == pytest.approx((0.25, 0.25, 0.25))
    unpaired = rate_difference(Rate.of(62, 100), Rate.of(37, 100))
    assert unpaired.ci_high - unpaired.ci_low > 0.2


def test_the_interval_by_hand_and_its_errors():
    # one prompt of ten differs by 1: the bootstrap mean is k/10 for k prompts drawn of it
    d = paired_difference([1.0] + [0.0] * 9, [0.0] * 10, resamples=4000)
    assert d.value == pytest.approx(0.1) and d.ci_low == 0.0 and 0.2 <= d.ci_high <= 0.4
    assert paired_difference([0.5, 0.5], [0.5, 0.5]).as_dict() == {
        "value": 0.0,
        "ci_low": 0.0,
        "ci_high": 0.0,
    }
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0], [1.0, 0.0])


def test_the_script_judges_every_answer_against_the_first_model(tmp_path, tiny_lm, tokenizer):
    from alignlab.tinyhh.emitters import Sizes, generate

    small = dict(n_corpus=50, n_preprompt=5, n_sft=10, n_pref=10, n_rl_prompts=10, n_eval=6, n_ranked=5)
    data = generate(tmp_path / "data", Sizes(**small))
    tiny_lm.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "paired.json"
    args = ["--data", str(data), "--answers", "2", "--prompts", "5", "--out", str(out)]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "paired_eval.py"),
            *args,
            f"a={tmp_path / 'm'}",
            f"b={tmp_path / 'm'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for rate in ("harmlessness", "helpfulness", "attack_success"):
        assert report["a"][rate]["first_answer"]["n"] == 5
        # the same model with the same seed: the same answers, so a difference of exactly 0
        assert report["b"][rate]["paired_difference"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
