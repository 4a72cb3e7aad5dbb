"""Throughput and utilization of the Ray scoring stage and the ZeRO-3 trainer (`make bench`).

    python -m benchmarks.run                      # sizes "today" and "large" (see benchmarks/wspo.py)
    python -m benchmarks.run --sizes today        # one size
    python -m benchmarks.run --sizes quick        # seconds-scale (the tests call bench_scoring on it)

At each size (freshly initialised GPT-2s of the world's tokenizer: weights do not change the speed):

1. Scoring, fixed against per-token cost. `score_preferences` (Ray Data through one model host: read,
   check, score, write) against a plain loop of `response_logprobs` in this process, on the same pairs in
   batches of the same size (each batch: chosen and rejected in one call, as the host does), at two data
   sizes. Each path's time at the two sizes gives its per-token cost (the slope) and its fixed cost (what
   is left at the smaller size). Both paths are timed alternately (plain, ray, plain, ray, ...) and the
   medians are used; the host is started and warmed up before (its model load is a job's, not a call's).
   The log-probs of the two paths are compared: the Ray path must score exactly what the plain loop does.
2. Training. `train()` in mode "lm" on the world corpus with 2 Ray Train workers (ZeRO-3, gloo); tokens/s
   from the trainer's summary (its clock starts after the workers are up and DeepSpeed is set up).
3. Utilization: achieved model FLOP/s over the measured fp32 matmul FLOP/s of the CPUs used.

Tokens are real tokens (attention-mask sums, prompt + response + EOS), the same count for both scoring
paths; padding is work done but not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 96  # = GPTSize.n_positions: the world's texts are far shorter, so nothing is cut
SCORING_PAIRS = {"quick": (32, 96), "today": (500, 2000), "large": (200, 800)}  # the two data sizes per size
TRAIN_DOCS = {"quick": 256, "today": 6400, "large": 3200}


def matmul_gflops(threads: int, n: int, repeats: int) -> float:
    """fp32 matmul speed of `threads` torch threads: n x n @ n x n is 2 n^3 flops; best of `repeats`.

    The best (not the median) run stands for the peak: the machine is shared, and a slow run
    measures the neighbours rather than the CPU.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: thread pool start, allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / min(times) / 1e9


def forward_flops_per_token(model_path: Path, n_ctx: float) -> float:
    """Forward FLOPs per token of a GPT-2, as in Kaplan et al. 2020 (Scaling Laws, table 1):

        forward = 2 * N + 2 * n_layer * n_ctx * n_embd
        N       = n_layer * (4 * n_embd^2 + 2 * n_embd * n_inner) + vocab * n_embd

    N counts the weights used in matmuls: attention (q, k, v, output: 4 d^2) and MLP (2 d n_inner)
    per layer, plus the LM head (vocab x d, tied to the embedding but still a matmul); embedding
    look-ups, biases, layer norms and softmax are left out. Each weight is one multiply-add
    (2 flops) per token. The second term is attention over the context (QK^T and AV), with n_ctx
    the mean sequence length actually processed. Training (forward + backward) = 3 x forward,
    i.e. about 6 N per token.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    d, layers = cfg.n_embd, cfg.n_layer
    inner = cfg.n_inner or 4 * d
    n_matmul = layers * (4 * d * d + 2 * d * inner) + cfg.vocab_size * d
    return 2 * n_matmul + 2 * layers * n_ctx * d


def bench_scoring(model_path: Path, pairs: list[dict], sizes: tuple[int, int], work: Path, batch_size: int,
                  repeats: int) -> dict:
    """Plain loop against the Ray Data stage with one host, alternately, at two data sizes."""
    import numpy as np
    import ray
    import torch

    from actors.model_host import HostPool
    from actors.stages import score_preferences
    from w2s.modeling import ModelSpec, load_model, response_logprobs, tokenize_pairs

    spec = ModelSpec(path=str(model_path))
    threads = torch.get_num_threads()
    model, tokenizer = load_model(spec)

    def plain(n: int) -> tuple[float, list]:
        p, c, r = ([row[k] for row in pairs[:n]] for k in ("prompt", "chosen", "rejected"))
        start, out = time.perf_counter(), []
        for i in range(0, n, batch_size):
            out += response_logprobs(model, tokenizer, p[i:i + batch_size] * 2,
                                     c[i:i + batch_size] + r[i:i + batch_size], MAX_LENGTH)
        return time.perf_counter() - start, out

    files = {}
    for n in (*sizes, batch_size):
        files[n] = work / f"pairs_{n}.jsonl"
        files[n].write_text("".join(json.dumps(row) + "\n" for row in pairs[:n]))
    pool = HostPool(max_hosts=1)
    try:
        hosts = pool.hosts({"model": spec})
        host_threads = ray.get(hosts["model"].actor.where.remote())["threads"]
        score_preferences(files[batch_size], hosts, work / "warmup", batch_size=batch_size)  # Ray Data's workers
        plain(batch_size)

        def through_ray(n: int) -> float:
            start = time.perf_counter()
            result = score_preferences(files[n], hosts, work / f"scored_{n}", batch_size=batch_size)
            seconds = time.perf_counter() - start
            assert result.n_scored == n, result.report
            return seconds

        seconds = {(path, n): [] for path in ("plain", "ray") for n in sizes}
        for _ in range(repeats):
            for n in sizes:
                seconds["plain", n].append(plain(n)[0])
                seconds["ray", n].append(through_ray(n))
        _, plain_logps = plain(sizes[0])
    finally:
        pool.shutdown()
    # the same numbers both ways: per batch the chosen rows, then the rejected ones
    scored = pq.read_table(work / f"scored_{sizes[0]}" / "scored.parquet")
    by_ray = []
    for i in range(0, sizes[0], batch_size):
        part = scored.slice(i, batch_size)
        by_ray += part["model_chosen_logps"].to_pylist() + part["model_rejected_logps"].to_pylist()
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(by_ray, plain_logps))
    tokens = {n: int(tokenize_pairs(tokenizer, [r["prompt"] for r in pairs[:n]] * 2,
                                    [r["chosen"] for r in pairs[:n]] + [r["rejected"] for r in pairs[:n]],
                                    MAX_LENGTH).attention_mask.sum()) for n in sizes}
    out = {"sizes": list(sizes), "tokens": [tokens[n] for n in sizes], "batch_size": batch_size,
           "plain_threads": threads, "ray_host_threads": host_threads, "max_abs_logprob_diff": diff}
    for path in ("plain", "ray"):
        small, large = (statistics.median(seconds[path, n]) for n in sizes)
        per_token = (large - small) / (tokens[sizes[1]] - tokens[sizes[0]])
        out[path] = {"median_seconds": [small, large], "us_per_token": 1e6 * per_token,
                     "fixed_s": small - per_token * tokens[sizes[0]], "tokens_per_s": tokens[sizes[1]] / large}
    return out


def bench_training(model_path: Path, corpus: Path, work: Path) -> dict:
    from actors.trainer import TrainConfig, train

    # Checkpoints and logging off: the benchmark measures the training steps themselves.
    config = TrainConfig(mode="lm", lr=3e-3, epochs=1.0, batch_size=32, warmup_ratio=0.02, num_workers=2,
                         checkpoint_every=10**6, log_every=10**6)
    start = time.perf_counter()
    summary = train(config, model_path, corpus, work / "trained", "bench-lm", work / "storage", MAX_LENGTH)
    wall = time.perf_counter() - start
    tokens = summary["tokens_per_worker"] * summary["world_size"]
    return {"workers": 2, "steps": summary["steps"], "tokens": tokens, "seconds": summary["seconds"],
            "wall_seconds": wall, "tokens_per_s": tokens / summary["seconds"]}


def bench_size(size: str, work: Path, one_thread_gflops: float, repeats: int) -> dict:
    """Scoring and training at one size of benchmarks/wspo.py; model FLOP/s against the matmul peak."""
    from benchmarks.wspo import _parameters, sizes
    from w2s.modeling import init_gpt2
    from w2s.world import World, build_tokenizer

    world, _, strong = sizes()[size]
    tokenizer = build_tokenizer()
    model_path = init_gpt2(strong.model_copy(update={"n_positions": MAX_LENGTH}), tokenizer, work / "model")
    n_small, n_large = SCORING_PAIRS[size]
    world = world.model_copy(update={"n_pair_prompts": n_large, "n_pretrain_docs": TRAIN_DOCS[size]})
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in World(world).preference_pairs()]
    scoring = bench_scoring(model_path, pairs, (n_small, n_large), work, 32, repeats)
    docs = World(world).corpus()
    pq.write_table(pa.table({"text": docs}), work / "corpus.parquet")
    training = bench_training(model_path, work / "corpus.parquet", work)
    doc_len = statistics.mean(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    seq_len = scoring["tokens"][1] / (2 * n_large)
    score_flops, train_flops = forward_flops_per_token(model_path, seq_len), 3 * forward_flops_per_token(model_path, doc_len)
    util = {"score_plain": (scoring["plain"]["tokens_per_s"] * score_flops, scoring["plain_threads"]),
            "score_ray": (scoring["ray"]["tokens_per_s"] * score_flops, scoring["ray_host_threads"]),
            "train": (training["tokens_per_s"] * train_flops, training["workers"])}
    return {"size": size, "parameters": _parameters(model_path),
            "scoring": scoring, "training": training,
            "flops_per_token": {"score_forward": score_flops, "train": train_flops},
            "utilization": {k: {"model_gflops": f / 1e9, "peak_gflops": cpus * one_thread_gflops,
                                "percent": 100 * f / 1e9 / (cpus * one_thread_gflops)} for k, (f, cpus) in util.items()}}


def write_results(results: dict, path: str | Path) -> None:
    """The benchmark's numbers as JSON (its folder is created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["today", "large"], choices=["quick", "today", "large"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of each scoring path")
    parser.add_argument("--out", default="bench_results/bench.json", help="JSON results (default: %(default)s)")
    args = parser.parse_args()

    from jobs.common import connect_ray  # sets RAY_TRAIN_ENABLE_PRINT_PATCH=0 before Ray Train is imported

    import torch

    # Peak first, while nothing else of ours is running.
    threads = torch.get_num_threads()
    peak = {"n": 1024, "threads": threads, "gflops": matmul_gflops(threads, 1024, 20),
            "gflops_1thread": matmul_gflops(1, 1024, 20)}
    connect_ray()
    import ray

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="w2s-bench-") as tmp:
            results = []
            for size in args.sizes:
                print(f"[bench] size {size}", flush=True)
                (Path(tmp) / size).mkdir()
                results.append(bench_size(size, Path(tmp) / size, peak["gflops_1thread"], args.repeats))
    finally:
        ray.shutdown()
    for result in results:
        print_result(result, peak)
    write_results({"machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "torch_version": torch.__version__,
                               "ray_version": ray.__version__, "python": platform.python_version(),
                               "processor": platform.processor() or platform.machine()},
                   "matmul": peak, "sizes": results}, args.out)


def print_result(result: dict, peak: dict) -> None:
    from w2s.runs import markdown_table

    s, t = result["scoring"], result["training"]
    print(f"\n## {result['size']}: {result['parameters'] / 1e6:.2f}M parameters\n")
    print(f"matmul fp32 1024^2: {peak['gflops']:.0f} GFLOP/s on {peak['threads']} threads, "
          f"{peak['gflops_1thread']:.0f} on 1\n")
    print(markdown_table([{"scoring path": f"{path} ({s[f'{path}_threads' if path == 'plain' else 'ray_host_threads']} "
                                           f"thread(s))", "fixed s": s[path]["fixed_s"],
                           "us per token": s[path]["us_per_token"],
                           f"tokens/s at {s['sizes'][1]} pairs": s[path]["tokens_per_s"],
                           "median s (small, large)": ", ".join(f"{x:.2f}" for x in s[path]["median_seconds"])}
                          for path in ("plain", "ray")], floatfmt=".2f"))
    print(f"Ray/plain tokens/s at {s['sizes'][1]} pairs: {s['ray']['tokens_per_s'] / s['plain']['tokens_per_s']:.3f}; "
          f"largest difference between the two paths' log-probs: {s['max_abs_logprob_diff']:.2e}")
    print(f"train lm ZeRO-3, {t['workers']} workers: {t['tokens_per_s']:.0f} tokens/s over {t['steps']} steps "
          f"({t['seconds']:.1f} s of steps, {t['wall_seconds']:.1f} s with start-up)")
    print(markdown_table([{"measurement": name, **u} for name, u in result["utilization"].items()], floatfmt=".1f"))
    print("peak: the CPUs used x the 1-thread matmul FLOP/s; model FLOPs: 2N + 2 n_layer n_ctx d per token forward, "
          "3x that for training (forward_flops_per_token).")


if __name__ == "__main__":
    main()
