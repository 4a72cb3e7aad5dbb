"""Throughput and utilization of the Ray scoring stage and the ZeRO-3 trainer (`make bench`).

    python -m benchmarks.run                    # full: ~2000 pairs, a few minutes
    python -m benchmarks.run --quick            # seconds-scale smoke version (used by the tests)
    python -m benchmarks.run --out x.json --n-layer 2 --n-embd 32

What is measured, on freshly initialised GPT-2 checkpoints of the embedded world (default size: the
strong model of configs/prepare.yaml; weights do not change the speed, so no pretraining is needed):

1. Log-prob scoring. `score_preferences` (Ray Data + one `ModelHost` actor) against a plain loop of
   `response_logprobs` in this process, over the same pairs in batches of the same size (each batch:
   the chosen and the rejected rows in one call, as the host does). Both are timed alternately
   (plain, ray, plain, ray, ...) and the medians are compared. The Ray timing covers only the
   `score_preferences` call: Ray start-up and the host's model load happen before, and a warm-up
   call on a small file starts Ray Data's worker processes. It still includes what every call pays:
   Ray Data planning, the stage's own small actors, row validation and the Parquet writes.
2. Training. `train()` in mode "lm" on the world corpus with 2 and 1 Ray Train workers (--quick:
   2 only; ZeRO-3, gloo). tokens/s comes from the trainer's summary (tokens_per_worker * world_size / seconds),
   which starts after the workers are up and DeepSpeed is initialised; wall s includes start-up.
3. Utilization: achieved model FLOP/s over the measured fp32 matmul FLOP/s of the CPUs used.

Tokens are real tokens (attention-mask sums, prompt + response + EOS), the same count for both
scoring paths; padding is work done but not counted.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 96  # = GPTSize.n_positions: the world's texts are far shorter, so nothing is cut


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


def bench_scoring(model_path: Path, pairs: list[dict], work: Path, batch_size: int, repeats: int) -> dict:
    """Plain loop vs the Ray Data stage with one host, alternately, on the same pairs."""
    import ray
    import torch

    from actors.model_host import HostPool
    from actors.stages import score_preferences
    from w2s.modeling import ModelSpec, load_model, response_logprobs, tokenize_pairs

    spec = ModelSpec(path=str(model_path))
    own_threads = torch.get_num_threads()
    model, tokenizer = load_model(spec)
    prompts = [r["prompt"] for r in pairs]
    chosen, rejected = [r["chosen"] for r in pairs], [r["rejected"] for r in pairs]
    tokens = int(tokenize_pairs(tokenizer, prompts + prompts, chosen + rejected, MAX_LENGTH).attention_mask.sum())

    def plain(threads: int, n: int = len(pairs)) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            p = prompts[i:i + batch_size]
            response_logprobs(model, tokenizer, p + p, chosen[i:i + batch_size] + rejected[i:i + batch_size], MAX_LENGTH)
        seconds = time.perf_counter() - start
        torch.set_num_threads(own_threads)
        return seconds

    data, warm = work / "pairs.jsonl", work / "warmup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    warm.write_text("".join(json.dumps(r) + "\n" for r in pairs[:2 * batch_size]))

    # The host runs as many torch threads as the pool gives one host alone on this machine.
    pool = HostPool(max_hosts=1)
    hosts = pool.hosts({"strong": spec})
    host_threads = ray.get(hosts["strong"].actor.where.remote())["threads"]
    host_cpus = host_threads
    try:
        # Warm-up of both paths: Ray Data's worker processes, torch's thread pools and allocator.
        score_preferences(warm, hosts, work / "warmup", batch_size=batch_size)
        plain(own_threads, 2 * batch_size)

        def ray_stage() -> float:
            start = time.perf_counter()
            result = score_preferences(data, hosts, work / "scored", batch_size=batch_size)
            seconds = time.perf_counter() - start
            assert result.n_scored == len(pairs), result.report
            return seconds

        # plain_host_threads: the plain loop with as many threads as the host has, to tell Ray's
        # overhead apart from the thread count.
        runs = {"plain": [], "plain_host_threads": [], "ray": []}
        for _ in range(repeats):
            runs["plain"].append(plain(own_threads))
            runs["plain_host_threads"].append(plain(host_threads))
            runs["ray"].append(ray_stage())
    finally:
        pool.shutdown()

    out = {"pairs": len(pairs), "batch_size": batch_size, "tokens": tokens, "mean_seq_len": tokens / (2 * len(pairs)),
           "plain_threads": own_threads, "ray_host_cpus": host_cpus, "ray_host_threads": host_threads}
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        out[name] = {"seconds": seconds, "median_seconds": median, "tokens_per_s": tokens / median}
    out["ratio_ray_over_plain"] = out["ray"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def bench_training(model_path: Path, corpus: Path, work: Path, workers: int) -> dict:
    from actors.trainer import TrainConfig, train

    # Checkpoints and logging off: the benchmark measures the training steps themselves.
    config = TrainConfig(mode="lm", lr=3e-3, epochs=1.0, batch_size=32, warmup_ratio=0.02, num_workers=workers,
                         checkpoint_every=10**6, log_every=10**6)
    start = time.perf_counter()
    summary = train(config, model_path, corpus, work / f"model-{workers}w", f"bench-lm-{workers}w", work / "storage",
                    MAX_LENGTH)
    wall = time.perf_counter() - start
    tokens = summary["tokens_per_worker"] * summary["world_size"]
    return {"workers": workers, "steps": summary["steps"], "tokens": tokens, "seconds": summary["seconds"],
            "wall_seconds": wall, "tokens_per_s": tokens / summary["seconds"]}


def write_results(results: dict, path: str | Path) -> None:
    """The benchmark's numbers as JSON (its folder is created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def main() -> None:
    prepare = yaml.safe_load((ROOT / "configs" / "prepare.yaml").read_text())
    strong = prepare["strong"]["size"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-scale smoke run (few pairs, few steps)")
    parser.add_argument("--out", default="bench_results/bench.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--n-layer", type=int, default=strong["n_layer"])
    parser.add_argument("--n-embd", type=int, default=strong["n_embd"])
    parser.add_argument("--n-head", type=int, default=strong["n_head"])
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per scoring batch (both paths)")
    args = parser.parse_args()
    quick = args.quick
    # quick: one repeat and only the 2-worker training run, to stay well inside a test's time budget.
    n_pairs, repeats, train_docs = (100, 1, 256) if quick else (2000, 3, 6400)
    train_workers = (2,) if quick else (2, 1)
    matmul_n, matmul_repeats = (512, 10) if quick else (1024, 20)

    # Before `import ray`: Ray Train would otherwise print every worker line twice.
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    import ray
    import torch

    from w2s.modeling import GPTSize, init_gpt2
    from w2s.runs import markdown_table
    from w2s.world import World, WorldConfig, build_tokenizer

    # Peak first, while nothing else of ours is running.
    threads = torch.get_num_threads()
    peak = {"n": matmul_n, "threads": threads, "gflops": matmul_gflops(threads, matmul_n, matmul_repeats),
            "gflops_1thread": matmul_gflops(1, matmul_n, matmul_repeats)}

    world = World(WorldConfig(**{**prepare["world"], "n_pair_prompts": n_pairs, "n_pretrain_docs": train_docs}))
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in world.preference_pairs()]
    with tempfile.TemporaryDirectory(prefix="w2s-bench-") as tmp:
        work = Path(tmp)
        tokenizer = build_tokenizer()
        size = GPTSize(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=MAX_LENGTH)
        model_path = init_gpt2(size, tokenizer, work / "init")
        docs = world.corpus()
        corpus = work / "corpus.parquet"
        pq.write_table(pa.table({"text": docs}), corpus)
        doc_len = statistics.mean(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])

        # Worker logs stay in Ray's session folder: the table is this command's output. A failing
        # stage still raises here with its traceback.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False  # keep the output a readable table
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-call plan lines and deprecation notes
        try:
            scoring = bench_scoring(model_path, pairs, work, args.batch_size, repeats)
            training = [bench_training(model_path, corpus, work, w) for w in train_workers]
        finally:
            ray.shutdown()
        score_flops = forward_flops_per_token(model_path, scoring["mean_seq_len"])
        train_flops = 3 * forward_flops_per_token(model_path, doc_len)

    def row(name, cpus, peak_gflops, tokens_per_s=None, flops_per_token=None, timed=None, wall=None) -> dict:
        gflops = tokens_per_s * flops_per_token / 1e9 if tokens_per_s else None
        return {"measurement": name, "CPUs": f"{cpus:g}", "tokens/s": round(tokens_per_s) if tokens_per_s else None,
                "model GFLOP/s": gflops, "peak GFLOP/s": peak_gflops,
                "utilization %": 100 * gflops / peak_gflops if gflops else None, "timed s": timed, "wall s": wall}

    one = peak["gflops_1thread"]
    rows = [
        row(f"matmul fp32 {matmul_n}^2, {threads} threads", threads, peak["gflops"]),
        row(f"matmul fp32 {matmul_n}^2, 1 thread", 1, one),
        row(f"score: plain loop, {scoring['plain_threads']} threads", scoring["plain_threads"], peak["gflops"],
            scoring["plain"]["tokens_per_s"], score_flops, scoring["plain"]["median_seconds"],
            scoring["plain"]["median_seconds"]),
        row(f"score: plain loop, {scoring['ray_host_threads']} thread(s) (as the host)", scoring["ray_host_threads"],
            scoring["ray_host_threads"] * one, scoring["plain_host_threads"]["tokens_per_s"], score_flops,
            scoring["plain_host_threads"]["median_seconds"], scoring["plain_host_threads"]["median_seconds"]),
        row(f"score: Ray Data + 1 ModelHost, {scoring['ray_host_threads']} thread(s)", scoring["ray_host_cpus"],
            scoring["ray_host_cpus"] * one, scoring["ray"]["tokens_per_s"], score_flops,
            scoring["ray"]["median_seconds"], scoring["ray"]["median_seconds"]),
    ] + [row(f"train lm ZeRO-3, {t['workers']} worker(s)", t["workers"], t["workers"] * one, t["tokens_per_s"],
             train_flops, t["seconds"], t["wall_seconds"]) for t in training]

    ratio_line = (f"side by side ({repeats} alternating repeats, medians): Ray/plain tokens/s = "
                  f"{scoring['ratio_ray_over_plain']:.3f}")
    print()
    print(markdown_table(rows, floatfmt=".2f"))
    print()
    print(ratio_line)
    print("score timed s: the score_preferences call only (no Ray start-up, no model load; warm-up call before).")
    print("train timed s: the trainer's own clock (after worker start-up); wall s: the whole train() call.")
    print("peak for Ray rows: CPUs used x 1-thread matmul FLOP/s; model FLOPs: 2N + 2 n_layer n_ctx d per token "
          "forward, 3x that for training (see forward_flops_per_token).")

    results = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": threads, "torch_version": torch.__version__,
                    "ray_version": ray.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "quick": quick,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                  "score_forward_flops_per_token": score_flops, "train_flops_per_token": train_flops,
                  "train_mean_seq_len": doc_len},
        "matmul": peak,
        "scoring": scoring,
        "training": {f"workers_{t['workers']}": t for t in training},
        "rows": rows,
    }
    write_results(results, args.out)


if __name__ == "__main__":
    main()
