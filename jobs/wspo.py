"""WSPO: train the strong model on the weak aligned-vs-base log-ratio, with a gamma sweep.

    python -m jobs.wspo [--config configs/wspo.yaml] [--set train.gamma=0.2 ...]
    ray job submit --working-dir . -- python -m jobs.wspo --config configs/wspo.yaml
On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`.
"""

from __future__ import annotations

import time

from jobs.common import connect_ray, load, parse_args
from pipelines.wspo import WSPOConfig, run_wspo
from w2s.runs import RunDir, markdown_table


def main() -> None:
    config = load(WSPOConfig, parse_args(__doc__, "configs/wspo.yaml"))
    start = time.perf_counter()
    connect_ray()
    run = RunDir(config.runs_dir, config.run_name)
    run.save_config(config)
    metrics = run_wspo(config, run)
    wspo = metrics["methods"]["wspo"]
    if "sweep" in wspo:
        print()
        print(markdown_table([{"model": n, **s} for n, s in metrics["models"].items()]))
        print("\nWSPO, gamma sweep (PGR on total, against weak_aligned and strong_ceiling):\n")
        print(markdown_table(wspo["sweep"]))
    print(f"\nrun folder: {run.path}  (report.md, metrics.json)  wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
