"""RAIN's embedding thresholds for an embedder, calibrated to a reference run's firing rates (alignlab.rain.calibrate).

    # 1. the reference: the authors' embedder at the released thresholds
    python -m alignlab stage=rain stage.name=rain_minilm stage.embedder=sentence_transformers \\
        stage.sentence_model=/path/to/all-MiniLM-L6-v2 stage.sim_threshold=0.95 stage.dynamic_var_coef=0.03
    # 2. the embedder to calibrate, on the same prompts
    python -m alignlab stage=rain stage.name=rain_lm stage.embedder=lm
    # 3. its thresholds
    python scripts/calibrate_rain_thresholds.py runs/tinyhh/rain_minilm runs/tinyhh/rain_lm
    # 4. check: run 2 again with the printed overrides; this script on runs 1 and 4 shows the rates side by side

Each run directory holds search_dists.json (written by stage=rain): every sibling cosine and every dynamic-addition
variance check its search computed. Prints the rates of both runs and the thresholds that give the target's
embedder the reference's rates, as overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignlab.rain.calibrate import (  # noqa: E402
    SearchDists,
    calibrated_thresholds,
    firing_rates,
    per_token_variance,
)


def load(run: Path) -> SearchDists:
    path = run / "search_dists.json"
    if not path.exists():
        sys.exit(
            f"{path} not found: run stage=rain into {run} first (alignlab writes it when every prompt was searched)"
        )
    return SearchDists.from_json(json.loads(path.read_text()))


def describe(name: str, d: SearchDists) -> str:
    r = firing_rates(d)
    cos, var = np.asarray(d.sibling_cosines), per_token_variance(d)

    def pct(x: np.ndarray) -> str:
        return " / ".join(f"{np.percentile(x, q):.3g}" for q in (10, 50, 90)) if x.size else "-"

    def share(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    return (
        f"| {name} | {d.sim_threshold:g} | {len(cos)} | {pct(cos)} | {share(r.similarity)} | "
        f"{d.dynamic_var_coef:g} | {len(var)} | {pct(var)} | {share(r.variance)} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path, help="run directory of the reference embedder (e.g. MiniLM)")
    ap.add_argument("target", type=Path, help="run directory of the embedder to calibrate")
    args = ap.parse_args()
    ref, target = load(args.reference), load(args.target)
    try:
        sim, coef = calibrated_thresholds(ref, target)
    except ValueError as e:
        sys.exit(f"cannot calibrate: {e}")
    lines = [
        "| run | sim_threshold | sibling cosines | cos p10 / p50 / p90 | similarity updates | dynamic_var_coef | "
        "variance checks | ‖var‖/len p10 / p50 / p90 | variance condition holds |",
        "|---|---|---|---|---|---|---|---|---|",
        describe(f"reference ({args.reference.name})", ref),
        describe(f"target ({args.target.name})", target),
    ]
    at = firing_rates(target, sim_threshold=sim, var_coef=coef)
    lines.append(
        f"\nAt the calibrated thresholds the target's own values fire at {100 * at.similarity:.1f}% "
        f"(similarity) and {100 * at.variance:.1f}% (variance), the reference's rates; a run at them moves its "
        "trees a little, so check with a new run."
    )
    lines.append(f"\nstage.sim_threshold={sim:.4g} stage.dynamic_var_coef={coef:.4g}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
