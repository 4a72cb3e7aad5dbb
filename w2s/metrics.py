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


def knowledge_overlap(known: dict[str, dict]) -> dict[str, float]:
    """Shares of the facts that each model knows, that at least one knows (`any`) and that all know (`all`).

    known: {model: {fact: bool}}, every model judged on the same facts.
    """
    facts = list(next(iter(known.values()))) if known else []
    if not facts or any(set(k) != set(facts) for k in known.values()):
        raise ValueError("knowledge_overlap: every model must be judged on the same, non-empty set of facts")
    shares = {name: sum(map(bool, k.values())) / len(facts) for name, k in known.items()}
    shares["any"] = sum(any(k[f] for k in known.values()) for f in facts) / len(facts)
    shares["all"] = sum(all(k[f] for k in known.values()) for f in facts) / len(facts)
    return shares


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), median, min and max of one metric over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


def over_seeds(runs: list) -> object:
    """The metrics of several seeds folded into one structure of the same shape.

    Every number becomes `mean_and_spread` of it over the seeds (with `n`, the seeds where it is
    defined: a PGR is None where the ceiling does not beat the weak model); dicts and equally long
    lists are folded key by key and item by item; other values (and integers that no seed changes, such
    as round numbers) are kept where every seed agrees.
    """
    first = runs[0]
    if all(isinstance(r, dict) for r in runs):
        return {k: over_seeds([r[k] for r in runs]) for k in first if all(k in r for r in runs)}
    if all(isinstance(r, list) for r in runs) and len({len(r) for r in runs}) == 1:
        return [over_seeds(list(items)) for items in zip(*runs)]
    if all(type(r) is int for r in runs) and all(r == first for r in runs):
        return first  # a round number or a count that no seed changes
    numbers = [r for r in runs if isinstance(r, (int, float)) and not isinstance(r, bool)]
    if numbers and len(numbers) + sum(r is None for r in runs) == len(runs):
        return {**mean_and_spread([float(v) for v in numbers]), "n": len(numbers)}
    return first if all(r == first for r in runs) else None


def verdict_by_reward(reward: float, reference: float, tie_margin: float) -> str:
    """"win" / "tie" / "lose" of one response against the reference's to the same prompt: a tie when the two
    rewards are within `tie_margin` of each other."""
    if reward > reference + tie_margin:
        return "win"
    return "lose" if reward < reference - tie_margin else "tie"


def pairwise_verdict(model_as_a: float, model_as_b: float) -> str:
    """A pairwise judge's verdict from both orders, which cancels its position bias. Each argument is the judge's
    log p("A") - log p("B") in one order: the model's response shown as A (and the reference's as B), then the
    other way round. "win" when both orders prefer the model (> 0, then < 0), "lose" when both prefer the
    reference, "tie" otherwise: a judge that picks the same position whatever the responses says nothing."""
    if model_as_a > 0 and model_as_b < 0:
        return "win"
    return "lose" if model_as_a < 0 and model_as_b > 0 else "tie"


def verdict_shares(verdicts: list[str]) -> dict[str, float]:
    """{win, tie, lose}: the share of each verdict."""
    return {v: sum(x == v for x in verdicts) / len(verdicts) for v in ("win", "tie", "lose")}
