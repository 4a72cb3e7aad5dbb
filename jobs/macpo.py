"""MACPO: weak teachers and a strong student exchange contrastive DPO pairs over rounds.

    python -m jobs.macpo [--config configs/macpo.yaml] [--set rounds=2 ...] [--set seeds=[0,1,2]] [--resume]
    ray job submit --working-dir . -- python -m jobs.macpo --config configs/macpo.yaml

On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`.
A killed run continues with --resume: finished stages are skipped, a training stage resumes from
its last checkpoint.
"""

from __future__ import annotations

import sys

from jobs.common import Tables, load, parse_args, run_seeds
from pipelines.macpo import MACPOConfig, RunExistsError, pairs_gold_rows, plot_pairs_gold, plot_rounds, run_macpo


def tables(metrics: dict) -> Tables:
    macpo = metrics["methods"]["macpo"]
    rows = [{"round": r["round"], "agent": "student", **r["student"]} for r in macpo["rounds"]]
    rows += [{"round": r["round"], "agent": t["name"], **{k: t[k] for k in ("helpful", "harmless", "total")}}
             for r in macpo["rounds"] for t in r["teachers"]]
    return [("Reference models and naive SFT", [{"model": n, **s} for n, s in metrics["models"].items()]
             + [{"model": "naive_sft", **metrics["methods"]["naive_sft"]}]),
            ("MACPO, every round (round 0 = initialisation)", rows),
            ("Gold reward of each round's pairs", pairs_gold_rows(macpo["pairs_gold_reward"])),
            ("What the teachers know (shares of the held-out facts)", [macpo["knowledge"]])]


def sections(per_seed: dict, mean: dict, std: dict, folder) -> list[str]:
    macpo, macpo_std = mean["methods"]["macpo"], std["methods"]["macpo"]
    plot_rounds(macpo["rounds"], {**mean["models"], "naive_sft": mean["methods"]["naive_sft"]},
                folder / "macpo_rounds.png", macpo_std)
    plot_pairs_gold(macpo["pairs_gold_reward"], folder / "macpo_pairs_gold.png", macpo_std["pairs_gold_reward"])
    return ["![rounds, mean and standard deviation over seeds](plots/macpo_rounds.png)",
            "![gold reward of the pairs, mean and standard deviation over seeds](plots/macpo_pairs_gold.png)"]


def main() -> None:
    args = parse_args(__doc__, "configs/macpo.yaml", resumable=True)
    config = load(MACPOConfig, args)
    try:
        run_seeds(config, lambda cfg, run, seed: run_macpo(cfg, run, args.resume, seed), tables, sections)
    except RunExistsError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
