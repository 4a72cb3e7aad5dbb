"""Scoring cost as the data grows (`make bench`): 1k, 10k and 100k preference pairs of the world's format.

    python -m benchmarks.scaling                  # 1k, 10k, 100k pairs
    python -m benchmarks.scaling --pairs 1000 5000 --out x.json

Each size runs `score_preferences` (Ray Data through one model host, the weak model of configs/prepare.yaml)
in a fresh process with its own local Ray, so that one size's memory cannot hide in another's. While it runs,
the process tree is sampled every 0.2 s: the driver's peak resident memory, the largest peak of any other
process (model host, Ray Data task workers) and the Ray object store's peak use. Good behaviour: wall time
linear in the pairs (the same seconds per 1k pairs at every size), peak memory flat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.run import write_results

ROOT = Path(__file__).resolve().parents[1]


def _score(data: str, model: str, out: str) -> None:
    """One size, in this (fresh) process: prints one JSON line with the scoring stage's own wall time."""
    from actors.model_host import HostPool
    from actors.stages import score_preferences
    from jobs.common import connect_ray
    from w2s.modeling import ModelSpec

    connect_ray()
    pool = HostPool(max_hosts=1)
    hosts = pool.hosts({"weak": ModelSpec(path=model)})
    start = time.perf_counter()
    result = score_preferences(data, hosts, out, tokenizer_path=model, batch_size=64)
    print(json.dumps({"stage_s": time.perf_counter() - start, "scored": result.n_scored}), flush=True)
    pool.shutdown()


def _peaks(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Sample the process tree of `pid` until `stop`: peak RSS of the root and of any one descendant."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            peaks["driver"] = max(peaks["driver"], root.memory_info().rss)
            for child in root.children(recursive=True):
                try:
                    peaks["worker"] = max(peaks["worker"], child.memory_info().rss)
                except psutil.Error:
                    continue
        except psutil.Error:
            break
        time.sleep(0.2)


def measure(pairs: int, model: Path, work: Path) -> dict:
    from w2s.world import World, WorldConfig

    data = work / f"pairs_{pairs}.jsonl"
    rows = World(WorldConfig(n_pair_prompts=pairs)).preference_pairs()
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    peaks, stop = {"driver": 0, "worker": 0}, threading.Event()
    start = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", "--score", str(data), str(model),
                            str(work / f"scored_{pairs}")], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=_peaks, args=(job.pid, stop, peaks))
    sampler.start()
    out, _ = job.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if job.returncode:
        raise RuntimeError(f"scoring {pairs} pairs failed (exit {job.returncode})")
    stage = json.loads(out.strip().splitlines()[-1])
    return {"pairs": pairs, "scored": stage["scored"], "stage_s": stage["stage_s"], "process_s": wall,
            "s_per_1k_pairs": 1000 * stage["stage_s"] / pairs, "driver_peak_mb": peaks["driver"] / 2**20,
            "worker_peak_mb": peaks["worker"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--out", default="bench_results/scaling.json")
    parser.add_argument("--score", nargs=3, metavar=("DATA", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        return _score(*args.score)

    import yaml

    from w2s.modeling import GPTSize, init_gpt2
    from w2s.runs import markdown_table
    from w2s.world import build_tokenizer

    size = GPTSize(**yaml.safe_load((ROOT / "configs" / "prepare.yaml").read_text())["weak"]["size"])
    with tempfile.TemporaryDirectory(prefix="w2s-bench-scaling-") as tmp:
        work = Path(tmp)
        model = init_gpt2(size, build_tokenizer(), work / "weak")
        rows = []
        for pairs in args.pairs:
            rows.append(measure(pairs, model, work))
            print(f"[scaling] {pairs} pairs: {rows[-1]['stage_s']:.1f} s, driver peak "
                  f"{rows[-1]['driver_peak_mb']:.0f} MB", flush=True)
    print()
    print(markdown_table(rows, floatfmt=".1f"))
    print("stage_s: the score_preferences call (read, check, score through one host, write); process_s: the whole "
          "process (Ray start, host start and model load included). Peaks: resident memory sampled every 0.2 s; "
          "worker = the largest of the model host and the Ray Data task workers.")
    write_results({"machine": {"cpu_count": os.cpu_count()}, "model": size.model_dump(), "sizes": rows}, args.out)


if __name__ == "__main__":
    main()
