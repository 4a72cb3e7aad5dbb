"""Prepare the embedded world's reference models and score them.

    python -m jobs.prepare [--config configs/prepare.yaml] [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.prepare --config configs/prepare.yaml
"""

from __future__ import annotations

import time

from jobs.common import connect_ray, load, parse_args
from pipelines.prepare import PrepareConfig, prepare
from w2s.runs import RunDir, markdown_table


def main() -> None:
    args = parse_args(__doc__, "configs/prepare.yaml")
    config = load(PrepareConfig, args)
    start = time.perf_counter()
    connect_ray()
    run = RunDir(config.runs_dir, config.run_name)
    run.save_config(config)
    prepare(config, run)
    metrics = run.update_metrics({"wall_seconds": {"prepare": round(time.perf_counter() - start, 1)}})
    print()
    print(markdown_table([{"model": name, **scores} for name, scores in metrics["models"].items()]))
    for claim, holds in metrics["premise"].items():
        print(f"  {'ok ' if holds else 'NOT'} {claim}")
    print(f"\nrun folder: {run.path}  (report.md, metrics.json)  wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
