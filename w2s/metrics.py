"""Metrics shared by every method (pure Python)."""

from __future__ import annotations

import statistics


def pgr(weak_to_strong: float, weak: float, strong_ceiling: float) -> float | None:
    """Performance Gap Recovered (Burns et al. 2024); None where the ceiling does not beat the weak model."""
    if strong_ceiling <= weak:
        return None
    return (weak_to_strong - weak) / (strong_ceiling - weak)


def median_pgr(values: list[float | None]) -> float | None:
    """Median over seeds/tasks of the PGRs that are defined."""
    defined = [v for v in values if v is not None]
    return statistics.median(defined) if defined else None


def gold_scores(rows: list[dict]) -> dict[str, float]:
    """Mean gold reward per prompt kind, and their mean as `total`.

    rows: dicts with `kind` ("helpful"/"harmful") and `gold_reward`.
    """
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["gold_reward"])
    scores = {"helpful": statistics.fmean(by_kind.get("helpful", [0.0])),
              "harmless": statistics.fmean(by_kind.get("harmful", [0.0]))}
    scores["total"] = (scores["helpful"] + scores["harmless"]) / 2
    return scores
