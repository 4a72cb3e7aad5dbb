"""MACPO: weak teachers and a strong student exchange contrastive DPO pairs over rounds.

    python -m jobs.macpo [--config configs/macpo.yaml] [--set rounds=2 ...] [--resume]
    ray job submit --working-dir . -- python -m jobs.macpo --config configs/macpo.yaml
On the embedded world it reuses (or first builds) the models of `python -m jobs.prepare`.
A killed run continues with --resume: finished stages are skipped, a training stage resumes from
its last checkpoint.
"""

from __future__ import annotations

import sys
import time

from jobs.common import connect_ray, load, parse_args
from pipelines.macpo import MACPOConfig, RunExistsError, run_macpo
from w2s.runs import RunDir, markdown_table


def main() -> None:
    args = parse_args(__doc__, "configs/macpo.yaml", resumable=True)
    config = load(MACPOConfig, args)
    start = time.perf_counter()
    connect_ray()
    run = RunDir(config.runs_dir, config.run_name)
    try:
        metrics = run_macpo(config, run, resume=args.resume)
    except RunExistsError as err:
        sys.exit(f"error: {err}")
    rows = [{"round": r["round"], "agent": "student", **r["student"]} for r in metrics["methods"]["macpo"]["rounds"]]
    rows += [{"round": r["round"], "agent": t["name"], **t} for r in metrics["methods"]["macpo"]["rounds"]
             for t in r["teachers"]]
    for row in rows:
        row.pop("name", None)
    print()
    print(markdown_table([{"model": n, **s} for n, s in metrics["models"].items()]
                         + [{"model": "naive_sft", **metrics["methods"]["naive_sft"]}]))
    print("\nMACPO, every round (round 0 = initialisation):\n")
    print(markdown_table(rows))
    print(f"\nrun folder: {run.path}  (report.md, metrics.json)  wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
