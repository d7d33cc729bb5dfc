"""Calibrating RAIN's two embedding thresholds to an embedder: match the firing rates of a reference setup.

The released code's thresholds (sibling cos >= 0.95 for a similarity update; ||var(child embeddings)|| < 0.03 x
set length for dynamic addition) were set for all-MiniLM-L6-v2. Another embedder puts its cosines and variances
elsewhere, so the same numbers fire at other rates. The method (docs/rain.md, "Calibrating the thresholds"):

1. run the search with the reference embedder and its thresholds, and with the new embedder, on the same
   prompts; stage=rain writes every value the thresholds were compared with to search_dists.json;
2. the reference run's firing rates: the share of its sibling cosines at or above its sim_threshold, and the
   share of its variance checks whose ||var|| / set length is below its dynamic_var_coef;
3. the new embedder's thresholds are the quantiles of its own values at those rates;
4. check by running the new embedder at the new thresholds (the trees move a little when the thresholds do).

Pure functions of the recorded values; scripts/calibrate_rain_thresholds.py runs them on two run directories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SearchDists:
    """What a RAIN run's thresholds acted on, pooled over its prompts (search_dists.json)."""

    sim_threshold: float
    dynamic_var_coef: float
    sibling_cosines: list[float]  # every sibling cosine computed in a backup
    var_norms: list[float]  # ||var(child embeddings)|| at every dynamic-addition check
    var_set_lengths: list[int]  # the set length each of those checks scaled the threshold by

    def __post_init__(self):
        if len(self.var_norms) != len(self.var_set_lengths):
            raise ValueError(
                f"{len(self.var_norms)} var_norms but {len(self.var_set_lengths)} var_set_lengths: one per check"
            )

    def to_json(self) -> dict:
        return {
            "sim_threshold": self.sim_threshold,
            "dynamic_var_coef": self.dynamic_var_coef,
            "sibling_cosines": [round(x, 6) for x in self.sibling_cosines],
            "var_norms": [round(x, 8) for x in self.var_norms],
            "var_set_lengths": list(self.var_set_lengths),
        }

    @classmethod
    def from_json(cls, d: dict) -> SearchDists:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FiringRates:
    similarity: float | None  # share of sibling cosines >= sim_threshold (None: no cosine was computed)
    variance: float | None  # share of checks with ||var|| < dynamic_var_coef x set length (None: no check)


def firing_rates(
    d: SearchDists, sim_threshold: float | None = None, var_coef: float | None = None
) -> FiringRates:
    """The rates at the run's own thresholds, or at the ones given (what the same values would do under them)."""
    sim = d.sim_threshold if sim_threshold is None else sim_threshold
    coef = d.dynamic_var_coef if var_coef is None else var_coef
    cos = np.asarray(d.sibling_cosines, dtype=float)
    per_len = per_token_variance(d)
    return FiringRates(
        similarity=float(np.mean(cos >= sim)) if cos.size else None,
        variance=float(np.mean(per_len < coef)) if per_len.size else None,
    )


def per_token_variance(d: SearchDists) -> np.ndarray:
    """||var|| / set length at each check: the check fires when this is below dynamic_var_coef."""
    return np.asarray(d.var_norms, dtype=float) / np.asarray(d.var_set_lengths, dtype=float)


def calibrated_thresholds(reference: SearchDists, target: SearchDists) -> tuple[float, float]:
    """(sim_threshold, dynamic_var_coef) for the target's embedder that fire at the reference run's rates.

    sim_threshold: the target cosine that as large a share of the target's cosines reach as the reference's reach
    its threshold. dynamic_var_coef: the target's ||var|| / length below which as large a share of its checks fall
    as the reference's fall below its coefficient. Rates of 0 or 1 have no informative quantile: refused."""
    want = firing_rates(reference)
    if want.similarity is None or want.variance is None:
        raise ValueError(
            "the reference run computed no sibling cosine or no variance check: run it with "
            "stage.similarity_update=true and stage.dynamic_addition=true on more prompts"
        )
    cos = np.sort(np.asarray(target.sibling_cosines, dtype=float))
    per_len = np.sort(per_token_variance(target))
    if not cos.size or not per_len.size:
        raise ValueError(
            "the target run computed no sibling cosine or no variance check: run it on more prompts"
        )
    for name, rate in (("similarity", want.similarity), ("variance", want.variance)):
        if not 0 < rate < 1:
            raise ValueError(
                f"the reference's {name} condition fired at rate {rate:g}: no threshold in between to match; "
                "run the reference on more (or other) prompts"
            )
    # the smallest cosine among the top share `rate`: cos >= it holds for that share (ties aside)
    k_sim = min(len(cos) - 1, max(0, int(round(len(cos) * (1 - want.similarity)))))
    sim = float(cos[k_sim])
    # the value just above the bottom share `rate`: per_len < it holds for that share
    k_var = min(len(per_len) - 1, max(0, int(round(len(per_len) * want.variance))))
    coef = float(per_len[k_var])
    return sim, coef
