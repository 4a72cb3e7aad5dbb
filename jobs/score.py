"""Attach per-token log-probs of several models to a preference dataset.

    python -m jobs.score --config configs/score.yaml [--set data=/path/prefs.jsonl]
Writes runs/<run_name>/examples/scored.parquet and rejected_rows.parquet (malformed rows, with reasons).
"""

from __future__ import annotations

from jobs.common import connect_ray, keep_log, load, main, parse_args
from pipelines.score import ScoreConfig, score
from w2s.runs import RunDir


def score_job() -> None:
    args = parse_args(__doc__, "configs/score.yaml")
    config = load(ScoreConfig, args)
    run = RunDir(config.runs_dir, config.run_name, fresh=args.overwrite)
    run.claim(config)
    with keep_log(run):
        connect_ray()
        score(config, run)


if __name__ == "__main__":
    main(score_job)
