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


def accuracy(probs, labels) -> float:
    """Share of rows where p > 0.5 says the gold class (labels 0/1)."""
    return sum((p > 0.5) == (y > 0.5) for p, y in zip(probs, labels, strict=True)) / len(labels)


def imitation(student, weak, labels) -> dict[str, float | int]:
    """What the student did where the weak supervisor was wrong (the errors a student should not learn):
    `weak_wrong` rows, the share where the student repeats the weak model's mistake (`copied`), and its
    accuracy where the weak model was right (`kept_right`)."""
    wrong = [(s > 0.5) == (w > 0.5) for s, w, y in zip(student, weak, labels, strict=True) if (w > 0.5) != (y > 0.5)]
    right = [(s > 0.5) == (y > 0.5) for s, w, y in zip(student, weak, labels, strict=True) if (w > 0.5) == (y > 0.5)]
    return {"weak_wrong": len(wrong), "copied": sum(wrong) / len(wrong) if wrong else None,
            "kept_right": sum(right) / len(right) if right else None}
