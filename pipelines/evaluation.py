"""Gold-reward evaluation on the embedded world (or any task with a `gold_reward`, w2s.real_task), shared by every job.

Every model generates on the held-out prompts through model-hosting actors (one group, so the
models run side by side); the world's gold reward scores each response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from actors.workers import Workers
from w2s.config import StrictModel
from w2s.metrics import gold_scores
from w2s.modeling import ModelSpec
from w2s.runs import markdown_cell, markdown_table


class GoldReward(Protocol):
    """What has a gold reward: the embedded world (w2s.world.World) and the real-model task (w2s.real_task)."""

    def gold_reward(self, row: dict, response: str) -> float: ...


class GenerationConfig(StrictModel):
    """How every model generates (its fields are Workers.generate's keyword arguments)."""

    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(100, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    seed: int = 0


def gold_evaluate(world: GoldReward, prompts_path: Path, models: dict[str, Path], generation: GenerationConfig,
                  workers: Workers) -> tuple[dict[str, dict], pa.Table]:
    """Scores {model: {helpful, harmless, total}} and the generations (`<model>_response`, `<model>_gold`).

    Models with the same weights generate once (naive SFT is the student's round 0), and the distinct
    ones go through the job's hosts as many at a time as it has."""
    prompts = pq.read_table(prompts_path)
    print(f"[evaluate] generating on {prompts.num_rows} held-out prompts with {', '.join(models)}", flush=True)
    prompts = workers.generate(prompts, {name: ModelSpec(path=str(path)) for name, path in models.items()},
                               **generation.model_dump())
    rows = prompts.to_pylist()
    scores = {}
    for name in models:
        for row in rows:
            row[f"{name}_gold"] = world.gold_reward(row, row[f"{name}_response"])
        scores[name] = gold_scores([{"kind": r["kind"], "gold_reward": r[f"{name}_gold"]} for r in rows])
    return scores, pa.Table.from_pylist(rows)


def distinct_facts(generations: pa.Table) -> dict[str, dict]:
    """The helpful rows of an evaluation, one per distinct prompt (held-out prompts may ask a fact twice)."""
    return {row["prompt"]: row for row in generations.to_pylist() if row["kind"] == "helpful"}


def knowledge_transfer(generations: pa.Table, model: str, weak: str = "weak_aligned",
                       strong: str = "strong_base") -> dict:
    """Whose knowledge `model` answers with, on the distinct held-out fact prompts.

    `only_strong_knew`: facts the strong base gets right and the weak model wrong; there, the share
    `model` gets right (`right_there`) and the share where it writes the weak model's wrong answer word
    for word (`weak_answer_there`: copied ignorance). `weak_knew`: facts the weak model gets right; the
    share `model` keeps right there (`right_where_weak_knew`).
    """
    facts = distinct_facts(generations)
    only_strong = [r for r in facts.values() if r[f"{strong}_gold"] == 1.0 and r[f"{weak}_gold"] == 0.0]
    weak_knew = [r for r in facts.values() if r[f"{weak}_gold"] == 1.0]

    def share(rows: list, hit) -> float | None:
        return sum(map(hit, rows)) / len(rows) if rows else None

    return {"model": model, "only_strong_knew": len(only_strong),
            "right_there": share(only_strong, lambda r: r[f"{model}_gold"] == 1.0),
            "weak_answer_there": share(only_strong, lambda r: r[f"{model}_response"].strip() == r[f"{weak}_response"].strip()),
            "weak_knew": len(weak_knew), "right_where_weak_knew": share(weak_knew, lambda r: r[f"{model}_gold"] == 1.0)}


def examples_table(generations: pa.Table, models: list[str], n: int = 6) -> str:
    """The first `n` held-out prompts and every model's response, as a Markdown table."""
    rows = generations.slice(0, n).to_pylist()
    return markdown_table([{"kind": r["kind"], "prompt": markdown_cell(r["prompt"]),
                            **{m: markdown_cell(r[f"{m}_response"]) for m in models}} for r in rows])


def plot_scores(scores: dict, path: Path, errors: dict | None = None) -> None:
    """Grouped bars: helpful, harmless and total gold reward of each model (with `errors`, the same
    shape of standard deviations over seeds, as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, keys = list(scores), ["helpful", "harmless", "total"]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(names)), 3.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(names))], [scores[n][key] for n in names], width, label=key,
               yerr=[errors[n][key] for n in names] if errors else None, capsize=2)
    ax.set_xticks([x + width for x in range(len(names))], names, fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("gold reward")
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(xs: list | dict[str, list], series: dict[str, tuple], references: dict[str, tuple[float, str]],
               xlabel: str, path: Path, log_x: bool = False, ylabel: str = "gold reward",
               ylim: tuple[float, float] | None = None) -> None:
    """Gold reward (or `ylabel`, on its own scale) against `xs`: one line per series `{label: (ys, matplotlib
    style[, standard deviations])}` (error bars when given), and a dotted horizontal line per reference model
    `{label: (score, colour)}`. `xs`: the x values every series shares (each one labelled), or each series' own,
    `{label: xs}`. `ylim`: the y range (a gold reward's is [0, 1]; a judge's score has a scale of its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = not isinstance(xs, dict)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (ys, style, *errors) in series.items():
        ax.errorbar(xs if shared else xs[label], ys, yerr=errors[0] if errors else None, fmt=style, label=label,
                    capsize=3)
    for label, (score, color) in references.items():
        ax.axhline(score, color=color, linestyle=":", label=label)
    if log_x:
        ax.set_xscale("log")
    if shared:
        ax.minorticks_off()  # only the given xs are labelled
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim or ylabel == "gold reward":
        ax.set_ylim(*(ylim or (0, 1.05)))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
