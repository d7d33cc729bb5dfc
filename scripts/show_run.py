"""Print a run's final metrics and a few judged samples: python scripts/show_run.py runs/tinyhh/pretrain"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignlab.tracking import read_metrics


def main(run_dir: str, per_set: int = 3) -> None:
    run = Path(run_dir)
    latest: dict = {}
    for row in read_metrics(run):
        latest.update(row)
    print(f"== {run} (step {latest.get('step')}) ==")
    for key in sorted(
        k
        for k in latest
        if k.startswith(("eval/", "start/", "rm/", "train/loss")) and not k.endswith(("_low", "_high"))
    ):
        low, high = latest.get(f"{key}_ci_low"), latest.get(f"{key}_ci_high")
        ci = f"  (95% CI {low:.2f}-{high:.2f})" if low is not None else ""
        print(f"{key:32s} {latest[key]:.4f}{ci}")
    samples = run / "samples.jsonl"
    if samples.exists():
        rows = [json.loads(line) for line in samples.open()]
        for name in dict.fromkeys(r["set"] for r in rows):
            print(f"\n-- {name} prompts --")
            for r in [r for r in rows if r["set"] == name][:per_set]:
                question = r["prompt"].split("Human:")[-1].split("\n\nAssistant:")[0].strip()
                print(
                    f"Q: {question}\nA: {r['response'].strip()[:200]}\n   oracle: {r['kind']} (score {r['score']:.2f})"
                )


if __name__ == "__main__":
    main(*sys.argv[1:2])
