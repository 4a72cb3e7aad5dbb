"""Prepare the embedded world's reference models and score them.

    python -m jobs.prepare [--config configs/prepare.yaml] [--set key=value ...]
    python -m jobs.prepare --set seeds=[0,1,2]      # three worlds and model sets: mean and spread
    ray job submit --working-dir . -- python -m jobs.prepare --config configs/prepare.yaml
"""

from __future__ import annotations

import time

from jobs.common import Tables, load, main, parse_args, run_seeds
from pipelines.evaluation import plot_scores
from pipelines.prepare import PrepareConfig, TARGETS, prepare
from w2s.config import offset_seeds
from w2s.runs import RunDir


def run_one(config: PrepareConfig, run: RunDir, seed: int, workers=None) -> dict:
    start = time.perf_counter()
    config = offset_seeds(config, seed)
    run.claim(config)
    prepare(config, run, workers)
    return run.update_metrics({"wall_seconds": {"prepare": round(time.perf_counter() - start, 1)}})


def tables(metrics: dict) -> Tables:
    return [("Gold reward of the reference models on held-out prompts",
             [{"model": name, **scores} for name, scores in metrics["models"].items()])]


def target_lines(per_seed: list[dict]) -> list[str]:
    """One checked line per target of the world, with the seeds it held in."""
    lines = []
    for target in TARGETS:
        held = sum(run["targets"][target] for run in per_seed)
        seeds = f" (held in {held} of {len(per_seed)} seeds)" if len(per_seed) > 1 else ""
        lines.append(f"  {'ok ' if held == len(per_seed) else 'NOT'} {target}{seeds}")
    return lines


def sections(per_seed: dict, mean: dict, std: dict, folder) -> list[str]:
    plot_scores(mean["models"], folder / "gold_reward.png", errors=std["models"])
    return ["The world's targets:\n\n" + "\n".join(f"-{line}" for line in target_lines(list(per_seed.values()))),
            "![gold reward, mean and standard deviation over seeds](plots/gold_reward.png)"]


def prepare_job() -> None:
    args = parse_args(__doc__, "configs/prepare.yaml")
    metrics = run_seeds(load(PrepareConfig, args), run_one, tables, sections, args.overwrite)
    print("\n".join(target_lines(list(metrics["seeds"].values()) if "seeds" in metrics else [metrics])))


if __name__ == "__main__":
    main(prepare_job)
