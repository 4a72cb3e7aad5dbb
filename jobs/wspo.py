"""WSPO: train the strong model on the weak aligned-vs-base log-ratio, with a gamma sweep.

    python -m jobs.wspo [--config configs/wspo.yaml] [--set train.gamma=0.2 ...] [--set seeds=[0,1,2]]
    ray job submit --working-dir . -- python -m jobs.wspo --config configs/wspo.yaml

On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`.
"""

from __future__ import annotations

from jobs.common import Tables, load, main, parse_args, run_seeds
from pipelines.judge import judged_tables
from pipelines.wspo import WSPOConfig, plot_sweep, run_wspo


def tables(metrics: dict) -> Tables:
    if "sweep" not in metrics["methods"]["wspo"]:  # your own models: judged only with an `evaluate:` section
        return judged_tables(metrics)
    return [("Reference models", [{"model": n, **s} for n, s in metrics["models"].items()]),
            ("WSPO, gamma sweep (PGR on total, against weak_aligned and strong_ceiling)",
             metrics["methods"]["wspo"]["sweep"])]


def sections(per_seed: dict, mean: dict, std: dict, folder) -> list[str]:
    if "sweep" not in mean["methods"]["wspo"]:
        return []
    plot_sweep(mean["methods"]["wspo"]["sweep"], mean["models"], folder / "wspo_gamma_sweep.png",
               std["methods"]["wspo"]["sweep"])
    return ["![gamma sweep, mean and standard deviation over seeds](plots/wspo_gamma_sweep.png)"]


def wspo_job() -> None:
    args = parse_args(__doc__, "configs/wspo.yaml")
    run_seeds(load(WSPOConfig, args), run_wspo, tables, sections, args.overwrite)


if __name__ == "__main__":
    main(wspo_job)
