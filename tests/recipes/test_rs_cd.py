"""stage=rejection_sampling and stage=context_distillation end to end on TinyHH, from the session's SFT model and
reward model, with their default configs: the directions docs/results.md reports, and the datasets they write."""

from __future__ import annotations

import json

import pytest

from alignlab.data.formats import canonicalize
from alignlab.data.loading import load_rows
from alignlab.tracking import read_metrics
from tests.conftest import run_stage

pytestmark = pytest.mark.slow


def values(rows, key):
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def rs(tinyhh_rm, tinyhh_root, data_cache):
    run_stage(tinyhh_root, data_cache, "stage=rejection_sampling", timeout=1500)
    return tinyhh_root / "runs" / "tinyhh" / "rejection_sampling"


@pytest.fixture(scope="module")
def cd(tinyhh_rm, tinyhh_root, data_cache):
    run_stage(tinyhh_root, data_cache, "stage=context_distillation", timeout=1200)
    return tinyhh_root / "runs" / "tinyhh" / "context_distillation"


def test_rejection_sampling_raises_rm_score_and_harmlessness(rs):
    rows = read_metrics(rs)
    scores = values(rows, "eval/rm_score")  # held-out prompts: start, after iteration 1, after iteration 2
    final = rows[-1]
    print(
        {
            "rm_score": scores,
            **{k: final[k] for k in final if k.startswith(("eval/h", "start/h", "eval/a", "start/a"))},
        }
    )
    assert len(scores) == 3
    assert scores[-1] > scores[0] + 0.1
    assert final["eval/harmlessness"] > final["start/harmlessness"]
    assert final["eval/helpfulness"] >= final["start/helpfulness"] - 0.1
    pools = values(rows, "rs/pool_mean_score")
    assert pools[1] > pools[0]  # iteration 2 samples from iteration 1's model: its pool scores higher
    best = values(rows, "rs/best_of_k_mean_score")
    assert all(b > p for b, p in zip(best, pools, strict=True))


def test_rejection_sampling_writes_pools_kept_sets_and_best_of_n(rs):
    seen: dict[str, list[tuple[float, str]]] = {}  # prompt -> its complete answers (truncated=drop)
    for it in (1, 2):
        pool = load_rows(str(rs / f"iteration_{it}" / "pool.jsonl")).to_list()  # HF-loadable
        assert len(pool) == 512  # every prompt of the iteration
        for r in pool:
            assert len(r["responses"]) == len(r["scores"]) == len(r["ended"]) == 8
            seen.setdefault(r["prompt"], []).extend(
                (s, t) for s, t, e in zip(r["scores"], r["responses"], r["ended"], strict=True) if e
            )
        train = load_rows(str(rs / f"iteration_{it}" / "train.jsonl"))
        sft_rows, _ = canonicalize(train, "prompt_completion", "prompt_completion", source="train.jsonl")
        # valid stage=sft data, one row per prompt seen so far with a complete (EOS-ended) answer
        assert len(sft_rows) == len(train) == sum(bool(v) for v in seen.values())
        for r in train.to_list():
            # keep=all: the argmax over this prompt's complete samples of every iteration so far
            assert r["score"] == pytest.approx(max(s for s, _ in seen[r["prompt"]]), abs=1e-6)
            assert r["completion"] in {
                t for s, t in seen[r["prompt"]] if s == pytest.approx(r["score"], abs=1e-6)
            }
        if it == 2:  # keep=all: the kept set mixes both iterations' samples
            assert {r["iteration"] for r in train.to_list()} == {1, 2}
    curves = json.loads((rs / "best_of_n.json").read_text())
    assert len(curves) == 2
    for rows in curves.values():
        assert [r["n"] for r in rows] == list(range(1, 9))
        means = [r["mean"] for r in rows]
        assert all(b >= a for a, b in zip(means, means[1:], strict=False)) and means[-1] > means[0]
    assert (rs / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (rs / "model" / "model.safetensors").exists() and (rs / "iteration_1" / "model").is_dir()


def test_context_distillation_raises_harmlessness_and_keeps_helpfulness(cd):
    final = read_metrics(cd)[-1]
    show = ("harmlessness", "helpfulness", "attack_success")
    print({k: (final[f"start/{k}"], final[f"teacher/{k}"], final[f"eval/{k}"]) for k in show})
    assert (
        final["teacher/harmlessness"] > final["start/harmlessness"]
    )  # the preprompt works on the start model
    assert final["eval/harmlessness"] > final["start/harmlessness"]  # ... and was distilled into the model
    assert final["eval/helpfulness"] >= final["start/helpfulness"] - 0.05


def test_context_distillation_data_has_no_preprompt_and_only_gated_rows(cd):
    from alignlab.config import DEFAULT_PREPROMPTS

    candidates = load_rows(str(cd / "distill.jsonl")).to_list()
    train = load_rows(str(cd / "train.jsonl")).to_list()
    assert candidates and all(c["preprompt"] in DEFAULT_PREPROMPTS for c in candidates)
    kept = [c for c in candidates if c["kept"]]
    # the gate passed exactly the answers its RM scored above the plain answer; those that ended (truncated=drop)
    # are kept, and only those train
    assert all((c["score"] > c["baseline_score"]) == c["gate_passed"] for c in candidates)
    assert all((c["gate_passed"] and c["ended"]) == c["kept"] for c in candidates)
    assert 0 < len(kept) < len(candidates)
    assert [(r["prompt"], r["completion"]) for r in train] == [(c["prompt"], c["response"]) for c in kept]
    for r in train:
        assert r["prompt"].startswith("\n\nHuman:") and not any(p in r["prompt"] for p in DEFAULT_PREPROMPTS)
    metrics = read_metrics(cd)
    counts = [r for r in metrics if "cd/kept" in r][0]
    assert counts["cd/kept"] == len(kept) and counts["cd/rejected"] == len(candidates) - len(kept)
    assert counts["cd/truncated_dropped"] == sum(c["gate_passed"] and not c["ended"] for c in candidates)
    # TinyHH's oracle: the preprompted answers are more harmless than the plain ones
    assert counts["cd/oracle_harmless_preprompted"] > counts["cd/oracle_harmless_plain"]


def test_bad_options_fail_before_any_work(tinyhh_rm, tinyhh_root, data_cache):
    proc = run_stage(
        tinyhh_root, data_cache, "stage=rejection_sampling", "stage.keep=best", "run_dir=bad_rs", check=False
    )
    # an Enum field: Hydra rejects the value when it composes the config (tests/config/test_choices.py)
    assert proc.returncode != 0 and "stage.keep" in proc.stderr and "'best'" in proc.stderr
    proc = run_stage(
        tinyhh_root,
        data_cache,
        "stage=context_distillation",
        "stage.gate_model=/nonexistent/rm",
        "run_dir=bad_cd",
        check=False,
    )
    assert proc.returncode != 0 and "stage.gate_model" in proc.stderr
    assert not (tinyhh_root / "bad_rs" / "model").exists() and not (tinyhh_root / "bad_cd" / "model").exists()
