"""The real-model track: SmolLM2-135M-Instruct aligned weak-to-strong (WSPO, MACPO) and guided by the weak pair
(CBS, Best-of-N, EFT) on real facts and harmful requests, judged by a gold reward written in code
(w2s/real_task.py).

    python -m jobs.real [--config configs/real.yaml] [--set seeds=[0,1,2]]      (make demo-real)
"""

from __future__ import annotations

from jobs.common import Tables, load, main, parse_args, run_seeds
from pipelines.real import RealConfig, run_real, score_table


def tables(metrics: dict) -> Tables:
    searches = [{"method": name, **{k: m[k] for k in ("strong_tokens_per_prompt", "seconds")}}
                for name, m in metrics["models"].items() if "strong_tokens_per_prompt" in m]
    return [("Gold reward on held-out prompts (PGR on total; win / tie / lose against weak_aligned by gold reward)",
             score_table(metrics["models"])),
            *([("Searches: strong-model tokens sampled per prompt", searches)] if searches else []),
            ("The gold rule against hand-checked responses", [{"kind": k, **e} for k, e in metrics["gold_rule"].items()])]


def real_job() -> None:
    args = parse_args(__doc__, "configs/real.yaml")
    run_seeds(load(RealConfig, args), run_real, tables, overwrite=args.overwrite)


if __name__ == "__main__":
    main(real_job)
