"""The weak-to-strong deception analysis: does a strong model trained on a weak supervisor's labels err, under a
conflicting objective, where it knows better and the weak supervisor cannot tell? Per strong size, conflict setting
and seed, on the world's allergies.

    python -m jobs.deception [--config configs/deception.yaml] [--set seeds=[0] --set alphas=[0.5] ...]
    ray job submit --working-dir . -- python -m jobs.deception --config configs/deception.yaml

It pretrains its own base models on a world with allergies (cached by content, as every stage).
"""

from __future__ import annotations

from jobs.common import load, main, parse_args, run_job
from pipelines.deception import DeceptionConfig, deception_table, run_deception


def deception_job() -> None:
    args = parse_args(__doc__, "configs/deception.yaml")
    config = load(DeceptionConfig, args)

    def body(run):
        metrics = run_deception(config, run)
        return metrics, [("Deception score per conflict setting and strong size, pooled over seeds",
                          deception_table(metrics["methods"]["deception"]))]

    run_job(config, body, args.overwrite)


if __name__ == "__main__":
    main(deception_job)
