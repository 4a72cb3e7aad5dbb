"""Judge your own models: every model answers a prompt file, reward / cost / pairwise judges score the answers.

    python -m jobs.evaluate --config configs/evaluate.yaml [--set judges.reward.path=/ckpt/my-rm ...]
Writes runs/<run_name>/metrics.json (`evaluation`: each model's mean reward and cost, win / tie / lose against
the reference), examples/evaluation.parquet, report.md and plots/evaluation.png.
"""

from __future__ import annotations

import time

from jobs.common import connect_ray, keep_log, load, main, parse_args
from pipelines.judge import EvaluateConfig, check_judging, evaluate, scores_table
from w2s.runs import RunDir, markdown_table


def evaluate_job() -> None:
    start = time.perf_counter()
    args = parse_args(__doc__, "configs/evaluate.yaml")
    config = load(EvaluateConfig, args)
    # a wrong model or judge folder is refused before the run folder is claimed: the fixed config may take it
    checked = check_judging(config.models, config, config.generation.max_new_tokens)
    run = RunDir(config.runs_dir, config.run_name, fresh=args.overwrite)
    run.claim(config)
    with keep_log(run):
        connect_ray()
        metrics = evaluate(config, run, checked=checked)
        print(f"\nAgainst {config.reference}\n\n{markdown_table(scores_table(metrics['evaluation'], config.reference))}"
              f"\n\nrun folder: {run.path}  (report.md, metrics.json, job.log)  "
              f"wall time {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main(evaluate_job)
