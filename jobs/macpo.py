"""MACPO: weak teachers and a strong student exchange contrastive DPO pairs over rounds.

    python -m jobs.macpo [--config configs/macpo.yaml] [--set rounds=2 ...] [--set seeds=[0,1,2]] [--overwrite]
    ray job submit --working-dir . -- python -m jobs.macpo --config configs/macpo.yaml

On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`; with `prepare: null`
it runs on your own teachers, student and pairs (configs/macpo_own.yaml).
A killed run continues when the same command is run again: finished stages are skipped, a training
stage resumes from its last checkpoint.
"""

from __future__ import annotations

from jobs.common import Tables, load, main, parse_args, run_seeds
from pipelines.judge import judged_tables
from pipelines.macpo import BASELINES, MACPOConfig, pairs_gold_rows, plot_pairs_gold, plot_rounds, run_macpo


def tables(metrics: dict) -> Tables:
    macpo = metrics["methods"]["macpo"]
    if "knowledge" not in macpo:  # your own models: the pairs of each round, and your judges' verdicts
        return [("Pairs of every round", macpo["pairs"]), *judged_tables(metrics)]
    rows = [{"round": r["round"], "agent": "student", **r["student"]} for r in macpo["rounds"]]
    rows += [{"round": r["round"], "agent": t["name"], **{k: t[k] for k in ("helpful", "harmless", "total")}}
             for r in macpo["rounds"] for t in r["teachers"]]
    baselines = [n for n in BASELINES if n in metrics["methods"]]
    return [("Reference models and baselines", [{"model": n, **s} for n, s in metrics["models"].items()]
             + [{"model": n, **metrics["methods"][n]} for n in baselines]),
            ("MACPO, every round (round 0 = initialisation)", rows),
            ("Gold reward of each round's pairs", pairs_gold_rows(macpo["pairs_gold_reward"])),
            ("What the teachers know (shares of the held-out facts)", [macpo["knowledge"]])]


def sections(per_seed: dict, mean: dict, std: dict, folder) -> list[str]:
    macpo, macpo_std = mean["methods"]["macpo"], std["methods"]["macpo"]
    if "knowledge" not in macpo:
        return []
    baselines = {n: mean["methods"][n] for n in BASELINES if n in mean["methods"]}
    plot_rounds(macpo["rounds"], {**mean["models"], **baselines},
                folder / "macpo_rounds.png", macpo_std)
    plot_pairs_gold(macpo["pairs_gold_reward"], folder / "macpo_pairs_gold.png", macpo_std["pairs_gold_reward"])
    return ["![rounds, mean and standard deviation over seeds](plots/macpo_rounds.png)",
            "![gold reward of the pairs, mean and standard deviation over seeds](plots/macpo_pairs_gold.png)"]


def macpo_job() -> None:
    args = parse_args(__doc__, "configs/macpo.yaml")
    run_seeds(load(MACPOConfig, args), run_macpo, tables, sections, args.overwrite)


if __name__ == "__main__":
    main(macpo_job)
