"""Preference pairs for the stages that learn from them (stage=rm, stage=dpo): any preference data through
`datasets`, canonical {prompt, chosen, rejected, rating?, is_safety?, row} rows, filtered to a subset."""

from __future__ import annotations

import logging

from alignlab.data.formats import canonicalize
from alignlab.data.loading import load_rows

log = logging.getLogger("alignlab.data")

SUBSETS = {"all": None, "helpful": False, "safety": True}  # subset -> required is_safety value


def in_subset(rows: list[dict], subset: str, source: str) -> list[dict]:
    """The rows of a subset (all | helpful | safety) by their is_safety flag."""
    wanted = SUBSETS[subset]
    if wanted is None:
        return rows
    if rows and "is_safety" not in rows[0]:
        raise ValueError(f"{source}: stage.subset={subset} needs an is_safety column")
    return [r for r in rows if bool(r["is_safety"]) == wanted]


def load_pairs(
    source: str, fmt: str, split: str, *, max_rows: int | None, on_malformed: str, subset: str
) -> tuple[list[dict], str]:
    """(rows, what was skipped as malformed: "" for nothing): canonical preference rows of `split` (the first
    max_rows of it), each with "row", its row in the source, filtered to `subset`."""
    ds = load_rows(source, split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    ds, report = canonicalize(ds, fmt, "preference", source=source, on_malformed=on_malformed)
    rows = [{**r, "row": n} for r, n in zip(ds.to_list(), report.kept, strict=True)]
    return in_subset(rows, subset, source), report.summary() if report.total else ""
