"""Weak-to-strong generalization's bookkeeping as pure Python (Burns et al. 2024; ALGORITHMS.md section 4): the
three splits of a task, and what the weak-to-strong model did with the weak labels' mistakes."""

from __future__ import annotations

import random

SPLITS = ("train_gold", "train_weak", "test")


def split_groups(groups: list[list[dict]], test_share: float, seed: int) -> dict[str, list[dict]]:
    """Whole groups, shuffled by `seed`, into:

    train_gold: the weak supervisor is trained on its gold labels;
    train_weak: the held-out half the weak supervisor labels; the weak-to-strong model is trained on those weak
                labels, the strong ceiling on its gold labels;
    test:       `test_share` of the groups, where every model is scored.
    The two training halves are equally large (give or take a group)."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    order = list(groups)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(order) * test_share))
    half = (len(order) - n_test + 1) // 2
    if half == 0 or len(order) - n_test - half == 0:
        raise ValueError(f"{len(order)} groups are too few for a test split and two training halves")
    parts = {"test": order[:n_test], "train_gold": order[n_test:n_test + half], "train_weak": order[n_test + half:]}
    return {name: [row for group in part for row in group] for name, part in parts.items()}


def right(probs, labels) -> list[bool]:
    """Row by row: whether p > 0.5 says the gold class (labels 0/1)."""
    return [(p > 0.5) == (y > 0.5) for p, y in zip(probs, labels, strict=True)]


def pair_groups(pairs: list[dict]) -> list[list[dict]]:
    """Preference pairs (prompt, chosen, rejected, and any other fields, kept) as the rows of the pairwise task,
    one group per pair: it in both orders, response_a the chosen one (label 1) and the rejected one (label 0), so
    that any split of whole groups is balanced."""
    groups = []
    for pair in pairs:
        extra = {k: v for k, v in pair.items() if k not in ("prompt", "chosen", "rejected")}
        good, bad = pair["chosen"], pair["rejected"]
        groups.append([{"prompt": pair["prompt"], "response_a": good, "response_b": bad, "label": 1.0, **extra},
                       {"prompt": pair["prompt"], "response_a": bad, "response_b": good, "label": 0.0, **extra}])
    return groups


def accuracy(probs, labels) -> float:
    """Share of rows where p > 0.5 says the gold class (labels 0/1)."""
    return sum(right(probs, labels)) / len(labels)


def imitation(student, weak, labels) -> dict[str, float | int]:
    """What the student did where the weak supervisor was wrong (the errors a student should not learn):
    `weak_wrong` rows, the share where the student repeats the weak model's mistake (`copied`), and its
    accuracy where the weak model was right (`kept_right`)."""
    wrong = [(s > 0.5) == (w > 0.5) for s, w, y in zip(student, weak, labels, strict=True) if (w > 0.5) != (y > 0.5)]
    right = [(s > 0.5) == (y > 0.5) for s, w, y in zip(student, weak, labels, strict=True) if (w > 0.5) == (y > 0.5)]
    return {"weak_wrong": len(wrong), "copied": sum(wrong) / len(wrong) if wrong else None,
            "kept_right": sum(right) / len(right) if right else None}


def fit_logistic(features, labels, l2: float = 1e-2, steps: int = 100) -> tuple[float, float]:
    """(scale, bias) of the logistic regression p = sigmoid(scale x feature + bias) that best fits `labels`
    (probabilities of class 1, soft or 0/1) by cross-entropy: Newton's method on the standardized feature, with
    an L2 penalty `l2` on its slope (and a 100x smaller one on the bias) so that a feature that separates the
    classes gives a finite fit. A likelihood classifier starts from it (linear probing before fine-tuning)."""
    import numpy as np

    x, y = np.asarray(features, np.float64), np.asarray(labels, np.float64)
    mean, std = x.mean(), x.std() or 1.0
    z = (x - mean) / std
    w = np.zeros(2)  # slope on z, bias
    design = np.stack([z, np.ones_like(z)], axis=1)
    penalty = np.array([l2, l2 / 100])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ w)))
        gradient = design.T @ (p - y) / len(y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + np.diag(penalty)
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0] / std), float(w[1] - w[0] * mean / std)


def accuracy_by_band(rows: list[dict], probs: dict[str, list[float]], band_of: dict[str, str]) -> list[dict]:
    """Each model's test accuracy per band of the rows (`band_of`: entity -> band, e.g. its popularity in the
    pretraining corpus), over the rows that ask about an entity (a fact question: `q: <entity> <attribute>?`);
    rows of another kind or another dimension (`dimension` harmless) are left out."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        entity = row["prompt"].removeprefix("q: ").split(" ")[0]
        if row.get("dimension", "helpful") == "helpful" and entity in band_of:
            groups.setdefault(band_of[entity], []).append(i)
    return [{"band": band, "rows": len(index),
             **{name: accuracy([p[i] for i in index], [rows[i]["label"] for i in index]) for name, p in probs.items()}}
            for band, index in sorted(groups.items())]
