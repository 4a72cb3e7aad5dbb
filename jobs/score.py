"""Attach per-token log-probs of several models to a preference dataset.

    python -m jobs.score --config configs/score.yaml [--set data=/path/prefs.jsonl]
Writes runs/<run_name>/examples/scored.parquet and rejected_rows.parquet (malformed rows, with reasons).
"""

from __future__ import annotations

from jobs.common import connect_ray, load, parse_args
from pipelines.score import ScoreConfig, score
from w2s.runs import RunDir


def main() -> None:
    config = load(ScoreConfig, parse_args(__doc__, "configs/score.yaml"))
    connect_ray()
    run = RunDir(config.runs_dir, config.run_name)
    run.save_config(config)
    score(config, run)


if __name__ == "__main__":
    main()
