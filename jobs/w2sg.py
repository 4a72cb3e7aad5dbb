"""Weak-to-strong generalization: strong models trained on a weak supervisor's labels (naive, auxiliary confidence
and product losses) against the weak supervisor and the strong ceiling, per task, over seeds.

    python -m jobs.w2sg [--config configs/w2sg.yaml] [--set seeds=[0,1,2,3] --set tasks=[correct] ...]
    ray job submit --working-dir . -- python -m jobs.w2sg --config configs/w2sg.yaml

On the embedded world it reuses (or first builds) the weak and strong base models of `python -m jobs.prepare`;
with `prepare: null` it runs on your own weak and strong models and preference pairs (configs/w2sg_own.yaml).
The seeds are the job's own (other splits, other training seeds), so it runs in one folder.
"""

from __future__ import annotations

from jobs.common import load, main, parse_args, run_job
from pipelines.w2sg import W2SGConfig, pgr_table, run_w2sg


def w2sg_job() -> None:
    args = parse_args(__doc__, "configs/w2sg.yaml")
    config = load(W2SGConfig, args)

    def body(run):
        metrics = run_w2sg(config, run)
        return metrics, [("Test accuracy, median over seeds; PGR against the weak supervisor and the strong ceiling",
                          pgr_table(metrics["methods"]["w2sg"]))]

    run_job(config, body, args.overwrite)


if __name__ == "__main__":
    main(w2sg_job)
