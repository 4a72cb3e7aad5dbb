"""Weak-to-strong search: the strong base guided at test time by the weak aligned vs weak base pair (CBS), beside
plain sampling, Best-of-N and EFT, at matched budgets.

    python -m jobs.search [--config configs/search.yaml] [--set cbs.w=2 --set cbs.k=2 ...]
    ray job submit --working-dir . -- python -m jobs.search --config configs/search.yaml

On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`. Your own models by path
(`prepare: null`, `models: {strong, tuned, untuned}`) search on the prompts of an `evaluate:` section, judged by
its judges: configs/search_own.yaml.
"""

from __future__ import annotations

from jobs.common import Tables, load, main, parse_args, run_seeds
from pipelines.judge import judged_tables
from pipelines.search import SearchConfig, method_table, plot_budget, run_search


def tables(metrics: dict) -> Tables:
    budget = ("Budget: CBS and Best-of-N at the same rows per prompt", metrics["budget_sweep"])
    if "evaluation" in metrics:  # your own models: your judges' scores
        return [*judged_tables(metrics), budget]
    return [("Gold reward (PGR on total, against weak_aligned and strong_ceiling)",
             method_table(metrics["models"], metrics["methods"])), budget]


def sections(per_seed: dict, mean: dict, std: dict, folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    if "evaluation" in mean:
        plot_budget(mean["budget_sweep"], mean["evaluation"], folder / "budget.png", "reward_mean")
        return ["![your reward model's score against strong tokens per prompt, mean over seeds](plots/budget.png)"]
    plot_budget(mean["budget_sweep"], mean["models"], folder / "budget.png")
    return ["![gold reward against strong tokens per prompt, mean over seeds](plots/budget.png)"]


def search_job() -> None:
    args = parse_args(__doc__, "configs/search.yaml")
    run_seeds(load(SearchConfig, args), run_search, tables, sections, args.overwrite)


if __name__ == "__main__":
    main(search_job)
